"""PostgreSQL plan of the monitor's poll query on a large ItemSol (shared with the test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from bemsoft_monitor.demo import create_lis
from bemsoft_monitor.source import LisSource

from .data import CODES, LAB


def build_large_itemsol(engine: sa.Engine, rows: int) -> None:
    """``rows`` items over rows/4 requisitions, built server-side with generate_series."""
    create_lis(engine)
    reqs = max(1, rows // 4)
    codes = "ARRAY[" + ", ".join(f"'{c}'" for c in CODES) + "]"
    with engine.begin() as conn:
        conn.execute(sa.text(
            'INSERT INTO solicitacao (codsolicitacao, codpaciente, dtaentrada, "Hora") '
            "SELECT g, 1 + g % 1000, TIMESTAMP '2026-07-01 08:00', '08:00' "
            "FROM generate_series(1, :n) AS g"), {"n": reqs})
        conn.execute(sa.text(
            'INSERT INTO "ItemSol" ("CodItemSol", "CodSolicitacao", "CodConvExames", '
            '"DescExames", "NomeTerceirizado", "DataEntrada", "Origem") '
            f"SELECT g, 1 + (g - 1) / 4, ({codes})[1 + g % 8], 'EXAME', "
            "CASE WHEN g % 3 = 0 THEN 'OUTRO LAB' ELSE :lab END, "
            "TIMESTAMP '2026-07-01 08:10', 'Sistema' FROM generate_series(1, :n) AS g"),
            {"n": rows, "lab": LAB})
        conn.execute(sa.text('ANALYZE "ItemSol"'))
        conn.execute(sa.text("ANALYZE solicitacao"))


def poll_query_sql(*, after_id: int, limit: int = 500) -> dict[str, str]:
    """The two LIS queries of a poll, compiled for PostgreSQL with their values inlined.

    ``ids``: which CodItemSol values are visible above the checkpoint (every poll, idle or
    not); ``items``: the items of the configured lab inside the window it returned.
    """
    source = LisSource(tables=_tables(), support_labs=[LAB])
    queries = {
        "ids": source.visible_ids_query(after_id=after_id, limit=limit),
        "items": source.new_items_query(ranges=[(after_id + 1, after_id + limit)]),
    }
    return {name: str(q.compile(dialect=postgresql.dialect(),
                                compile_kwargs={"literal_binds": True}))
            for name, q in queries.items()}


def _tables() -> Any:
    from bemsoft_monitor.source import lis_tables

    return lis_tables(None)


def explain(engine: sa.Engine, sql: str) -> dict[str, Any]:
    with engine.connect() as conn:
        raw = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql).scalar()
    data = json.loads(raw) if isinstance(raw, str) else raw
    return dict(data[0]["Plan"])


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def itemsol_access(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(node type, index name) of every node that reads ItemSol."""
    return [(n["Node Type"], n.get("Index Name")) for n in nodes(plan)
            if n.get("Relation Name") == "ItemSol"]


def plan_text(engine: sa.Engine, sql: str) -> str:
    with engine.connect() as conn:
        return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
