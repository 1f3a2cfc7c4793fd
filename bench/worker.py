"""Child process of the benchmark: runs the monitor (or the baseline) and reports its own costs.

``python -m bench.worker CONFIG.json`` reads the run's configuration, runs until a stop
condition, the time cap or SIGTERM, and writes a JSON result next to it: CPU time
(``os.times``), peak RSS (``/proc/self/status`` VmHWM and ``ru_maxrss``), SQL statements
and pool checkouts per engine (SQLAlchemy events), poll count, delivered count.
"""

from __future__ import annotations

import cProfile
import datetime as dt
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bemsoft_monitor.app import build_monitor, build_parts
from bemsoft_monitor.config import Settings
from bemsoft_monitor.logsetup import setup_logging

from .baseline import run_baseline
from .data import LAB


class Counters:
    """SQL statements and pool checkouts of one engine.

    SQLite's explicit BEGIN (issued by the project's connection hook, in-process) is counted
    apart: it is not a round trip to a server.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.statements = 0
        self.begins = 0
        self.checkouts = 0
        self.lock = threading.Lock()
        sa.event.listen(engine, "before_cursor_execute", self._stmt)
        sa.event.listen(engine, "checkout", self._checkout)

    def _stmt(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        with self.lock:
            if statement.lstrip().upper().startswith("BEGIN"):
                self.begins += 1
            else:
                self.statements += 1

    def _checkout(self, *_args: Any) -> None:
        with self.lock:
            self.checkouts += 1

    def snap(self) -> dict[str, int]:
        with self.lock:
            return {"statements": self.statements, "checkouts": self.checkouts}


def settings_for(cfg: dict[str, Any]) -> Settings:
    work = Path(cfg["workdir"])
    values: dict[str, Any] = {
        "db_url": cfg["db_url"],
        "terceiros": LAB,
        "poll_seconds": cfg.get("poll_seconds", 5.0),
        "debounce_seconds": cfg.get("debounce_seconds", 0),
        "batch_size": cfg.get("batch_size", 500),
        "bemsoft_concurrency": cfg.get("concurrency", 4),
        "initial_item_id": "0",
        "failed_dir": work / "failed",
        "refused_report": work / "recusados.csv",
        "bemsoft_catalog_cache": work / "catalogo.json",
        "bemsoft_base_url": cfg["sim_url"],
        "bemsoft_token": cfg["token"],
        "bemsoft_timeout": 30,
        "default_birthdate": dt.date(1970, 1, 1),
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def peak_rss_kb() -> dict[str, int]:
    out = {"ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key.strip() + "_kb"] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Probe:
    """A separate, uninstrumented connection that reads progress for the stop condition."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)

    def delivered(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(
                'SELECT count(*) FROM "_MonitorOrder" WHERE "State" = \'delivered\'')).scalar()
                or 0)

    def checkpoint(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(sa.text(
                'SELECT "LastItemId" FROM "_MonitorState"')).scalar()
            return int(value or 0)


def main(argv: list[str]) -> int:
    cfg_path = Path(argv[0])
    cfg = json.loads(cfg_path.read_text())
    work = Path(cfg["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    settings = settings_for(cfg)
    setup_logging(level=cfg.get("log_level", "INFO"), log_file=work / "monitor.log",
                  stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    t_start = time.monotonic()
    cpu_start = cpu_s()
    parts = build_parts(settings)
    counters = {"lis": Counters(parts.lis_engine), "state": Counters(parts.store.engine)}
    polls = [0]
    delivered_baseline = [0]
    baseline_info: dict[str, Any] = {}
    monitor = None
    if cfg["mode"] == "monitor":
        monitor = build_monitor(parts, show_payload=False)
        real_cycle = monitor.cycle

        def counted_cycle(*, drain: bool = True) -> Any:
            polls[0] += 1
            return real_cycle(drain=drain)

        monitor.cycle = counted_cycle  # type: ignore[method-assign]

    def snap() -> dict[str, Any]:
        return {"t": time.monotonic() - t_start, "cpu_s": cpu_s() - cpu_start, "polls": polls[0],
                **{f"{k}_{n}": v for k, c in counters.items() for n, v in c.snap().items()}}

    snaps: dict[str, Any] = {}
    probe = Probe(cfg["db_url"]) if (cfg.get("stop_delivered") or cfg.get("stop_checkpoint")) \
        else None
    stop_reason = ["signal"]

    def watch() -> None:
        warm = cfg.get("warmup_s")
        deadline = t_start + float(cfg.get("max_seconds", 60))
        while not stop.wait(0.5):
            now = time.monotonic()
            if warm is not None and "warm" not in snaps and now - t_start >= warm:
                snaps["warm"] = snap()
            if now >= deadline:
                stop_reason[0] = "time cap"
                break
            try:
                if probe is not None and cfg.get("stop_delivered"):
                    done = (probe.delivered() if monitor is not None else delivered_baseline[0])
                    if done >= cfg["stop_delivered"]:
                        stop_reason[0] = "all delivered"
                        break
                if (probe is not None and cfg.get("stop_checkpoint")
                        and probe.checkpoint() >= cfg["stop_checkpoint"]):
                    stop_reason[0] = "backlog ingested"
                    break
            except sa.exc.SQLAlchemyError:
                continue  # busy database: look again on the next tick
        snaps["end"] = snap()
        stop.set()

    watcher = threading.Thread(target=watch, name="bench-watch", daemon=True)
    watcher.start()
    profiler = cProfile.Profile() if cfg.get("profile") else None
    if profiler is not None:
        profiler.enable()
    if monitor is not None:
        monitor.run(stop)
    else:
        baseline_info = run_baseline(parts, stop, delivered_baseline)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(work / "profile.pstats"))
    watcher.join(timeout=10)
    snaps.setdefault("end", snap())
    result = {
        "mode": cfg["mode"],
        "stop_reason": stop_reason[0],
        "snaps": snaps,
        "rss": peak_rss_kb(),
        "baseline": baseline_info,
        "delivered_baseline": delivered_baseline[0],
    }
    if monitor is not None:
        result["store_counts"] = parts.store.counts()
        result["checkpoint"] = parts.store.checkpoint()
    Path(cfg["out"]).write_text(json.dumps(result, indent=2, default=str))
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
