"""The five scenarios; each returns plain dicts that go to the JSON and the markdown."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .data import CODES, LAB, BenchDb, new_db, seed
from .sim import SimProcess

ROOT = Path(__file__).resolve().parent.parent


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def run_worker(cfg: dict[str, Any], *, timeout_s: float,
               while_running: Any = None) -> dict[str, Any]:
    """Run ``python -m bench.worker`` with ``cfg``; ``while_running(proc)`` runs meanwhile."""
    work = Path(cfg["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out": str(work / "result.json")}
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DB_", "BEMSOFT_", "STATE_", "LOG_", "POLL_", "DEBOUNCE_"))}
    env["BEMSOFT_ENV_FILE"] = str(work / "no-such.env")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"),
                                         env.get("PYTHONPATH", "")])
    with open(work / "worker.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.worker", str(cfg_path)],
                                cwd=ROOT, env=env, stdout=err, stderr=err)
        try:
            if while_running is not None:
                while_running(proc)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out = Path(cfg["out"])
    if proc.returncode != 0 or not out.exists():
        tail = (work / "worker.err").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"worker falhou (código {proc.returncode}):\n{tail}")
    return dict(json.loads(out.read_text()))


def _window(result: dict[str, Any], start: str = "warm") -> dict[str, float]:
    a = result["snaps"].get(start) or {"t": 0, "cpu_s": 0, "polls": 0, "lis_statements": 0,
                                        "state_statements": 0, "lis_checkouts": 0,
                                        "state_checkouts": 0}
    b = result["snaps"]["end"]
    return {k: b[k] - a[k] for k in b}


# --------------------------------------------------------------------------- 1 + 5: drain


def drain_cell(backend: str, *, requisitions: int, latency_s: float, concurrency: int,
               mode: str, cap_s: float, workdir: Path, poll_s: float,
               profile: bool = False) -> dict[str, Any]:
    db = new_db(backend, workdir)
    try:
        seeded = seed(db, requisitions=requisitions)
        with SimProcess(latency_s) as sim:
            cfg = {"mode": mode, "db_url": db.url, "workdir": str(workdir / "worker"),
                   "sim_url": sim.url, "token": sim.token, "poll_seconds": poll_s,
                   "debounce_seconds": 0, "concurrency": concurrency,
                   "max_seconds": cap_s, "stop_delivered": seeded["requisitions"],
                   "profile": profile}
            result = run_worker(cfg, timeout_s=cap_s + 120)
            calls = sim.calls()
    finally:
        db.drop()
    ok = sorted(_ts(c["at"]) for c in calls if c["status"] in (200, 201))
    bad = sum(1 for c in calls if c["status"] not in (200, 201))
    wall = result["snaps"]["end"]["t"]
    sustained = (len(ok) - 1) / (ok[-1] - ok[0]) if len(ok) > 1 and ok[-1] > ok[0] else 0.0
    theory = (concurrency if mode == "monitor" else 1) / latency_s
    cell = {
        "backend": backend, "mode": mode, "latency_ms": round(latency_s * 1000),
        "poll_seconds": poll_s,
        "concurrency": concurrency if mode == "monitor" else 1,
        "requisitions": seeded["requisitions"], "items": seeded["items"],
        "delivered": len(ok), "failed_calls": bad, "complete": len(ok) >= seeded["requisitions"],
        "stop_reason": result["stop_reason"], "wall_s": round(wall, 2),
        "orders_per_s_end_to_end": round(len(ok) / wall, 2) if wall else 0.0,
        "orders_per_s_sustained": round(sustained, 2),
        "theoretical_per_s": round(theory, 2),
        "ratio_sustained": round(sustained / theory, 3),
        "ratio_end_to_end": round(len(ok) / wall / theory, 3) if wall else 0.0,
        "cpu_s": round(result["snaps"]["end"]["cpu_s"], 2),
        "peak_rss_mb": round(result["rss"].get("VmHWM_kb", result["rss"]["ru_maxrss_kb"]) / 1024,
                             1),
    }
    if mode == "baseline":
        cell["baseline"] = result["baseline"]
    if profile:
        cell["profile"] = str(workdir / "worker" / "profile.pstats")
    return cell


# --------------------------------------------------------------------------- 2: steady state


def steady(backend: str, *, rate: float, seconds: float, latency_s: float, poll_s: float,
           concurrency: int, workdir: Path) -> dict[str, Any]:
    db = new_db(backend, workdir)
    inserted: dict[int, float] = {}
    try:
        seed(db, requisitions=0)
        engine = sa.create_engine(db.url, connect_args={"timeout": 30}
                                  if backend == "sqlite" else {})
        t = _lis_tables()
        with SimProcess(latency_s) as sim:
            cfg = {"mode": "monitor", "db_url": db.url, "workdir": str(workdir / "worker"),
                   "sim_url": sim.url, "token": sim.token, "poll_seconds": poll_s,
                   "debounce_seconds": 0, "concurrency": concurrency,
                   "max_seconds": seconds + poll_s + 90}

            def insert_then_stop(proc: subprocess.Popen[bytes]) -> None:
                _wait_started(db, proc)
                per_req = 4
                interval = per_req / rate
                item_id, req_id = 1, 1
                start = time.monotonic()
                n_reqs = int(seconds * rate / per_req)
                for k in range(n_reqs):
                    target = start + k * interval
                    time.sleep(max(0.0, target - time.monotonic()))
                    now = dt.datetime.now()
                    with engine.begin() as conn:
                        conn.execute(sa.insert(t.requisition), [{
                            "codsolicitacao": req_id, "codpaciente": (req_id % 1000) + 1,
                            "dtaentrada": now, "Hora": now.strftime("%H:%M")}])
                        conn.execute(sa.insert(t.item), [{
                            "CodItemSol": item_id + j, "CodSolicitacao": req_id,
                            "CodConvExames": CODES[j], "DescExames": f"EXAME {CODES[j]}",
                            "NomeTerceirizado": LAB, "DataEntrada": now, "Origem": "Sistema"}
                            for j in range(per_req)])
                    committed = time.time()
                    for j in range(per_req):
                        inserted[item_id + j] = committed
                    item_id += per_req
                    req_id += 1
                deadline = time.monotonic() + poll_s + 60
                while time.monotonic() < deadline and sim.saved_count() < len(inserted):
                    time.sleep(0.5)
                proc.send_signal(signal.SIGTERM)

            result = run_worker(cfg, timeout_s=seconds + poll_s + 150,
                                while_running=insert_then_stop)
            saved = sim.saved()
        engine.dispose()
    finally:
        db.drop()
    lat = []
    for rec in saved:
        item = int(str(rec["test_external_id"]).split("-")[-1])
        if item in inserted:
            lat.append(_ts(rec["saved_at"]) - inserted[item])
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 else [0.0] * 99
    return {"backend": backend, "items_inserted": len(inserted), "items_delivered": len(lat),
            "rate_items_per_s": rate, "seconds": seconds, "poll_seconds": poll_s,
            "latency_ms": round(latency_s * 1000), "concurrency": concurrency,
            "p50_s": round(q[49], 3), "p95_s": round(q[94], 3), "p99_s": round(q[98], 3),
            "max_s": round(lat[-1], 3) if lat else None,
            "cpu_s": round(result["snaps"]["end"]["cpu_s"], 2)}


def _lis_tables() -> Any:
    from bemsoft_monitor.source import lis_tables

    return lis_tables(None)


def _wait_started(db: BenchDb, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until the monitor has created its state tables and the checkpoint row."""
    engine = sa.create_engine(db.url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with engine.connect() as conn:
                    if conn.execute(sa.text('SELECT count(*) FROM "_MonitorLease"')).scalar():
                        return
            except sa.exc.SQLAlchemyError:
                pass
            time.sleep(0.2)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- 3: idle


def idle(backend: str, *, seconds: float, poll_s: float, warm: float,
         workdir: Path) -> dict[str, Any]:
    db = new_db(backend, workdir)
    try:
        seed(db, requisitions=0)
        with SimProcess(0.0) as sim:
            cfg = {"mode": "monitor", "db_url": db.url, "workdir": str(workdir / "worker"),
                   "sim_url": sim.url, "token": sim.token, "poll_seconds": poll_s,
                   "debounce_seconds": 0, "concurrency": 4, "warmup_s": warm,
                   "max_seconds": warm + seconds}
            result = run_worker(cfg, timeout_s=warm + seconds + 60)
            calls = sim.calls()
    finally:
        db.drop()
    w = _window(result)
    minutes = w["t"] / 60
    polls = max(1, w["polls"])
    return {
        "backend": backend, "seconds": round(w["t"], 1), "warmup_s": warm, "poll_seconds": poll_s,
        "polls": w["polls"], "cpu_percent_one_core": round(100 * w["cpu_s"] / w["t"], 3),
        "lis_statements_per_min": round(w["lis_statements"] / minutes, 1),
        "state_statements_per_min": round(w["state_statements"] / minutes, 1),
        "lis_checkouts_per_min": round(w["lis_checkouts"] / minutes, 1),
        "state_checkouts_per_min": round(w["state_checkouts"] / minutes, 1),
        "lis_statements_per_poll": round(w["lis_statements"] / polls, 2),
        "state_statements_per_poll": round(w["state_statements"] / polls, 2),
        "all_statements_per_poll": round((w["lis_statements"] + w["state_statements"]) / polls,
                                         2),
        "http_calls": len(calls),
    }


# --------------------------------------------------------------------------- 4: memory


def memory(backend: str, *, items: int, cap_s: float, poll_s: float, latency_s: float,
           debounce_s: float, workdir: Path) -> dict[str, Any]:
    db = new_db(backend, workdir)
    try:
        t0 = time.monotonic()
        seeded = seed(db, items=items)
        seed_s = time.monotonic() - t0
        with SimProcess(latency_s) as sim:
            cfg = {"mode": "monitor", "db_url": db.url, "workdir": str(workdir / "worker"),
                   "sim_url": sim.url, "token": sim.token, "poll_seconds": poll_s,
                   "debounce_seconds": debounce_s, "concurrency": 4, "max_seconds": cap_s,
                   "stop_checkpoint": seeded["max_item_id"]}
            result = run_worker(cfg, timeout_s=cap_s + 120)
    finally:
        db.drop()
    rss = result["rss"]
    items_state = result.get("store_counts", {}).get("items", {})
    return {"backend": backend, "backlog_items": seeded["items"],
            "backlog_requisitions": seeded["requisitions"], "seed_s": round(seed_s, 1),
            "debounce_seconds": debounce_s, "poll_seconds": poll_s,
            "ran_s": round(result["snaps"]["end"]["t"], 1), "stop_reason": result["stop_reason"],
            "checkpoint": result.get("checkpoint"), "items_ingested": sum(items_state.values()),
            "orders": result.get("store_counts", {}).get("orders", {}),
            "peak_rss_mb": round(rss.get("VmHWM_kb", rss["ru_maxrss_kb"]) / 1024, 1),
            "ru_maxrss_mb": round(rss["ru_maxrss_kb"] / 1024, 1)}


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["cleanup", "drain_cell", "idle", "memory", "steady"]


# --------------------------------------------------------------------------- plan


def query_plan(*, rows: int) -> dict[str, Any]:
    """EXPLAIN of the poll query (caught-up checkpoint and cold start) on ``rows`` items."""
    from .plan import build_large_itemsol, explain, itemsol_access, plan_text, poll_query_sql

    db = new_db("postgres", Path("."))
    try:
        engine = sa.create_engine(db.url)
        # new_db created the tables already; start from an empty schema for the builder.
        from bemsoft_monitor.source import lis_tables

        lis_tables(None).item.metadata.drop_all(engine)
        build_large_itemsol(engine, rows)
        out: dict[str, Any] = {"rows": rows}
        for name, after in (("caught_up", max(0, rows - 2000)), ("cold_start", 0)):
            for query, sql in poll_query_sql(after_id=after).items():
                access = itemsol_access(explain(engine, sql))
                out[f"{name}_{query}"] = {
                    "after_id": after, "query": query, "itemsol_access": access,
                    "uses_pkey_index": bool(access) and all(
                        k in ("Index Scan", "Index Only Scan") and (i or "").endswith("pkey")
                        for k, i in access),
                    "plan": plan_text(engine, sql)}
        engine.dispose()
        return out
    finally:
        db.drop()
