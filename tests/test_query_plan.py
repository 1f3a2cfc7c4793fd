"""The poll query reads ItemSol through its CodItemSol index on a 1,000,000-row table."""

from __future__ import annotations

import sqlalchemy as sa
from bench.plan import build_large_itemsol, explain, itemsol_access, poll_query_sql

ROWS = 1_000_000


def test_poll_query_uses_the_coditemsol_index_on_a_million_rows(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        build_large_itemsol(engine, ROWS)
        with engine.connect() as conn:
            pkey = conn.execute(sa.text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'ItemSol' "
                "AND schemaname = current_schema() "
                "AND indexdef LIKE '%UNIQUE%(\"CodItemSol\")%'")).scalar_one()
        # The monitor is caught up: its checkpoint sits just below the newest items.
        for name, sql in poll_query_sql(after_id=ROWS - 2_000).items():
            assert '"ItemSol"."CodItemSol" > 998000' in sql or "BETWEEN 998001" in sql, sql
            access = itemsol_access(explain(engine, sql))
            print(f"\n{name}: ItemSol no plano: {access} (índice da chave: {pkey})")
            assert access, "o plano não lê ItemSol"
            assert all(kind in ("Index Scan", "Index Only Scan") and index == pkey
                       for kind, index in access), (name, access)
            # A full table scan is what the plan must avoid.
            assert ("Seq Scan", None) not in access
    finally:
        engine.dispose()
