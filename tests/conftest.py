"""Shared fixtures: real SQLite files, the real PostgreSQL server, the simulator on loopback."""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bemsoft_monitor.app import Parts, build_monitor, build_parts
from bemsoft_monitor.config import Settings
from bemsoft_monitor.demo import create_lis
from bemsoft_monitor.engine import Monitor
from bemsoft_monitor.simulator import Simulator
from bemsoft_monitor.source import LisTables

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
LAB = "DIAGNÓSTICO DO BRASIL - DB"
T0 = dt.datetime(2026, 7, 1, 11, 0, tzinfo=dt.timezone.utc)  # 08:00 in Brazil


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's .env or variables."""
    for name in list(os.environ):
        if name.startswith(("DB_", "BEMSOFT_", "STATE_", "LOG_", "PHYSICIAN_", "DEFAULT_",
                            "TERCEIRO", "POLL_", "DEBOUNCE_", "FAILED_", "HTTP_ADDR",
                            "PAINEL_", "ALERT_", "SMTP_", "LEASE_", "INITIAL_", "TEST_CODE",
                            "OUT_OF_ORDER", "BATCH_SIZE", "SHUTDOWN_", "LAB_UTC")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BEMSOFT_ENV_FILE", str(tmp_path / "no-such.env"))


class FakeClock:
    """Deterministic clock: ``wait`` advances time instead of sleeping."""

    def __init__(self, start: dt.datetime = T0) -> None:
        self.t = start
        self.lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self.lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.t += dt.timedelta(seconds=seconds)

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.advance(seconds)
        return stop.is_set()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _postgres_or_skip() -> sa.Engine:
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # any failure means "no server here"
        engine.dispose()
        reason = f"PostgreSQL indisponível em {POSTGRES_URL}: {type(exc).__name__}"
        if IN_CI:
            pytest.fail(reason + " (obrigatório em CI)")
        print(f"\nSKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return engine


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema, used through search_path, dropped afterwards."""
    admin = _postgres_or_skip()
    schema = "t_" + uuid.uuid4().hex[:12]
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The LIS (and state) database: a SQLite file, then the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as s:
        yield s


class Lis:
    """Test helper that writes LIS rows the way the lab's system would."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        self.t: LisTables = create_lis(self.engine)
        self._next_item = 1000

    def patient(self, cod: int = 1, **kw: Any) -> int:
        row = {"codpaciente": cod, "nome": "MARIA DA SILVA", "cpf": "123.456.789-09",
               "datanasc": dt.datetime(1990, 5, 15), "sexo": "F"}
        row.update(kw)
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.t.patient), [row])
        return cod

    def requisition(self, cod: int, *, patient: int = 1, **kw: Any) -> int:
        row = {"codsolicitacao": cod, "codpaciente": patient,
               "dtaentrada": dt.datetime(2026, 7, 1), "Hora": "08:00"}
        row.update(kw)
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.t.requisition), [row])
        return cod

    def item(self, req: int, code: str = "FE", *, item_id: int | None = None,
             lab: str = LAB, conn: sa.Connection | None = None, **kw: Any) -> int:
        if item_id is None:
            self._next_item += 1
            item_id = self._next_item
        else:
            self._next_item = max(self._next_item, item_id)
        row = {"CodItemSol": item_id, "CodSolicitacao": req, "CodConvExames": code,
               "DescExames": f"EXAME {code}", "NomeTerceirizado": lab,
               "DataEntrada": dt.datetime(2026, 7, 1, 8, 10), "Origem": "Sistema"}
        row.update(kw)
        if conn is not None:
            conn.execute(sa.insert(self.t.item), [row])
        else:
            with self.engine.begin() as c:
                c.execute(sa.insert(self.t.item), [row])
        return item_id

    def delete_item(self, item_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(self.t.item).where(self.t.item.c.CodItemSol == item_id))

    def dispose(self) -> None:
        self.engine.dispose()


@pytest.fixture
def lis(db_url: str) -> Iterator[Lis]:
    helper = Lis(db_url)
    yield helper
    helper.dispose()


def make_settings(db_url: str, tmp_path: Path, sim: Simulator | None = None,
                  **overrides: Any) -> Settings:
    """Settings for a test monitor: everything under tmp_path, simulator on loopback."""
    values: dict[str, Any] = {
        "db_url": db_url,
        "terceiros": LAB,
        "poll_seconds": 0.05,
        "debounce_seconds": 0,
        "initial_item_id": "0",
        "failed_dir": tmp_path / "failed",
        "refused_report": tmp_path / "recusados.csv",
        "bemsoft_catalog_cache": tmp_path / "catalogo.json",
        "bemsoft_base_url": sim.url if sim else "http://127.0.0.1:9",
        "bemsoft_token": sim.token if sim else "t0ken-de-teste",
        "bemsoft_timeout": 5,
        "bemsoft_backoff": 1,
        "bemsoft_backoff_max": 4,
        "default_birthdate": dt.date(1970, 1, 1),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def make_monitor(settings: Settings, clock: FakeClock | None = None,
                 **kw: Any) -> tuple[Monitor, Parts]:
    parts = build_parts(settings)
    return build_monitor(parts, clock=clock, show_payload=kw.get("show_payload", False)), parts


def drive(monitor: Monitor, clock: FakeClock | None = None, *, cycles: int = 30,
          step_s: float = 1.0) -> None:
    """Cycle until nothing is pending or due (advancing the fake clock between cycles)."""
    for _ in range(cycles):
        monitor.cycle(drain=True)
        counts = monitor.store.counts()["orders"]
        if not counts.get("pending") and not counts.get("sending") \
                and monitor.store.next_due_at() is None:
            return
        if clock is not None:
            clock.advance(step_s)
