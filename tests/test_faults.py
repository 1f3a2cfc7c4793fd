"""Fault injection with real processes: SIGKILL at random moments, two monitors, graceful stop.

All traffic is on loopback; the simulator records every saved test, so lost and duplicated
items are counted exactly. Each test prints its counts.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from bemsoft_monitor.simulator import Simulator

from .conftest import LAB, Lis


def _ts(value: object) -> dt.datetime:
    """A stored time (SQLite gives text through a plain SQL query)."""
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))

KILL_RUNS = int(os.environ.get("FAULT_KILL_RUNS", "30"))
CODES = ("FE", "TSH", "T4L", "HMG", "PSA")


def monitor_cmd() -> list[str]:
    return [sys.executable, "-m", "bemsoft_monitor", "run"]


def write_env(folder: Path, sim: Simulator, url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env.update({
        "DB_URL": url,
        "TERCEIROS": LAB,
        "POLL_SECONDS": "0.05",
        "DEBOUNCE_SECONDS": "0",
        "INITIAL_ITEM_ID": "0",
        "BEMSOFT_BASE_URL": sim.url,
        "BEMSOFT_TOKEN": sim.token,
        "BEMSOFT_BACKOFF": "0.05",
        "BEMSOFT_BACKOFF_MAX": "0.5",
        "BEMSOFT_CONCURRENCY": "4",
        "BEMSOFT_CATALOG_CACHE": str(folder / "catalogo.json"),
        "FAILED_DIR": str(folder / "failed"),
        "REFUSED_REPORT": str(folder / "recusados.csv"),
        "DEFAULT_BIRTHDATE": "1970-01-01",
        "SHUTDOWN_GRACE_SECONDS": "5",
        "PYTHONUNBUFFERED": "1",
        "BEMSOFT_ENV_FILE": str(folder / "vazio.env"),
    })
    env.update(extra)
    (folder / "vazio.env").write_text("", encoding="utf-8")
    return env


class StderrReader:
    """Collects a child's stderr in a thread, so a test can wait for a line while it runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        assert proc.stderr is not None
        self.stream = proc.stderr
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.stream:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: needle in "".join(self.lines), timeout_s)

    def finish(self) -> str:
        self.thread.join(timeout=30)
        return self.text()


class Writer(threading.Thread):
    """The lab's system: requisitions keep arriving, items one transaction at a time."""

    def __init__(self, lis: Lis, *, seed: int, start_req: int = 1) -> None:
        super().__init__(daemon=True)
        self.lis = lis
        self.rng = random.Random(seed)
        self.req = start_req
        self.items = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.lis.requisition(self.req)
            for code in self.rng.sample(CODES, self.rng.randint(1, 3)):
                self.lis.item(self.req, code)
                self.items += 1
                self.stop.wait(self.rng.uniform(0.0, 0.03))
            self.req += 1
            self.stop.wait(self.rng.uniform(0.01, 0.05))


def lis_item_ids(lis: Lis) -> set[str]:
    with lis.engine.connect() as conn:
        ids = conn.execute(sa.select(lis.t.item.c.CodItemSol)).scalars().all()
    return {f"item-{i}" for i in ids}


def counts(name: str, expected: set[str], sim: Simulator, **extra: int) -> tuple[int, int]:
    saved = Counter(t["test_external_id"] for t in sim.saved_tests())
    lost = len(expected - set(saved))
    dup = sum(n - 1 for n in saved.values())
    extras = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"\n[{name}] itens={len(expected)} salvos={len(saved)} perdidos={lost} "
          f"duplicados={dup} chamadas={len(sim.calls())} {extras}")
    return lost, dup


def run_until_quiet(env: dict[str, str], cwd: Path, sim: Simulator, expected: set[str],
                    timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(monitor_cmd(), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        saved = {t["test_external_id"] for t in sim.saved_tests()}
        if expected <= saved:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # let the last answers be recorded
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("FAULT_SEED", str(random.randrange(1_000_000))))
    rng = random.Random(seed)
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    with Simulator(latency_s=0.03) as sim:
        env = write_env(tmp_path, sim, url)
        writer = Writer(lis, seed=seed)
        writer.start()
        kills = 0
        try:
            for _ in range(KILL_RUNS):
                proc = subprocess.Popen(monitor_cmd(), cwd=tmp_path, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(0.4, 1.4))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                kills += 1
        finally:
            writer.stop.set()
            writer.join(timeout=10)
        expected = lis_item_ids(lis)
        done = run_until_quiet(env, tmp_path, sim, expected)
        assert done.returncode == 0, done.stderr[-3000:]
        lost, dup = counts("SIGKILL", expected, sim, mortes=kills, semente=seed)
        assert kills >= 30 or KILL_RUNS < 30
        assert (lost, dup) == (0, 0), f"semente {seed}"
    lis.dispose()


@pytest.mark.slow
def test_two_monitors_never_send_concurrently_and_the_survivor_takes_over(
        tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    with Simulator(latency_s=0.02) as sim:
        env = write_env(tmp_path, sim, url)
        writer = Writer(lis, seed=7)
        writer.start()
        first = subprocess.Popen(monitor_cmd(), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        first_log = StderrReader(first)
        # Start the second only once the first holds the lease (a loaded machine starts
        # processes slowly), and kill the first only once the second is waiting for it.
        assert first_log.wait_for("trava do monitor obtida", 60), first_log.text()[-3000:]
        second = subprocess.Popen(monitor_cmd(), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        second_log = StderrReader(second)
        assert second_log.wait_for("outro monitor está ativo", 60), second_log.text()[-3000:]
        time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        time.sleep(1.0)
        writer.stop.set()
        writer.join(timeout=10)
        expected = lis_item_ids(lis)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if expected <= {t["test_external_id"] for t in sim.saved_tests()}:
                break
            time.sleep(0.1)
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        err2 = second_log.finish()
        first_log.finish()
        assert second.returncode == 0, err2[-3000:]
        assert "outro monitor está ativo" in err2
        assert "trava do monitor obtida" in err2
        lost, dup = counts("dois monitores", expected, sim)
        assert (lost, dup) == (0, 0)
    # Never concurrently: no send of one monitor overlaps a send of the other. The killed
    # monitor's last sends are closed when the survivor takes over, before it sends.
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            'SELECT "Holder", "StartedAt", "FinishedAt" FROM "_MonitorAttempt" '
            'WHERE "Holder" IS NOT NULL ORDER BY "StartedAt"')).all()
    engine.dispose()
    holders = sorted({r.Holder for r in rows})
    spans = {h: (min(_ts(r.StartedAt) for r in rows if r.Holder == h),
                 max(_ts(r.FinishedAt or r.StartedAt) for r in rows if r.Holder == h))
             for h in holders}
    print(f"envios por monitor: { {h: sum(r.Holder == h for r in rows) for h in holders} }")
    assert len(holders) == 2, holders
    (_a_start, a_end), (b_start, _b_end) = sorted(spans.values())
    assert a_end <= b_start, spans
    lis.dispose()


@pytest.mark.slow
def test_graceful_stop_finishes_or_releases_in_flight_sends_and_exits_zero(
        tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    for req in range(1, 9):
        lis.requisition(req)
        lis.item(req, "FE")
    expected = lis_item_ids(lis)
    with Simulator(latency_s=2.0) as sim:
        # Grace shorter than the answer time: in-flight sends are released, not lost.
        env = write_env(tmp_path, sim, url, SHUTDOWN_GRACE_SECONDS="0.5",
                        BEMSOFT_CONCURRENCY="2")
        proc = subprocess.Popen(monitor_cmd(), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(2.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        stop_s = time.monotonic() - started
        assert proc.returncode == 0, err[-3000:]
        assert "aguardando" in err and "envio(s)" in err
        assert stop_s < 5
        # The next run delivers the rest exactly once (409 for the released ones).
        done = run_until_quiet(write_env(tmp_path, sim, url, SHUTDOWN_GRACE_SECONDS="5"),
                               tmp_path, sim, expected)
        assert done.returncode == 0, done.stderr[-3000:]
        lost, dup = counts("parada graciosa", expected, sim, parada_ms=int(stop_s * 1000))
        assert (lost, dup) == (0, 0)
    lis.dispose()
