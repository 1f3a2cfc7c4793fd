"""``python -m bench.simserver``: the project's simulator with TCP_NODELAY on accepted sockets.

The simulator answers keep-alive requests with two writes (headers, then body). Without
TCP_NODELAY, Nagle's algorithm holds the body until the client's delayed ACK (~40 ms on
Linux), so every POST on a reused connection took latency + ~40 ms regardless of the
product. Real API front ends (nginx, etc.) set TCP_NODELAY; so does this launcher.
Suggested permanent fix: the same ``setsockopt`` in ``simulator._Handler.setup``.
"""

from __future__ import annotations

import socket

from bemsoft_monitor import simulator

_original_setup = simulator._Handler.setup


def _setup_nodelay(self: simulator._Handler) -> None:
    _original_setup(self)
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


simulator._Handler.setup = _setup_nodelay  # type: ignore[method-assign]

if __name__ == "__main__":
    simulator.main()
