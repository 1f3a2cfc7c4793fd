"""``python main.py`` runs the monitor, exactly like ``bemsoft-monitor run``.

``python main.py <args>`` passes the arguments to the CLI (``python main.py run --once``,
``python main.py status``). Works from a source checkout without installing the package,
and is the entry script of the PyInstaller executable (``BemsoftMonitor.exe``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Options that belong to the root command; any other leading option is a ``run`` option
# (``python main.py --once`` keeps working as it did with the original script).
_ROOT_OPTIONS = frozenset({"--version", "--help", "-h"})


def _ensure_importable() -> None:
    """Put ``<repo>/src`` on the path when the package is not installed."""
    if importlib.util.find_spec("bemsoft_monitor") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def cli_args(argv: list[str]) -> list[str]:
    """Arguments for the CLI: none, or only ``run`` options, mean ``run``."""
    if not argv or (argv[0].startswith("-") and argv[0] not in _ROOT_OPTIONS):
        return ["run", *argv]
    return argv


if __name__ == "__main__":
    _ensure_importable()
    from bemsoft_monitor.cli import main

    main(cli_args(sys.argv[1:]))
