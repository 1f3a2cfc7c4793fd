"""Benchmark databases: a fresh SQLite file or PostgreSQL schema, seeded with a LIS backlog."""

from __future__ import annotations

import datetime as dt
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from bemsoft_monitor.demo import create_lis
from bemsoft_monitor.source import LisTables

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
LAB = "DIAGNÓSTICO DO BRASIL - DB"
# Codes with exactly one entry (one specimen) in the packaged sample catalogue.
CODES = ("HMG", "FE", "TSH", "T4L", "T3", "UREIA", "COL", "HDL")
PATIENTS = 1000
ITEM_COLS = ("CodItemSol", "CodSolicitacao", "CodConvExames", "DescExames", "NomeTerceirizado",
             "DataEntrada", "Origem")
REQ_COLS = ("codsolicitacao", "codpaciente", "dtaentrada", "Hora")
CHUNK = 20_000


@dataclass
class BenchDb:
    """One database used as LIS and state store; ``drop`` removes it."""

    backend: str
    url: str
    path: Path | None = None
    schema: str | None = None

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.url)

    def drop(self) -> None:
        if self.backend == "sqlite" and self.path is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
        elif self.schema is not None:
            admin = sa.create_engine(POSTGRES_URL)
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            admin.dispose()


def postgres_available() -> str | None:
    """None when the server answers, else the reason."""
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # any failure means "no server"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        engine.dispose()
    return None


def new_db(backend: str, workdir: Path) -> BenchDb:
    """A fresh, empty database with the four LIS tables."""
    if backend == "sqlite":
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"lis-{uuid.uuid4().hex[:8]}.db"
        db = BenchDb("sqlite", f"sqlite:///{path.as_posix()}", path=path)
    else:
        schema = "bench_" + uuid.uuid4().hex[:10]
        admin = sa.create_engine(POSTGRES_URL)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        db = BenchDb("postgres", f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", schema=schema)
    engine = db.engine()
    create_lis(engine)
    engine.dispose()
    return db


def backlog_rows(*, items: int | None = None, requisitions: int | None = None,
                 first_item: int = 1, first_req: int = 1, seed: int = 42,
                 day: dt.date | None = None) -> Iterator[tuple[list[tuple], list[tuple]]]:
    """Chunks of (requisition rows, item rows): each requisition has 1-8 distinct exams.

    Stops after ``requisitions`` requisitions or once ``items`` items were produced.
    """
    rng = random.Random(seed)
    day = day or dt.date(2026, 7, 1)
    entered = dt.datetime(day.year, day.month, day.day, 8, 0)
    item_at = entered + dt.timedelta(minutes=10)
    item_id, req_id = first_item, first_req
    made_items = made_reqs = 0
    reqs: list[tuple] = []
    rows: list[tuple] = []
    while True:
        if requisitions is not None and made_reqs >= requisitions:
            break
        if items is not None and made_items >= items:
            break
        n = rng.randint(1, 8)
        if items is not None:
            n = min(n, items - made_items)
        reqs.append((req_id, (req_id % PATIENTS) + 1, entered, "08:00"))
        for code in rng.sample(CODES, n):
            rows.append((item_id, req_id, code, f"EXAME {code}", LAB, item_at, "Sistema"))
            item_id += 1
        made_items += n
        made_reqs += 1
        req_id += 1
        if len(rows) >= CHUNK:
            yield reqs, rows
            reqs, rows = [], []
    if rows or reqs:
        yield reqs, rows


def patient_rows() -> list[tuple]:
    born = dt.datetime(1980, 1, 1)
    return [(p, f"PACIENTE {p}", f"{p:011d}", born + dt.timedelta(days=p), "F" if p % 2 else "M")
            for p in range(1, PATIENTS + 1)]


def seed(db: BenchDb, *, items: int | None = None, requisitions: int | None = None) -> dict:
    """Fill the LIS with patients and a backlog; returns counts and the highest item id."""
    engine = db.engine()
    tables: LisTables = create_lis(engine)
    n_items = n_reqs = 0
    max_id = 0
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        _insert(db.backend, cur, "paciente", ("codpaciente", "nome", "cpf", "datanasc", "sexo"),
                patient_rows())
        for reqs, rows in backlog_rows(items=items, requisitions=requisitions):
            _insert(db.backend, cur, tables.requisition.name, REQ_COLS, reqs)
            _insert(db.backend, cur, tables.item.name, ITEM_COLS, rows)
            n_items += len(rows)
            n_reqs += len(reqs)
            if rows:
                max_id = rows[-1][0]
        raw.commit()
        cur.close()
    finally:
        raw.close()
    with engine.begin() as conn:
        if db.backend == "postgres":
            conn.execute(sa.text("ANALYZE"))
        else:
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return {"items": n_items, "requisitions": n_reqs, "max_item_id": max_id}


def _insert(backend: str, cur: object, table: str, cols: tuple[str, ...],
            rows: list[tuple]) -> None:
    if not rows:
        return
    names = ", ".join(f'"{c}"' for c in cols)
    if backend == "postgres":
        with cur.copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
            for row in rows:
                copy.write_row(row)
    else:
        marks = ", ".join("?" for _ in cols)
        cur.executemany(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', rows)  # type: ignore[attr-defined]


__all__ = ["CODES", "LAB", "POSTGRES_URL", "BenchDb", "backlog_rows", "new_db",
           "postgres_available", "seed"]
