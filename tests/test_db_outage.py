"""Database unreachable at start or mid-run: one log line per outage, recovery, nothing lost."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from bemsoft_monitor.simulator import Simulator

from .conftest import Lis, make_monitor, make_settings


class TcpProxy:
    """A loopback TCP forwarder that can be switched off to cut the database away."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.close()
        self.sockets: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.lock = threading.Lock()

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(50):
            try:
                server.bind(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.1)
        server.listen(50)
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            # Wakes the thread blocked in accept(); close() alone would not on Linux.
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_RDWR)
            self.server.close()
            self.server = None
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
    return urlunsplit((parts.scheme, new, parts.path, parts.query, parts.fragment))


def _wait(predicate, timeout_s: float = 30) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_database_down_at_start_and_mid_run_recovers_by_itself(
        pg_url: str, tmp_path: Path, sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    lis = Lis(pg_url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    parts = urlsplit(pg_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    url = _via(pg_url, proxy.port)
    caplog.set_level(logging.INFO)
    settings = make_settings(url, tmp_path, sim, poll_seconds=0.05)
    # Down at start: the monitor cannot even create its tables yet.
    monitor, _ = make_monitor(settings)
    stop = threading.Event()
    runner = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    runner.start()
    time.sleep(1.0)
    proxy.up()
    assert _wait(lambda: len(sim.saved_tests()) == 1)
    # Down mid-run while new items keep arriving in the LIS.
    proxy.down()
    for req in (2, 3):
        lis.requisition(req)
        lis.item(req, "TSH")
    time.sleep(1.5)
    proxy.up()
    assert _wait(lambda: len(sim.saved_tests()) == 3)
    stop.set()
    runner.join(timeout=30)
    proxy.down()
    outage_lines = [r for r in caplog.records
                    if "banco de dados indisponível" in r.getMessage()]
    back_lines = [r for r in caplog.records if "disponível novamente" in r.getMessage()]
    saved = Counter(t["test_external_id"] for t in sim.saved_tests())
    print(f"\n[banco fora do ar] itens=3 salvos={len(saved)} "
          f"duplicados={sum(n - 1 for n in saved.values())} avisos={len(outage_lines)}")
    assert all(n == 1 for n in saved.values())
    assert len(outage_lines) == 2  # one line per outage (start, mid-run), not per poll
    assert len(back_lines) >= 1
    lis.dispose()
