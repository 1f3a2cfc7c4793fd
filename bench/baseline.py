"""The original design, reproduced for side-by-side figures.

See the seed README, "Detalhes de funcionamento".

Every poll it opens ONE transaction on the LIS database, reads the items above
``LastItemId``, groups them by requisition and, still inside that transaction, sends
each requisition with ``POST /requests`` one after the other (Idempotency-Key
``sol-<CodSolicitacao>``), moving ``_MonitorState.LastItemId`` after each send; the
transaction commits when the batch is done. It reuses the product's query, transform and
HTTP client so that only the delivery design differs.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from typing import Any

import sqlalchemy as sa

from bemsoft_monitor.app import Parts
from bemsoft_monitor.catalog import Resolver
from bemsoft_monitor.store import CHECKPOINT_NAME


def run_baseline(parts: Parts, stop: threading.Event, delivered: list[int]) -> dict[str, Any]:
    """Poll and send sequentially until ``stop``; returns transaction hold times."""
    s = parts.settings
    assert parts.client is not None and parts.catalog is not None
    parts.store.create_tables()
    parts.catalog.refresh_if_stale()
    resolver = Resolver(catalog=parts.catalog.catalog, test_map={}, material_map={},
                        code_source=s.test_code_source, variant_policy=s.bemsoft_variant_policy,
                        dry_run=False)
    state = parts.store.state
    now = dt.datetime.now(dt.timezone.utc)
    if parts.store.checkpoint() is None:
        parts.store.init_checkpoint(0, now)
    holds: list[float] = []
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        sent_in_batch = 0
        with parts.lis_engine.connect() as conn:
            tx = conn.begin()
            checkpoint = parts.store.checkpoint(conn) or 0
            # The original read: CodItemSol > checkpoint, TOP 500, in id order.
            items = parts.source.fetch_items(conn, [(checkpoint + 1, 2**62)],
                                             limit=s.batch_size)
            for req_id, group in itertools.groupby(items, key=lambda i: i.requisition_id):
                if stop.is_set():
                    break
                req_items = list(group)
                result = build(req_items, s, resolver)
                for draft in result.orders:
                    outcome = parts.client.post_order(draft.payload, key=f"sol-{req_id}")
                    if outcome.kind.value == "delivered":
                        delivered[0] += 1
                    else:
                        failures += 1
                    sent_in_batch += 1
                conn.execute(sa.update(state).where(state.c.Name == CHECKPOINT_NAME)
                             .values(LastItemId=max(i.item_id for i in req_items)))
            tx.commit()
        if sent_in_batch:
            holds.append(time.monotonic() - started)
        else:
            stop.wait(s.poll_seconds)
    return {"lis_transactions": len(holds),
            "max_transaction_s": round(max(holds), 3) if holds else 0.0,
            "mean_transaction_s": round(sum(holds) / len(holds), 3) if holds else 0.0,
            "failures": failures}


def build(items: list[Any], settings: Any, resolver: Resolver) -> Any:
    from bemsoft_monitor.transform import build_orders

    return build_orders(items, settings=settings, resolver=resolver, first_seq=1,
                        now=dt.datetime.now(dt.timezone.utc))
