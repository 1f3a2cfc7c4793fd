"""``python -m bench``: run the scenarios, write the JSON and BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import scenarios
from .data import postgres_available
from .machine import machine_info
from .report import render

ROOT = Path(__file__).resolve().parent.parent
ALL = ("drain", "baseline", "steady", "idle", "memory", "plan")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--scenarios", default=",".join(ALL))
    p.add_argument("--requisitions", type=int, default=10_000,
                   help="backlog of the drain scenario (1-8 items each)")
    p.add_argument("--latencies", default="0.05,0.2", help="simulator latency, seconds")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--drain-cap", type=float, default=60.0,
                   help="seconds per drain cell; a cell that has not drained by then is a "
                        "time-bounded sample")
    p.add_argument("--poll-seconds", type=float, default=5.0, help="POLL_SECONDS of the monitor")
    p.add_argument("--steady-rate", type=float, default=20.0, help="items inserted per second")
    p.add_argument("--steady-seconds", type=float, default=60.0)
    p.add_argument("--steady-latency", type=float, default=0.05)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--idle-warmup", type=float, default=10.0,
                   help="seconds before the idle window (start-up, catalogue, first polls)")
    p.add_argument("--memory-items", default="100000,1000000")
    p.add_argument("--memory-cap", type=float, default=300.0,
                   help="seconds the monitor runs over each memory backlog at most")
    p.add_argument("--memory-poll", type=float, default=0.5,
                   help="POLL_SECONDS in the memory scenario (to reach the end of the backlog)")
    p.add_argument("--memory-debounce", type=float, default=300.0,
                   help="DEBOUNCE_SECONDS in the memory scenario (product default: 300)")
    p.add_argument("--fast-poll", type=float, default=0.5,
                   help="extra drain cell at the lowest latency and highest concurrency with "
                        "this POLL_SECONDS (0 = skip)")
    p.add_argument("--plan-rows", type=int, default=1_000_000)
    p.add_argument("--profile", action="store_true",
                   help="also run the product's largest 50 ms cell under cProfile")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--render-only", action="store_true",
                   help="only rewrite the markdown from the existing JSON (after editing "
                        "bench/NOTES.md)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "latest.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.requisitions = 30
        args.latencies = "0.01"
        args.concurrency = "4"
        args.drain_cap = 10.0
        args.poll_seconds = 0.2
        args.steady_seconds = 1.5
        args.steady_rate = 20.0
        args.steady_latency = 0.01
        args.idle_seconds = 1.5
        args.idle_warmup = 1.0
        args.memory_items = "2000"
        args.memory_cap = 10.0
        args.memory_poll = 0.2
        args.memory_debounce = 0.0
        args.fast_poll = 0.0
        args.plan_rows = 20_000
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.render_only:
        args.markdown.write_text(render(json.loads(args.json.read_text(encoding="utf-8"))),
                                 encoding="utf-8")
        return 0
    wanted = set(args.scenarios.split(","))
    backends = args.backends.split(",")
    pg_problem = postgres_available()
    if pg_problem and "postgres" in backends:
        log(f"PostgreSQL indisponível ({pg_problem}); só SQLite")
        backends = [b for b in backends if b != "postgres"]
    workroot = args.workdir or Path(tempfile.mkdtemp(prefix="bemsoft-bench-"))
    started = time.time()
    out: dict[str, Any] = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "drain": [], "baseline": [], "steady": [], "idle": [], "memory": [], "plan": None,
        "profile": None, "postgres_problem": pg_problem,
    }
    n = 0

    def work() -> Path:
        nonlocal n
        n += 1
        return workroot / f"run{n:03d}"

    def save() -> None:
        out["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        out["elapsed_s"] = round(time.time() - started, 1)
        args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        args.markdown.write_text(render(out), encoding="utf-8")

    for backend in backends:
        for latency in _floats(args.latencies):
            if "baseline" in wanted:
                log(f"baseline {backend} {latency * 1000:.0f} ms")
                out["baseline"].append(scenarios.drain_cell(
                    backend, requisitions=args.requisitions, latency_s=latency, concurrency=1,
                    mode="baseline", cap_s=args.drain_cap, workdir=work(),
                    poll_s=args.poll_seconds))
                save()
            if "drain" in wanted:
                for conc in _ints(args.concurrency):
                    log(f"drain {backend} {latency * 1000:.0f} ms concurrency {conc}")
                    out["drain"].append(scenarios.drain_cell(
                        backend, requisitions=args.requisitions, latency_s=latency,
                        concurrency=conc, mode="monitor", cap_s=args.drain_cap, workdir=work(),
                        poll_s=args.poll_seconds))
                    save()
                if args.fast_poll and latency == min(_floats(args.latencies)):
                    conc = max(_ints(args.concurrency))
                    log(f"drain {backend} {latency * 1000:.0f} ms concurrency {conc} "
                        f"POLL_SECONDS={args.fast_poll}")
                    out["drain"].append(scenarios.drain_cell(
                        backend, requisitions=args.requisitions, latency_s=latency,
                        concurrency=conc, mode="monitor", cap_s=args.drain_cap, workdir=work(),
                        poll_s=args.fast_poll))
                    save()
        if "steady" in wanted:
            log(f"steady {backend}")
            out["steady"].append(scenarios.steady(
                backend, rate=args.steady_rate, seconds=args.steady_seconds,
                latency_s=args.steady_latency, poll_s=args.poll_seconds, concurrency=4,
                workdir=work()))
            save()
        if "idle" in wanted:
            log(f"idle {backend}")
            out["idle"].append(scenarios.idle(backend, seconds=args.idle_seconds,
                                              poll_s=args.poll_seconds, warm=args.idle_warmup,
                                              workdir=work()))
            save()
        if "memory" in wanted:
            for items in _ints(args.memory_items):
                log(f"memory {backend} {items} items")
                out["memory"].append(scenarios.memory(
                    backend, items=items, cap_s=args.memory_cap, poll_s=args.memory_poll,
                    latency_s=0.05, debounce_s=args.memory_debounce, workdir=work()))
                save()
    if "plan" in wanted and pg_problem is None:
        log(f"plan on {args.plan_rows} rows")
        out["plan"] = scenarios.query_plan(rows=args.plan_rows)
        save()
    if args.profile:
        backend = backends[0]
        latency = _floats(args.latencies)[0]
        conc = max(_ints(args.concurrency))
        log(f"profile {backend} {latency * 1000:.0f} ms concurrency {conc}")
        cell = scenarios.drain_cell(
            backend, requisitions=args.requisitions, latency_s=latency, concurrency=conc,
            mode="monitor", cap_s=args.drain_cap, workdir=work(), poll_s=args.poll_seconds,
            profile=True)
        cell["top"] = top_functions(Path(cell.pop("profile")))
        out["profile"] = cell
        save()
    save()
    if args.workdir is None:
        scenarios.cleanup(workroot)
    log(f"fim: {args.json} e {args.markdown}")
    return 0


def top_functions(path: Path, limit: int = 15) -> list[dict[str, Any]]:
    """The monitor loop thread's functions by cumulative time."""
    stats = pstats.Stats(str(path))
    rows = []
    for (file, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line} {name}", "calls": ncalls,
                     "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3),
                     "file": file})
    rows = [r for r in rows if "bemsoft_monitor" in r["file"] or "sqlalchemy" in r["file"]
            or "sqlite3" in r["function"] or "psycopg" in r["file"]]
    rows.sort(key=lambda r: r["cumtime_s"], reverse=True)
    for r in rows:
        r["file"] = r["file"].split("site-packages/")[-1].split("/src/")[-1]
    return rows[:limit]


if __name__ == "__main__":
    sys.exit(main())
