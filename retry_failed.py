"""``python retry_failed.py [flags]`` is ``bemsoft-monitor retry [flags]``.

Flags as in the original script: ``--dir``, ``--file``, ``--send``, ``--move-ok DIR``,
``--limit N``, ``--verbose``. Works from a source checkout without installing the package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _ensure_importable() -> None:
    """Put ``<repo>/src`` on the path when the package is not installed."""
    if importlib.util.find_spec("bemsoft_monitor") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


if __name__ == "__main__":
    _ensure_importable()
    from bemsoft_monitor.cli import main

    main(["retry", *sys.argv[1:]])
