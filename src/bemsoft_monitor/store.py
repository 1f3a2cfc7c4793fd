"""The monitor's own tables: checkpoint, item ledger, requisitions, outbox, attempts, lease.

Every state transition is one function running in one transaction. Times are stored as
naive UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mssql
from sqlalchemy.engine import Connection, Engine

from .models import LisItem, OrderDraft, Refusal

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "ItemSolMonitor"
LEASE_NAME = "main"

# Item ledger states.
ITEM_PENDING = "pending"  # seen, waiting for its requisition to settle
ITEM_ORDERED = "ordered"  # part of an outbox order not yet final
ITEM_DELIVERED = "delivered"
ITEM_REFUSED = "refused"  # transform could not build it (mapping, catalogue, patient data)
ITEM_CANCELLED = "cancelled"  # gone from the LIS (or moved to another lab) before sending
ITEM_DEAD = "dead"  # its order went to FAILED_DIR
ITEM_CONFERIR = "conferir"  # its order needs a person to confirm

# Outbox order states.
ORDER_PENDING = "pending"
ORDER_SENDING = "sending"
ORDER_DELIVERED = "delivered"
ORDER_DEAD = "dead"
ORDER_CONFERIR = "conferir"
ORDER_RESOLVED = "resolved"  # marked resolved by a person

FINAL_ORDER_STATES = (ORDER_DELIVERED, ORDER_DEAD, ORDER_CONFERIR, ORDER_RESOLVED)

_DateTime = sa.DateTime().with_variant(mssql.DATETIME2(), "mssql")
# NVARCHAR(max) on SQL Server (TEXT/NTEXT are deprecated and cannot be compared or sorted).
_LongText = sa.UnicodeText().with_variant(mssql.NVARCHAR(), "mssql")


def utc_naive(value: dt.datetime) -> dt.datetime:
    """Aware or naive datetime → naive UTC (naive is taken as UTC already)."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def state_metadata(schema: str | None = None) -> sa.MetaData:
    """Describe the monitor's tables (``_MonitorState`` is the seed's, kept compatible)."""
    md = sa.MetaData(schema=schema)
    sa.Table(
        "_MonitorState", md,
        sa.Column("Name", sa.String(128), primary_key=True),
        sa.Column("LastItemId", sa.BigInteger, nullable=True),
        sa.Column("UpdatedAt", _DateTime, nullable=False, server_default=sa.func.current_timestamp()),
    )
    sa.Table(
        "_MonitorItem", md,
        sa.Column("ItemId", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("RequisitionId", sa.BigInteger, nullable=False, index=True),
        sa.Column("State", sa.String(16), nullable=False, index=True),
        sa.Column("OrderId", sa.BigInteger, nullable=True, index=True),
        sa.Column("Reason", _LongText, nullable=True),
        sa.Column("Snapshot", _LongText, nullable=True),
        sa.Column("FirstSeenAt", _DateTime, nullable=False),
        sa.Column("UpdatedAt", _DateTime, nullable=False),
    )
    sa.Table(
        "_MonitorRequisition", md,
        sa.Column("RequisitionId", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("FirstSeenAt", _DateTime, nullable=False),
        sa.Column("DueAt", _DateTime, nullable=True, index=True),
        sa.Column("OrderSeq", sa.Integer, nullable=False, default=0),
        sa.Column("UpdatedAt", _DateTime, nullable=False),
    )
    sa.Table(
        "_MonitorOrder", md,
        sa.Column("OrderId", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("RequisitionId", sa.BigInteger, nullable=False, index=True),
        sa.Column("Seq", sa.Integer, nullable=False),
        sa.Column("ItemIds", _LongText, nullable=False),
        sa.Column("ItemSetHash", sa.String(64), nullable=False),
        sa.Column("Generation", sa.Integer, nullable=False, default=1),
        sa.Column("IdempotencyKey", sa.String(120), nullable=False),
        sa.Column("State", sa.String(16), nullable=False, index=True),
        sa.Column("Attempts", sa.Integer, nullable=False, default=0),
        sa.Column("KeyAttempts", sa.Integer, nullable=False, default=0),
        # A failure answer was received for the current key (it may be recorded by Bemsoft).
        sa.Column("KeyAnswered", sa.Boolean, nullable=False, default=False),
        # An attempt with the current key got no answer (timeout, reset, 5xx, crash): it
        # may have been saved.
        sa.Column("KeyUncertain", sa.Boolean, nullable=False, default=False),
        sa.Column("NextAttemptAt", _DateTime, nullable=False, index=True),
        sa.Column("FirstAttemptAt", _DateTime, nullable=True),
        sa.Column("LastStatus", sa.Integer, nullable=True),
        sa.Column("LastOutcome", sa.String(32), nullable=True),
        sa.Column("LastError", _LongText, nullable=True),
        sa.Column("Payload", _LongText, nullable=False),
        sa.Column("FailedFile", _LongText, nullable=True),
        sa.Column("Holder", sa.String(200), nullable=True),
        sa.Column("CreatedAt", _DateTime, nullable=False),
        sa.Column("UpdatedAt", _DateTime, nullable=False),
        sa.Column("DeliveredAt", _DateTime, nullable=True),
        sa.UniqueConstraint("RequisitionId", "Seq", name="uq_monitororder_req_seq"),
    )
    sa.Table(
        "_MonitorAttempt", md,
        sa.Column("AttemptId", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("OrderId", sa.BigInteger, nullable=False, index=True),
        sa.Column("IdempotencyKey", sa.String(120), nullable=False),
        sa.Column("StartedAt", _DateTime, nullable=False),
        sa.Column("FinishedAt", _DateTime, nullable=True),
        sa.Column("Status", sa.Integer, nullable=True),
        sa.Column("Outcome", sa.String(32), nullable=True),
        sa.Column("Detail", _LongText, nullable=True),
        sa.Column("ElapsedMs", sa.Integer, nullable=True),
    )
    sa.Table(
        "_MonitorGap", md,
        sa.Column("Lo", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("Hi", sa.BigInteger, nullable=False),
        sa.Column("FirstSeenAt", _DateTime, nullable=False),
    )
    sa.Table(
        "_MonitorLease", md,
        sa.Column("Name", sa.String(64), primary_key=True),
        sa.Column("Holder", sa.String(200), nullable=False),
        sa.Column("Host", sa.String(200), nullable=False),
        sa.Column("Pid", sa.Integer, nullable=False),
        sa.Column("AcquiredAt", _DateTime, nullable=False),
        sa.Column("ExpiresAt", _DateTime, nullable=False),
    )
    sa.Table(
        "_MonitorFlag", md,
        sa.Column("Name", sa.String(64), primary_key=True),
        sa.Column("Value", _LongText, nullable=True),
        sa.Column("UpdatedAt", _DateTime, nullable=False),
    )
    return md


def item_set_hash(item_ids: Iterable[int]) -> str:
    """Stable digest of an exact set of items."""
    text = ",".join(str(i) for i in sorted(set(item_ids)))
    return hashlib.sha256(text.encode()).hexdigest()


def idempotency_key(requisition_id: int, seq: int, set_hash: str, generation: int) -> str:
    """Idempotency-Key = requisition + exact item set + generation (issue #3, part 4)."""
    return f"bm-{requisition_id}-{seq}-{set_hash[:12]}-g{generation}"


@dataclass(frozen=True)
class IngestResult:
    """What one ingest transaction recorded."""

    new_items: int
    known_items: int
    checkpoint: int | None


@dataclass(frozen=True)
class OrderRow:
    """One outbox row as the sender needs it."""

    order_id: int
    requisition_id: int
    seq: int
    item_ids: tuple[int, ...]
    generation: int
    key: str
    state: str
    attempts: int
    key_attempts: int
    key_answered: bool
    key_uncertain: bool
    first_attempt_at: dt.datetime | None
    payload: dict[str, Any]
    last_error: str | None
    last_status: int | None
    failed_file: str | None
    holder: str | None = None


@dataclass(frozen=True)
class ItemRow:
    """One ledger row."""

    item_id: int
    requisition_id: int
    state: str
    order_id: int | None
    reason: str | None
    snapshot: LisItem | None


class StateStore:
    """All reads and writes of the monitor's tables."""

    def __init__(self, engine: Engine, *, schema: str | None = None) -> None:
        self.engine = engine
        self.md = state_metadata(schema)
        t = self.md.tables
        key = (schema + ".") if schema else ""
        self.state = t[key + "_MonitorState"]
        self.items = t[key + "_MonitorItem"]
        self.reqs = t[key + "_MonitorRequisition"]
        self.orders = t[key + "_MonitorOrder"]
        self.attempts = t[key + "_MonitorAttempt"]
        self.gaps = t[key + "_MonitorGap"]
        self.lease = t[key + "_MonitorLease"]
        self.flags = t[key + "_MonitorFlag"]

    # --- schema ------------------------------------------------------------------------
    def create_tables(self) -> None:
        """Create missing tables (an existing seed ``_MonitorState`` is kept as is)."""
        self.md.create_all(self.engine, checkfirst=True)

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    # --- checkpoint ----------------------------------------------------------------------
    def checkpoint(self, conn: Connection | None = None) -> int | None:
        """LastItemId of the ``ItemSolMonitor`` row, None when there is no row yet."""
        q = sa.select(self.state.c.LastItemId).where(self.state.c.Name == CHECKPOINT_NAME)
        if conn is not None:
            row = conn.execute(q).first()
        else:
            with self.engine.connect() as c:
                row = c.execute(q).first()
        if row is None:
            return None
        return int(row[0]) if row[0] is not None else 0

    def init_checkpoint(self, value: int, now: dt.datetime) -> int:
        """Create the checkpoint row when absent (a seed row is honoured); return the value."""
        with self.engine.begin() as conn:
            existing = self.checkpoint(conn)
            if existing is not None:
                if existing == 0 and value and self._row_is_null(conn):
                    self._set_checkpoint(conn, value, now)
                    return value
                return existing
            conn.execute(sa.insert(self.state).values(
                Name=CHECKPOINT_NAME, LastItemId=value, UpdatedAt=utc_naive(now)))
            return value

    def _row_is_null(self, conn: Connection) -> bool:
        q = sa.select(self.state.c.LastItemId).where(self.state.c.Name == CHECKPOINT_NAME)
        return conn.execute(q).scalar() is None

    def _set_checkpoint(self, conn: Connection, value: int, now: dt.datetime) -> None:
        conn.execute(sa.update(self.state).where(self.state.c.Name == CHECKPOINT_NAME).values(
            LastItemId=value, UpdatedAt=utc_naive(now)))

    def open_gaps(self, *, now: dt.datetime, grace_s: float) -> list[tuple[int, int]]:
        """Id ranges still inside the out-of-order grace window; older ones are dropped."""
        limit = utc_naive(now) - dt.timedelta(seconds=grace_s)
        with self.engine.begin() as conn:
            expired = conn.execute(sa.delete(self.gaps).where(self.gaps.c.FirstSeenAt < limit))
            if expired.rowcount:
                log.debug("lacunas de CodItemSol expiradas: %s", expired.rowcount)
            rows = conn.execute(sa.select(self.gaps.c.Lo, self.gaps.c.Hi).order_by(self.gaps.c.Lo))
            return [(int(r.Lo), int(r.Hi)) for r in rows]

    # --- ingest --------------------------------------------------------------------------
    def record_items(
        self,
        items: Sequence[LisItem],
        *,
        checkpoint: int | None,
        new_gaps: Sequence[tuple[int, int]],
        now: dt.datetime,
        debounce_s: float,
    ) -> IngestResult:
        """Record every item read with its fate, the new gaps and the checkpoint: ONE transaction."""
        ts = utc_naive(now)
        due = ts + dt.timedelta(seconds=debounce_s)
        with self.engine.begin() as conn:
            known = self._known_ids(conn, [i.item_id for i in items])
            fresh = [i for i in items if i.item_id not in known]
            if fresh:
                conn.execute(sa.insert(self.items), [
                    {"ItemId": i.item_id, "RequisitionId": i.requisition_id,
                     "State": ITEM_PENDING, "Snapshot": json.dumps(i.to_json(), ensure_ascii=False),
                     "FirstSeenAt": ts, "UpdatedAt": ts}
                    for i in fresh
                ])
                for req_id in sorted({i.requisition_id for i in fresh}):
                    self._touch_requisition(conn, req_id, ts, due)
            for lo, hi in new_gaps:
                exists = conn.execute(sa.select(self.gaps.c.Lo).where(self.gaps.c.Lo == lo)).first()
                if exists is None:
                    conn.execute(sa.insert(self.gaps).values(Lo=lo, Hi=hi, FirstSeenAt=ts))
            if checkpoint is not None:
                current = self.checkpoint(conn) or 0
                if checkpoint > current:
                    self._set_checkpoint(conn, checkpoint, now)
        return IngestResult(new_items=len(fresh), known_items=len(items) - len(fresh),
                            checkpoint=checkpoint)

    def _known_ids(self, conn: Connection, ids: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            if not chunk:
                continue
            q = sa.select(self.items.c.ItemId).where(self.items.c.ItemId.in_(chunk))
            found.update(int(r[0]) for r in conn.execute(q))
        return found

    def _touch_requisition(
        self, conn: Connection, req_id: int, ts: dt.datetime, due: dt.datetime
    ) -> None:
        """Schedule the requisition's settle; the debounce counts from first sight."""
        r = self.reqs
        row = conn.execute(sa.select(r.c.DueAt).where(r.c.RequisitionId == req_id)).first()
        if row is None:
            conn.execute(sa.insert(r).values(RequisitionId=req_id, FirstSeenAt=ts, DueAt=due,
                                             OrderSeq=0, UpdatedAt=ts))
        elif row.DueAt is None:
            conn.execute(sa.update(r).where(r.c.RequisitionId == req_id).values(
                DueAt=due, UpdatedAt=ts))

    # --- settle --------------------------------------------------------------------------
    def due_requisitions(self, *, now: dt.datetime, limit: int) -> list[int]:
        """Requisitions whose debounce has ended, oldest first."""
        r = self.reqs
        q = (sa.select(r.c.RequisitionId).where(r.c.DueAt.is_not(None),
                                                  r.c.DueAt <= utc_naive(now))
             .order_by(r.c.DueAt, r.c.RequisitionId).limit(limit))
        with self.engine.connect() as conn:
            return [int(x[0]) for x in conn.execute(q)]

    def next_due_at(self) -> dt.datetime | None:
        """When the next requisition settles (None when none waits)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.min(self.reqs.c.DueAt))).scalar()

    def requisition_items(self, req_id: int, conn: Connection | None = None) -> list[ItemRow]:
        """Ledger rows of one requisition."""
        q = (sa.select(self.items).where(self.items.c.RequisitionId == req_id)
             .order_by(self.items.c.ItemId))
        if conn is None:
            with self.engine.connect() as c:
                rows = c.execute(q).all()
        else:
            rows = conn.execute(q).all()
        return [_item_row(r) for r in rows]

    def settle_requisition(
        self,
        req_id: int,
        *,
        current: Sequence[LisItem],
        to_send_ids: Sequence[int],
        drafts: Sequence[OrderDraft],
        refusals: Sequence[Refusal],
        now: dt.datetime,
    ) -> list[int]:
        """Apply a settle in ONE transaction; return the new order ids.

        ``current`` is the requisition as the LIS has it now. Pending items missing from it
        are cancelled; items of it not yet in the ledger are added; drafts become outbox
        orders and their items ``ordered``; refusals are recorded with their reason.
        """
        ts = utc_naive(now)
        current_ids = {i.item_id for i in current}
        new_orders: list[int] = []
        with self.engine.begin() as conn:
            ledger = {row.item_id: row for row in self.requisition_items(req_id, conn)}
            # Items that vanished (deleted, moved to another lab) before being sent.
            gone = [iid for iid, row in ledger.items()
                    if row.state == ITEM_PENDING and iid not in current_ids]
            if gone:
                self._set_items(conn, gone, ITEM_CANCELLED, ts,
                                reason="item removido do LIS ou transferido para outro "
                                       "laboratório antes do envio")
            # Items added to the LIS that the poll has not met yet (or met in another lab).
            added = [i for i in current if i.item_id not in ledger]
            if added:
                conn.execute(sa.insert(self.items), [
                    {"ItemId": i.item_id, "RequisitionId": i.requisition_id,
                     "State": ITEM_PENDING, "Snapshot": json.dumps(i.to_json(), ensure_ascii=False),
                     "FirstSeenAt": ts, "UpdatedAt": ts}
                    for i in added
                ])
            # Refresh snapshots of what is about to be sent (the LIS may have changed).
            for item in current:
                if item.item_id in to_send_ids:
                    conn.execute(sa.update(self.items).where(
                        self.items.c.ItemId == item.item_id).values(
                        Snapshot=json.dumps(item.to_json(), ensure_ascii=False)))
            for refusal in refusals:
                self._set_items(conn, [refusal.item_id], ITEM_REFUSED, ts, reason=refusal.reason)
            max_seq = 0
            for draft in drafts:
                set_hash = item_set_hash(draft.item_ids)
                key = idempotency_key(req_id, draft.seq, set_hash, 1)
                result = conn.execute(sa.insert(self.orders).values(
                    RequisitionId=req_id, Seq=draft.seq,
                    ItemIds=",".join(str(i) for i in sorted(draft.item_ids)),
                    ItemSetHash=set_hash, Generation=1, IdempotencyKey=key,
                    State=ORDER_PENDING, Attempts=0, KeyAttempts=0, KeyAnswered=False,
                    KeyUncertain=False,
                    NextAttemptAt=ts, Payload=json.dumps(draft.payload, ensure_ascii=False),
                    CreatedAt=ts, UpdatedAt=ts,
                ))
                order_id = int(result.inserted_primary_key[0])  # type: ignore[index]
                new_orders.append(order_id)
                self._set_items(conn, list(draft.item_ids), ITEM_ORDERED, ts, order_id=order_id)
                max_seq = max(max_seq, draft.seq)
            values: dict[str, Any] = {"DueAt": None, "UpdatedAt": ts}
            if max_seq:
                values["OrderSeq"] = max_seq
            conn.execute(sa.update(self.reqs).where(self.reqs.c.RequisitionId == req_id)
                         .values(**values))
        return new_orders

    def order_seq(self, req_id: int) -> int:
        """How many orders the requisition already has (for the next externalId suffix)."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(self.reqs.c.OrderSeq).where(
                self.reqs.c.RequisitionId == req_id)).scalar()
            return int(value or 0)

    def _set_items(
        self, conn: Connection, ids: Sequence[int], state: str, ts: dt.datetime, *,
        reason: str | None = None, order_id: int | None = None,
    ) -> None:
        if not ids:
            return
        values: dict[str, Any] = {"State": state, "UpdatedAt": ts, "Reason": reason}
        if order_id is not None:
            values["OrderId"] = order_id
        for start in range(0, len(ids), 500):
            conn.execute(sa.update(self.items).where(
                self.items.c.ItemId.in_(list(ids[start:start + 500]))).values(**values))

    def requeue_refused(self, *, now: dt.datetime, item_ids: Sequence[int] | None = None) -> int:
        """Refused items back to pending, their requisitions due now; return how many."""
        ts = utc_naive(now)
        with self.engine.begin() as conn:
            q = sa.select(self.items.c.ItemId, self.items.c.RequisitionId).where(
                self.items.c.State == ITEM_REFUSED)
            if item_ids is not None:
                q = q.where(self.items.c.ItemId.in_(list(item_ids)))
            rows = conn.execute(q).all()
            if not rows:
                return 0
            self._set_items(conn, [int(r.ItemId) for r in rows], ITEM_PENDING, ts)
            for req_id in sorted({int(r.RequisitionId) for r in rows}):
                conn.execute(sa.update(self.reqs).where(self.reqs.c.RequisitionId == req_id)
                             .values(DueAt=ts, UpdatedAt=ts))
            return len(rows)

    # --- outbox ----------------------------------------------------------------------------
    def recover_inflight(self, *, now: dt.datetime) -> int:
        """Orders left in 'sending' by a dead process go back to pending with the same key."""
        ts = utc_naive(now)
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(self.orders).where(
                self.orders.c.State == ORDER_SENDING).values(
                State=ORDER_PENDING, NextAttemptAt=ts, Holder=None, UpdatedAt=ts,
                LastOutcome="no_answer", KeyUncertain=True,
                LastError="envio interrompido (processo parado durante o envio)"))
            conn.execute(sa.update(self.attempts).where(self.attempts.c.FinishedAt.is_(None))
                         .values(FinishedAt=ts, Outcome="interrupted"))
            return int(res.rowcount or 0)

    def claimable_orders(self, *, now: dt.datetime, limit: int,
                         exclude_requisitions: Iterable[int] = ()) -> list[int]:
        """Pending orders due now whose requisition has no earlier unfinished order."""
        o = self.orders
        older = o.alias("older")
        blocked = sa.exists().where(
            older.c.RequisitionId == o.c.RequisitionId,
            older.c.Seq < o.c.Seq,
            older.c.State.in_([ORDER_PENDING, ORDER_SENDING]),
        )
        q = (sa.select(o.c.OrderId, o.c.RequisitionId)
             .where(o.c.State == ORDER_PENDING, o.c.NextAttemptAt <= utc_naive(now), ~blocked)
             .order_by(o.c.NextAttemptAt, o.c.OrderId)
             .limit(limit))
        excluded = set(exclude_requisitions)
        with self.engine.connect() as conn:
            out: list[int] = []
            seen: set[int] = set()
            for r in conn.execute(q):
                req = int(r.RequisitionId)
                if req in excluded or req in seen:
                    continue
                seen.add(req)
                out.append(int(r.OrderId))
            return out

    def claim(self, order_id: int, *, holder: str, now: dt.datetime) -> OrderRow | None:
        """Mark one pending order as being sent (attempt recorded first); None if taken."""
        ts = utc_naive(now)
        o = self.orders
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(o).where(
                o.c.OrderId == order_id, o.c.State == ORDER_PENDING).values(
                State=ORDER_SENDING, Holder=holder, Attempts=o.c.Attempts + 1,
                KeyAttempts=o.c.KeyAttempts + 1, UpdatedAt=ts,
                FirstAttemptAt=sa.func.coalesce(o.c.FirstAttemptAt, ts)))
            if res.rowcount != 1:
                return None
            row = self._order(conn, order_id)
            assert row is not None
            conn.execute(sa.insert(self.attempts).values(
                OrderId=order_id, IdempotencyKey=row.key, StartedAt=ts))
            return row

    def _order(self, conn: Connection, order_id: int) -> OrderRow | None:
        r = conn.execute(sa.select(self.orders).where(self.orders.c.OrderId == order_id)).first()
        return None if r is None else _order_row(r)

    def get_order(self, order_id: int) -> OrderRow | None:
        """One outbox row."""
        with self.engine.connect() as conn:
            return self._order(conn, order_id)

    def orders_by_state(self, state: str, limit: int = 1000) -> list[OrderRow]:
        """Outbox rows in one state, oldest first."""
        q = (sa.select(self.orders).where(self.orders.c.State == state)
             .order_by(self.orders.c.OrderId).limit(limit))
        with self.engine.connect() as conn:
            return [_order_row(r) for r in conn.execute(q)]

    def orders_of_requisition(self, req_id: int) -> list[OrderRow]:
        """Every order of one requisition."""
        q = (sa.select(self.orders).where(self.orders.c.RequisitionId == req_id)
             .order_by(self.orders.c.Seq))
        with self.engine.connect() as conn:
            return [_order_row(r) for r in conn.execute(q)]

    def finish(
        self,
        order: OrderRow,
        *,
        state: str,
        now: dt.datetime,
        status: int | None,
        outcome: str,
        detail: str,
        elapsed_ms: int | None = None,
        next_attempt_at: dt.datetime | None = None,
        new_generation: bool = False,
        key_answered: bool | None = None,
        key_uncertain: bool | None = None,
        failed_file: str | None = None,
    ) -> bool:
        """Record an attempt's outcome and the order's next state, items following.

        Fenced: nothing is written (False) unless the order is still being sent by the
        holder that claimed it, so a monitor that lost its lease cannot overwrite the
        successor's record.
        """
        ts = utc_naive(now)
        values: dict[str, Any] = {
            "State": state, "Holder": None, "UpdatedAt": ts, "LastStatus": status,
            "LastOutcome": outcome, "LastError": detail if state != ORDER_DELIVERED else None,
        }
        if next_attempt_at is not None:
            values["NextAttemptAt"] = utc_naive(next_attempt_at)
        if key_answered is not None:
            values["KeyAnswered"] = key_answered
        if key_uncertain is not None:
            values["KeyUncertain"] = key_uncertain
        if new_generation:
            gen = order.generation + 1
            values.update(Generation=gen, KeyAttempts=0, KeyAnswered=False, KeyUncertain=False,
                          IdempotencyKey=idempotency_key(
                              order.requisition_id, order.seq,
                              item_set_hash(order.item_ids), gen))
        if state == ORDER_DELIVERED:
            values["DeliveredAt"] = ts
        if failed_file is not None:
            values["FailedFile"] = failed_file
        item_state = {ORDER_DELIVERED: ITEM_DELIVERED, ORDER_DEAD: ITEM_DEAD,
                      ORDER_CONFERIR: ITEM_CONFERIR, ORDER_PENDING: ITEM_ORDERED,
                      ORDER_RESOLVED: ITEM_DELIVERED}.get(state)
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(self.orders).where(
                self.orders.c.OrderId == order.order_id, self.orders.c.State == ORDER_SENDING,
                self.orders.c.Holder == order.holder).values(**values))
            if res.rowcount != 1:
                return False
            last_attempt = (sa.select(sa.func.max(self.attempts.c.AttemptId))
                            .where(self.attempts.c.OrderId == order.order_id).scalar_subquery())
            conn.execute(sa.update(self.attempts).where(
                self.attempts.c.AttemptId == last_attempt).values(
                FinishedAt=ts, Status=status, Outcome=outcome, Detail=detail[:4000],
                ElapsedMs=elapsed_ms))
            if item_state is not None:
                reason = None if state in (ORDER_DELIVERED, ORDER_PENDING) else detail
                self._set_items(conn, list(order.item_ids), item_state, ts, reason=reason)
        return True

    def holds(self, order_id: int, holder: str) -> bool:
        """Whether ``holder`` is still the one sending this order."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.orders.c.State, self.orders.c.Holder).where(
                self.orders.c.OrderId == order_id)).first()
            return row is not None and row.State == ORDER_SENDING and row.Holder == holder

    def requeue_order(self, order_id: int, *, now: dt.datetime, new_generation: bool) -> bool:
        """Put a dead or 'conferir' order back in the queue (retry command, painel)."""
        ts = utc_naive(now)
        with self.engine.begin() as conn:
            order = self._order(conn, order_id)
            if order is None or order.state not in (ORDER_DEAD, ORDER_CONFERIR):
                return False
            values: dict[str, Any] = {"State": ORDER_PENDING, "NextAttemptAt": ts,
                                      "FirstAttemptAt": None, "UpdatedAt": ts}
            if new_generation:
                gen = order.generation + 1
                values.update(Generation=gen, KeyAttempts=0, KeyAnswered=False,
                              KeyUncertain=False, IdempotencyKey=idempotency_key(
                                  order.requisition_id, order.seq,
                                  item_set_hash(order.item_ids), gen))
            conn.execute(sa.update(self.orders).where(self.orders.c.OrderId == order_id)
                         .values(**values))
            self._set_items(conn, list(order.item_ids), ITEM_ORDERED, ts)
            return True

    def resolve_order(self, order_id: int, *, now: dt.datetime, note: str) -> bool:
        """A person confirmed the order is at Bemsoft (or no longer needed)."""
        ts = utc_naive(now)
        with self.engine.begin() as conn:
            order = self._order(conn, order_id)
            if order is None or order.state not in (ORDER_DEAD, ORDER_CONFERIR):
                return False
            conn.execute(sa.update(self.orders).where(self.orders.c.OrderId == order_id)
                         .values(State=ORDER_RESOLVED, UpdatedAt=ts, LastError=note))
            self._set_items(conn, list(order.item_ids), ITEM_DELIVERED, ts, reason=note)
            return True

    def reschedule_pending(self, *, at: dt.datetime, now: dt.datetime) -> int:
        """Push every due pending order to ``at`` (used while sending is paused)."""
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(self.orders).where(
                self.orders.c.State == ORDER_PENDING,
                self.orders.c.NextAttemptAt < utc_naive(at)).values(
                NextAttemptAt=utc_naive(at), UpdatedAt=utc_naive(now)))
            return int(res.rowcount or 0)

    # --- flags -------------------------------------------------------------------------------
    def set_flag(self, name: str, value: str | None, *, now: dt.datetime) -> None:
        """Upsert a named flag (UPDATE then INSERT; no MERGE)."""
        ts = utc_naive(now)
        with self.engine.begin() as conn:
            res = conn.execute(sa.update(self.flags).where(self.flags.c.Name == name)
                               .values(Value=value, UpdatedAt=ts))
            if res.rowcount == 0:
                conn.execute(sa.insert(self.flags).values(Name=name, Value=value, UpdatedAt=ts))

    def get_flag(self, name: str) -> tuple[str | None, dt.datetime | None]:
        """Value and time of a flag ((None, None) when never set)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.flags.c.Value, self.flags.c.UpdatedAt)
                               .where(self.flags.c.Name == name)).first()
            return (None, None) if row is None else (row.Value, row.UpdatedAt)

    # --- lease -----------------------------------------------------------------------------
    def try_lease(
        self, *, holder: str, host: str, pid: int, now: dt.datetime, ttl_s: float,
        holder_alive: bool | None = None,
    ) -> tuple[bool, str | None]:
        """Take or renew the lease; return (held, current holder).

        ``holder_alive`` is False when the caller knows the current holder is a dead
        process on this same host: the lease is taken at once instead of waiting it out.
        """
        ts = utc_naive(now)
        expires = ts + dt.timedelta(seconds=ttl_s)
        lt = self.lease
        with self.engine.begin() as conn:
            cond = sa.or_(lt.c.Holder == holder, lt.c.ExpiresAt < ts)
            res = conn.execute(sa.update(lt).where(lt.c.Name == LEASE_NAME, cond).values(
                Holder=holder, Host=host, Pid=pid, ExpiresAt=expires,
                AcquiredAt=sa.case((lt.c.Holder == holder, lt.c.AcquiredAt), else_=ts)))
            if res.rowcount == 1:
                return True, holder
            row = conn.execute(sa.select(lt).where(lt.c.Name == LEASE_NAME)).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(sa.insert(lt).values(
                            Name=LEASE_NAME, Holder=holder, Host=host, Pid=pid,
                            AcquiredAt=ts, ExpiresAt=expires))
                    return True, holder
                except sa.exc.IntegrityError:
                    row = conn.execute(sa.select(lt).where(lt.c.Name == LEASE_NAME)).first()
                    return False, row.Holder if row else None
            if holder_alive is False:
                res = conn.execute(sa.update(lt).where(
                    lt.c.Name == LEASE_NAME, lt.c.Holder == row.Holder).values(
                    Holder=holder, Host=host, Pid=pid, ExpiresAt=expires, AcquiredAt=ts))
                if res.rowcount == 1:
                    return True, holder
            return False, str(row.Holder)

    def lease_info(self) -> dict[str, Any] | None:
        """The lease row as a dict (None when never taken)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.lease).where(self.lease.c.Name == LEASE_NAME)).first()
            return None if row is None else dict(row._mapping)

    def release_lease(self, *, holder: str) -> None:
        """Give the lease up (graceful stop) so a successor starts at once."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(self.lease).where(self.lease.c.Name == LEASE_NAME,
                                                     self.lease.c.Holder == holder))

    # --- status --------------------------------------------------------------------------------
    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per state in the ledger and in the outbox."""
        out: dict[str, dict[str, int]] = {"items": {}, "orders": {}}
        with self.engine.connect() as conn:
            for table, key in ((self.items, "items"), (self.orders, "orders")):
                q = sa.select(table.c.State, sa.func.count()).group_by(table.c.State)
                out[key] = {str(s): int(n) for s, n in conn.execute(q)}
        return out

    def oldest_waiting(self) -> dt.datetime | None:
        """Creation time of the oldest order not yet final."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.min(self.orders.c.CreatedAt)).where(
                self.orders.c.State.in_([ORDER_PENDING, ORDER_SENDING]))).scalar()

    def items_by_state(self, state: str, limit: int = 1000) -> list[ItemRow]:
        """Ledger rows in one state."""
        q = (sa.select(self.items).where(self.items.c.State == state)
             .order_by(self.items.c.ItemId).limit(limit))
        with self.engine.connect() as conn:
            return [_item_row(r) for r in conn.execute(q)]

    def attempts_of(self, order_id: int) -> list[dict[str, Any]]:
        """Every attempt of one order."""
        q = (sa.select(self.attempts).where(self.attempts.c.OrderId == order_id)
             .order_by(self.attempts.c.AttemptId))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]


def _item_row(r: Any) -> ItemRow:
    snap = None
    if r.Snapshot:
        try:
            snap = LisItem.from_json(json.loads(r.Snapshot))
        except (ValueError, TypeError):
            snap = None
    return ItemRow(item_id=int(r.ItemId), requisition_id=int(r.RequisitionId), state=r.State,
                   order_id=None if r.OrderId is None else int(r.OrderId), reason=r.Reason,
                   snapshot=snap)


def _order_row(r: Any) -> OrderRow:
    return OrderRow(
        order_id=int(r.OrderId), requisition_id=int(r.RequisitionId), seq=int(r.Seq),
        item_ids=tuple(int(x) for x in str(r.ItemIds).split(",") if x),
        generation=int(r.Generation), key=str(r.IdempotencyKey), state=str(r.State),
        attempts=int(r.Attempts), key_attempts=int(r.KeyAttempts),
        key_answered=bool(r.KeyAnswered), key_uncertain=bool(r.KeyUncertain),
        first_attempt_at=r.FirstAttemptAt,
        payload=json.loads(r.Payload), last_error=r.LastError, last_status=r.LastStatus,
        failed_file=r.FailedFile, holder=r.Holder,
    )
