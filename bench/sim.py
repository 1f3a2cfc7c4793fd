"""The project's simulator in its own process (``python -m bemsoft_monitor.simulator``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bemsoft_monitor.simulator import DEFAULT_TOKEN

ROOT = Path(__file__).resolve().parent.parent


class SimProcess:
    """Start on a free loopback port with the given latency; read calls and saved tests."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.token = DEFAULT_TOKEN

    def __enter__(self) -> SimProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.simserver", "--host", "127.0.0.1",
             "--port", "0", "--latency", str(self.latency_s), "--token", self.token],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "http://" not in first:
            self.proc.kill()
            raise RuntimeError(f"simulador não iniciou: {first!r}")
        self.url = first[first.index("http://"):].strip()
        return self

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:  # noqa: S310 - loopback
            return json.loads(resp.read())

    def calls(self) -> list[dict[str, Any]]:
        return list(self._get("/_sim/calls")["calls"])

    def saved(self) -> list[dict[str, Any]]:
        return list(self._get("/saved")["tests"])

    def saved_count(self) -> int:
        return int(self._get("/saved")["count"])

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
