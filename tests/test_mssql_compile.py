"""Every LIS and state query the monitor runs also compiles for SQL Server.

SQL Server cannot run here: the scenario runs on SQLite while every statement executed is
captured and compiled again with the ``mssql`` dialect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mssql
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql import ClauseElement

from bemsoft_monitor.simulator import Simulator
from bemsoft_monitor.source import LisSource, lis_tables
from bemsoft_monitor.store import StateStore

from .conftest import FakeClock, Lis, drive, make_monitor, make_settings


def _capture(engine: sa.Engine, sink: list[ClauseElement]) -> None:
    @sa.event.listens_for(engine, "before_execute")
    def _keep(conn: Any, clause: Any, multiparams: Any, params: Any, opts: Any) -> None:
        if isinstance(clause, ClauseElement):
            sink.append(clause)


def test_every_executed_statement_compiles_for_sql_server(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=10)
    lis.item(1, "GLI", item_id=12)  # refused (two variants) → refusal path
    sim.set_faults([{"kind": "status", "status": 503}])
    settings = make_settings(url, tmp_path, sim, state_db_url=url,
                             out_of_order_grace_seconds=60)
    monitor, parts = make_monitor(settings, clock)
    seen: list[ClauseElement] = []
    _capture(parts.lis_engine, seen)
    _capture(parts.store.engine, seen)
    drive(monitor, clock)
    lis.item(1, "TSH", item_id=20)  # late item; 11..19 become a gap
    drive(monitor, clock)
    monitor.retry_refused()
    parts.store.counts()
    parts.store.oldest_waiting()
    parts.store.lease_info()
    monitor.close()
    assert len(sim.saved_tests()) == 2
    kinds = {type(c).__name__ for c in seen}
    assert {"Select", "Insert", "Update", "Delete"} <= kinds, kinds
    dialect = mssql.dialect()
    compiled = [str(c.compile(dialect=dialect)) for c in seen]
    assert len(compiled) > 40
    regap = [q for q in compiled if "BETWEEN" in q and "[_MonitorGap]" not in q
             and "TOP" in q and "[ItemSol]" in q]
    assert regap, "the poll re-read the open gap 11..19"
    top = [q for q in compiled if "TOP" in q and "ItemSol" in q]
    assert top, "the poll query uses TOP on SQL Server"


def test_lis_queries_on_sql_server_use_dbo_and_bound_parameters() -> None:
    source = LisSource(tables=lis_tables("dbo"), support_labs=["DIAGNÓSTICO DO BRASIL - DB",
                                                                "AME-SE - PARDINI"])
    q = source.new_items_query(ranges=[(100, 120), (17066, 17565)])
    sql = str(q.compile(dialect=mssql.dialect()))
    assert "FROM dbo.[ItemSol]" in sql
    assert "UPPER(RTRIM(dbo.[ItemSol].[NomeTerceirizado])) IN" in sql
    assert "DIAGNÓSTICO" not in sql  # names travel as parameters, never inlined
    assert "ORDER BY dbo.[ItemSol].[CodItemSol]" in sql
    ids = source.visible_ids_query(after_id=17065, gaps=[(100, 120)], limit=500)
    literal = str(ids.compile(dialect=mssql.dialect(), compile_kwargs={"literal_binds": True}))
    assert literal.startswith("SELECT TOP 500 dbo.[ItemSol].[CodItemSol]"), literal
    assert "dbo.[ItemSol].[CodItemSol] >= 100" in literal  # the index seeks to the oldest gap
    assert "ORDER BY dbo.[ItemSol].[CodItemSol]" in literal
    req = str(source.requisition_query(4497).compile(dialect=mssql.dialect()))
    assert "LEFT OUTER JOIN dbo.paciente" in req


def test_state_tables_create_on_sql_server_with_datetime2() -> None:
    store = StateStore(sa.create_engine("sqlite://"), schema="dbo")
    dialect = mssql.dialect()
    ddl = [str(CreateTable(t).compile(dialect=dialect)) for t in store.md.sorted_tables]
    ddl += [str(CreateIndex(i).compile(dialect=dialect))
            for t in store.md.sorted_tables for i in t.indexes]
    state = next(d for d in ddl if "[_MonitorState]" in d)
    assert "CREATE TABLE dbo.[_MonitorState]" in state
    assert "[LastItemId] BIGINT NULL" in state
    assert "DATETIME2" in state
    order = next(d for d in ddl if "[_MonitorOrder]" in d and "CREATE TABLE" in d)
    assert "IDENTITY" in order
    assert len(ddl) >= 8
    items = next(d for d in ddl if "[_MonitorItem]" in d and "CREATE TABLE" in d)
    assert "[Reason] NVARCHAR(max)" in items
    assert not any("NTEXT" in d or " TEXT" in d for d in ddl)  # deprecated, not sortable
    # A column added to an existing table on upgrade (ALTER TABLE ... ADD <this>).
    version = store.reqs.c.Version
    added = str(sa.schema.CreateColumn(version).compile(dialect=dialect))
    # T-SQL fills existing rows with the default when a NOT NULL column has one.
    assert added == "[Version] INTEGER NOT NULL DEFAULT '0'", added
