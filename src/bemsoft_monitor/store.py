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
from .scan import Gap

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
ITEM_RESOLVED = "resolved"  # refused, then marked resolved by a person (never sent)

# Outbox order states.
ORDER_PENDING = "pending"
ORDER_SENDING = "sending"
ORDER_DELIVERED = "delivered"
ORDER_DEAD = "dead"
ORDER_CONFERIR = "conferir"
ORDER_RESOLVED = "resolved"  # marked resolved by a person

FINAL_ORDER_STATES = (ORDER_DELIVERED, ORDER_DEAD, ORDER_CONFERIR, ORDER_RESOLVED)

_DateTime = sa.DateTime().with_variant(mssql.DATETIME2(), "mssql")  # type: ignore[no-untyped-call]
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
        sa.Column("UpdatedAt", _DateTime, nullable=False,
                  server_default=sa.func.current_timestamp()),
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
        # Bumped by every write that changes what a settle would do (new items, refused
        # items back in the queue); a settle commits its "done" only on the version it read.
        sa.Column("Version", sa.Integer, nullable=False, default=0, server_default="0"),
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
        # The claim query reads pending orders by due time; delivered rows pile up for
        # years and must not be walked on every poll.
        sa.Index("ix_monitororder_state_next", "State", "NextAttemptAt", "OrderId"),
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
        sa.Column("Holder", sa.String(200), nullable=True),  # the monitor that sent it
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
        sa.Column("LastPollAt", _DateTime, nullable=True),  # holder's last successful poll
    )
    sa.Table(
        "_MonitorFlag", md,
        sa.Column("Name", sa.String(64), primary_key=True),
        sa.Column("Value", _LongText, nullable=True),
        sa.Column("UpdatedAt", _DateTime, nullable=False),
    )
    return md


def _chunks(values: Sequence[int], size: int = 500) -> Iterable[list[int]]:
    """Slices of at most ``size`` ids (IN lists stay far below SQL Server's 2100 parameters)."""
    for start in range(0, len(values), size):
        yield list(values[start:start + size])


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
class SettlePlan:
    """What one requisition's settle writes (see :meth:`StateStore.settle_many`)."""

    req_id: int
    current: tuple[LisItem, ...]
    to_send_ids: tuple[int, ...]
    drafts: tuple[OrderDraft, ...]
    refusals: tuple[Refusal, ...]
    # Version of the requisition when it was read as due; None = do not guard.
    version: int | None = None


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


_ITEM_STATE_OF_ORDER = {
    ORDER_DELIVERED: ITEM_DELIVERED, ORDER_DEAD: ITEM_DEAD, ORDER_CONFERIR: ITEM_CONFERIR,
    ORDER_PENDING: ITEM_ORDERED, ORDER_RESOLVED: ITEM_DELIVERED,
}


@dataclass(frozen=True)
class Finish:
    """One attempt's outcome and the order's next state (see :meth:`StateStore.finish_many`)."""

    order: OrderRow
    state: str
    status: int | None
    outcome: str
    detail: str
    elapsed_ms: int | None = None
    next_attempt_at: dt.datetime | None = None
    new_generation: bool = False
    key_answered: bool | None = None
    key_uncertain: bool | None = None
    failed_file: str | None = None
    response: str = ""  # start of the response body, kept with the attempt

    def attempt_detail(self) -> str:
        """What the attempt row keeps: the outcome and the start of the answer."""
        text = self.detail
        if self.response and self.response not in text:
            text += "\nresposta: " + self.response
        return text[:4000]

    def order_values(self, ts: dt.datetime) -> dict[str, Any]:
        """Columns of the outbox row this outcome writes."""
        values: dict[str, Any] = {
            "State": self.state, "Holder": None, "UpdatedAt": ts, "LastStatus": self.status,
            "LastOutcome": self.outcome,
            "LastError": self.detail if self.state != ORDER_DELIVERED else None,
        }
        if self.next_attempt_at is not None:
            values["NextAttemptAt"] = utc_naive(self.next_attempt_at)
        if self.key_answered is not None:
            values["KeyAnswered"] = self.key_answered
        if self.key_uncertain is not None:
            values["KeyUncertain"] = self.key_uncertain
        if self.new_generation:
            order = self.order
            gen = order.generation + 1
            values.update(Generation=gen, KeyAttempts=0, KeyAnswered=False, KeyUncertain=False,
                          IdempotencyKey=idempotency_key(
                              order.requisition_id, order.seq,
                              item_set_hash(order.item_ids), gen))
        if self.state == ORDER_DELIVERED:
            values["DeliveredAt"] = ts
        if self.failed_file is not None:
            values["FailedFile"] = self.failed_file
        return values


@dataclass(frozen=True)
class Exchange:
    """What :meth:`StateStore.exchange` did: answers written (per spec) and orders claimed."""

    written: list[bool]
    claimed: list[OrderRow]


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
        # Bumped by every write of this process that can make work due; the engine skips
        # outbox queries while it is unchanged and nothing is due (idle polls).
        self.work_version = 0
        self._build_statements()

    def _read(self) -> Connection:
        """A connection for reading (on SQLite it does not take the write lock)."""
        return self.engine.connect().execution_options(bm_read_only=True)

    def _build_statements(self) -> None:
        """Statements of the hot path, built once (SQLAlchemy memoizes their cache keys)."""
        i, r, o = self.items, self.reqs, self.orders
        b = sa.bindparam
        ids: sa.BindParameter[Any] = b("b_ids", expanding=True)
        self._stmt_set_items = sa.update(i).where(i.c.ItemId.in_(ids)).values(
            State=b("b_state"), UpdatedAt=b("b_ts"), Reason=b("b_reason"))
        self._stmt_set_items_order = sa.update(i).where(i.c.ItemId.in_(ids)).values(
            State=b("b_state"), UpdatedAt=b("b_ts"), Reason=b("b_reason"),
            OrderId=b("b_order"))
        lt = self.lease
        # Fenced by the lease: a monitor whose lease expired (or was taken over) claims
        # nothing, even if it has not noticed yet.
        lease_held = sa.exists().where(lt.c.Name == LEASE_NAME, lt.c.Holder == b("b_holder"),
                                       lt.c.ExpiresAt >= b("b_ts3"))
        self._stmt_claim = sa.update(o).where(o.c.OrderId.in_(ids), o.c.State == ORDER_PENDING,
                                              lease_held)\
            .values(State=ORDER_SENDING, Holder=b("b_holder"), Attempts=o.c.Attempts + 1,
                    KeyAttempts=o.c.KeyAttempts + 1, UpdatedAt=b("b_ts"),
                    FirstAttemptAt=sa.func.coalesce(o.c.FirstAttemptAt, b("b_ts2")))
        self._stmt_claimed = sa.select(o).where(
            o.c.OrderId.in_(ids), o.c.State == ORDER_SENDING, o.c.Holder == b("b_holder"),
            o.c.UpdatedAt == b("b_ts"))
        self._stmt_lock = (sa.select(o.c.OrderId, o.c.Holder)
                           .where(o.c.OrderId.in_(ids), o.c.State == ORDER_SENDING)
                           # FOR UPDATE on PostgreSQL, UPDLOCK on SQL Server; SQLite's BEGIN
                           # IMMEDIATE already made the transaction the only writer.
                           .with_for_update()
                           .with_hint(o, "WITH (UPDLOCK, ROWLOCK)", "mssql"))
        self._stmt_open_attempt = sa.insert(self.attempts)
        self._stmt_first_unfinished = (
            sa.select(o.c.RequisitionId, sa.func.min(o.c.Seq).label("Seq"))
            .where(o.c.RequisitionId.in_(b("b_reqs", expanding=True)),
                   o.c.State.in_([ORDER_PENDING, ORDER_SENDING]))
            .group_by(o.c.RequisitionId))
        self._claimable_stmts: dict[int, sa.Executable] = {}
        self._stmt_snapshot = sa.update(i).where(i.c.ItemId == b("b_id")).values(
            Snapshot=b("b_snap"))
        self._stmt_refuse = sa.update(i).where(i.c.ItemId == b("b_id")).values(
            State=b("b_state"), Reason=b("b_reason"), UpdatedAt=b("b_ts"))
        self._stmt_order_items = sa.update(i).where(i.c.ItemId == b("b_id")).values(
            State=b("b_state"), OrderId=b("b_order"), Reason=None, UpdatedAt=b("b_ts"))
        a = self.attempts
        # One attempt per order is open at a time (claim opens it, finish or recovery closes it).
        self._stmt_close_attempt = sa.update(a).where(
            a.c.OrderId == b("b_id"), a.c.FinishedAt.is_(None)).values(
            FinishedAt=b("b_ts"), Status=b("b_status"), Outcome=b("b_outcome"),
            Detail=b("b_detail"), ElapsedMs=b("b_elapsed"))
        self._finish_stmts: dict[tuple[str, ...], sa.Update] = {}
        self._stmt_settled: dict[bool, sa.Update] = {}
        for guarded in (False, True):
            stmt = sa.update(r).where(r.c.RequisitionId == b("b_id"))
            if guarded:
                stmt = stmt.where(r.c.Version == b("b_version"))
            self._stmt_settled[guarded] = stmt.values(DueAt=None, UpdatedAt=b("b_ts"))
        # The order counter moves forward whatever else changed meanwhile: the orders exist.
        self._stmt_order_seq = sa.update(r).where(
            r.c.RequisitionId == b("b_id"), r.c.OrderSeq < b("b_seq")).values(
            OrderSeq=b("b_seq"))

    def _claimable_statement(self, limit: int) -> sa.Executable:
        """Pending orders due now, oldest first (TOP n on SQL Server); built once per size."""
        stmt = self._claimable_stmts.get(limit)
        if stmt is None:
            o = self.orders
            stmt = (sa.select(o.c.OrderId, o.c.RequisitionId, o.c.Seq)
                    .where(o.c.State == ORDER_PENDING, o.c.NextAttemptAt <= sa.bindparam("b_now"))
                    .order_by(o.c.NextAttemptAt, o.c.OrderId)
                    .limit(limit))
            self._claimable_stmts[limit] = stmt
        return stmt

    # --- schema ------------------------------------------------------------------------
    def create_tables(self) -> None:
        """Create missing tables and indexes (an existing seed ``_MonitorState`` is kept)."""
        self.md.create_all(self.engine, checkfirst=True)
        # create_all skips the indexes of tables that already exist: add the ones a newer
        # version introduced.
        inspector = sa.inspect(self.engine)
        for table in self.md.sorted_tables:
            existing = {ix["name"] for ix in inspector.get_indexes(table.name,
                                                                   schema=table.schema)}
            for index in table.indexes:
                if index.name not in existing:
                    index.create(self.engine, checkfirst=True)
            self._add_missing_columns(table, inspector)

    def _add_missing_columns(self, table: sa.Table, inspector: sa.Inspector) -> None:
        """Columns a newer version added to an existing table (nullable or with a default)."""
        present = {c["name"].lower() for c in inspector.get_columns(table.name,
                                                                      schema=table.schema)}
        preparer = self.engine.dialect.identifier_preparer
        for column in table.columns:
            if column.name.lower() in present or (column.server_default is None
                                                  and not column.nullable):
                continue
            ddl = sa.schema.CreateColumn(column).compile(dialect=self.engine.dialect)
            with self.engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {preparer.format_table(table)} ADD {ddl}")
            log.info("banco de estado: coluna %s.%s criada", table.name, column.name)

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    # --- checkpoint ----------------------------------------------------------------------
    def _checkpoint_row(self, conn: Connection | None) -> Any:
        """The ``ItemSolMonitor`` row's (LastItemId,), None when there is no row."""
        q = sa.select(self.state.c.LastItemId).where(self.state.c.Name == CHECKPOINT_NAME)
        if conn is not None:
            return conn.execute(q).first()
        with self._read() as c:
            return c.execute(q).first()

    def checkpoint(self, conn: Connection | None = None) -> int | None:
        """LastItemId of the ``ItemSolMonitor`` row, None when there is no row yet."""
        row = self._checkpoint_row(conn)
        if row is None:
            return None
        return int(row[0]) if row[0] is not None else 0

    def checkpoint_unset(self) -> bool:
        """True when there is no checkpoint row, or the seed's row holds a NULL LastItemId."""
        row = self._checkpoint_row(None)
        return row is None or row[0] is None

    def init_checkpoint(self, value: int, now: dt.datetime) -> int:
        """Set the first checkpoint when unset (a seed row's value is honoured); return it."""
        with self.engine.begin() as conn:
            row = self._checkpoint_row(conn)
            if row is None:
                conn.execute(sa.insert(self.state).values(
                    Name=CHECKPOINT_NAME, LastItemId=value, UpdatedAt=utc_naive(now)))
                return value
            if row[0] is None:
                self._set_checkpoint(conn, value, now)
                return value
            return int(row[0])

    def _set_checkpoint(self, conn: Connection, value: int, now: dt.datetime) -> None:
        conn.execute(sa.update(self.state).where(self.state.c.Name == CHECKPOINT_NAME).values(
            LastItemId=value, UpdatedAt=utc_naive(now)))

    def open_gaps(self, *, now: dt.datetime, grace_s: float) -> list[Gap]:
        """Id ranges still inside the out-of-order grace window; older ones are dropped."""
        limit = utc_naive(now) - dt.timedelta(seconds=grace_s)
        with self.engine.begin() as conn:
            expired = conn.execute(sa.delete(self.gaps).where(self.gaps.c.FirstSeenAt < limit))
            if expired.rowcount:
                log.debug("lacunas de CodItemSol expiradas: %s", expired.rowcount)
            rows = conn.execute(sa.select(self.gaps.c.Lo, self.gaps.c.Hi, self.gaps.c.FirstSeenAt)
                                .order_by(self.gaps.c.Lo))
            return [Gap(int(r.Lo), int(r.Hi), r.FirstSeenAt) for r in rows]

    # --- ingest --------------------------------------------------------------------------
    def record_items(
        self,
        items: Sequence[LisItem],
        *,
        checkpoint: int | None,
        gaps: Sequence[Gap] | None,
        now: dt.datetime,
        debounce_s: float,
    ) -> IngestResult:
        """Record the items read, the checkpoint and the open gaps: ONE transaction.

        ``gaps`` replaces the whole set of open gaps (None leaves it as it is).
        """
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
                self._touch_requisitions(conn, sorted({i.requisition_id for i in fresh}),
                                         ts, due)
                self.work_version += 1
            if gaps is not None:
                conn.execute(sa.delete(self.gaps))
                if gaps:
                    conn.execute(sa.insert(self.gaps), [
                        {"Lo": g.lo, "Hi": g.hi, "FirstSeenAt": utc_naive(g.first_seen)}
                        for g in gaps])
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

    def _touch_requisitions(
        self, conn: Connection, req_ids: Sequence[int], ts: dt.datetime, due: dt.datetime
    ) -> None:
        """Schedule the requisitions' settle; the debounce counts from first sight."""
        r = self.reqs
        known: dict[int, dt.datetime | None] = {}
        for chunk in _chunks(req_ids):
            rows = conn.execute(sa.select(r.c.RequisitionId, r.c.DueAt)
                                .where(r.c.RequisitionId.in_(chunk)))
            known.update((int(row.RequisitionId), row.DueAt) for row in rows)
        fresh = [rid for rid in req_ids if rid not in known]
        if fresh:
            conn.execute(sa.insert(r), [
                {"RequisitionId": rid, "FirstSeenAt": ts, "DueAt": due, "OrderSeq": 0,
                 "UpdatedAt": ts, "Version": 0} for rid in fresh])
        # A requisition already settled gets a new debounce for its late items; one still
        # waiting keeps its due time (the debounce counts from first sight).
        settled = [rid for rid, due_at in known.items() if due_at is None]
        waiting = [rid for rid, due_at in known.items() if due_at is not None]
        for chunk in _chunks(settled):
            conn.execute(sa.update(r).where(r.c.RequisitionId.in_(chunk))
                         .values(DueAt=due, UpdatedAt=ts, Version=r.c.Version + 1))
        for chunk in _chunks(waiting):
            conn.execute(sa.update(r).where(r.c.RequisitionId.in_(chunk))
                         .values(UpdatedAt=ts, Version=r.c.Version + 1))

    # --- settle --------------------------------------------------------------------------
    def due_requisitions(self, *, now: dt.datetime, limit: int) -> list[tuple[int, int]]:
        """Requisitions whose debounce has ended, oldest first, with their version.

        The version lets :meth:`settle_many` notice a requisition that another thread or
        process touched meanwhile (painel, ``retry --refused``).
        """
        r = self.reqs
        q = (sa.select(r.c.RequisitionId, r.c.Version)
             .where(r.c.DueAt.is_not(None), r.c.DueAt <= utc_naive(now))
             .order_by(r.c.DueAt, r.c.RequisitionId).limit(limit))
        with self._read() as conn:
            return [(int(x.RequisitionId), int(x.Version or 0)) for x in conn.execute(q)]

    def next_attempt_at(self) -> dt.datetime | None:
        """When the next pending order may be sent (None when none is pending)."""
        o = self.orders
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.min(o.c.NextAttemptAt))
                                .where(o.c.State == ORDER_PENDING)).scalar()

    def next_due_at(self) -> dt.datetime | None:
        """When the next requisition settles (None when none waits)."""
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.min(self.reqs.c.DueAt))).scalar()

    def requisition_items(self, req_id: int, conn: Connection | None = None) -> list[ItemRow]:
        """Ledger rows of one requisition."""
        q = (sa.select(self.items).where(self.items.c.RequisitionId == req_id)
             .order_by(self.items.c.ItemId))
        if conn is None:
            with self._read() as c:
                rows = c.execute(q).all()
        else:
            rows = conn.execute(q).all()
        return [_item_row(r) for r in rows]

    def ledger_states(self, req_ids: Sequence[int]) -> dict[int, dict[int, str]]:
        """Item states per requisition, for many requisitions in one query."""
        out: dict[int, dict[int, str]] = {rid: {} for rid in req_ids}
        i = self.items
        with self._read() as conn:
            for chunk in _chunks(req_ids):
                rows = conn.execute(sa.select(i.c.ItemId, i.c.RequisitionId, i.c.State)
                                    .where(i.c.RequisitionId.in_(chunk)))
                for row in rows:
                    out.setdefault(int(row.RequisitionId), {})[int(row.ItemId)] = str(row.State)
        return out

    def order_seqs(self, req_ids: Sequence[int]) -> dict[int, int]:
        """How many orders each requisition already has (for the next externalId suffix)."""
        out = dict.fromkeys(req_ids, 0)
        r = self.reqs
        with self._read() as conn:
            for chunk in _chunks(req_ids):
                for row in conn.execute(sa.select(r.c.RequisitionId, r.c.OrderSeq)
                                        .where(r.c.RequisitionId.in_(chunk))):
                    out[int(row.RequisitionId)] = int(row.OrderSeq or 0)
        return out

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
        """Apply one requisition's settle (see :meth:`settle_many`); return its new order ids."""
        plan = SettlePlan(req_id=req_id, current=tuple(current), to_send_ids=tuple(to_send_ids),
                          drafts=tuple(drafts), refusals=tuple(refusals))
        return self.settle_many([plan], now=now)[req_id]

    def settle_many(self, plans: Sequence[SettlePlan], *, now: dt.datetime) -> dict[int, list[int]]:
        """Apply the settles of many requisitions in ONE transaction; new order ids per one.

        ``plan.current`` is the requisition as the LIS has it now. Pending items missing from
        it are cancelled; items of it not yet in the ledger are added; drafts become outbox
        orders and their items ``ordered``; refusals are recorded with their reason. A
        requisition whose version changed since it was read as due keeps its due time, so
        whatever changed it is settled on the next pass.
        """
        ts = utc_naive(now)
        i, o = self.items, self.orders
        req_ids = [p.req_id for p in plans]
        new_orders: dict[int, list[int]] = {rid: [] for rid in req_ids}
        gone: list[int] = []
        added: list[dict[str, Any]] = []
        snapshots: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        order_rows: list[dict[str, Any]] = []
        with self.engine.begin() as conn:
            # item id -> (state, snapshot) per requisition, read inside the transaction.
            ledger: dict[int, dict[int, tuple[str, str | None]]] = {rid: {} for rid in req_ids}
            for chunk in _chunks(req_ids):
                for lrow in conn.execute(sa.select(i.c.ItemId, i.c.RequisitionId, i.c.State,
                                                   i.c.Snapshot)
                                         .where(i.c.RequisitionId.in_(chunk))):
                    ledger.setdefault(int(lrow.RequisitionId), {})[int(lrow.ItemId)] = (
                        str(lrow.State), lrow.Snapshot)
            for plan in plans:
                known = ledger.get(plan.req_id, {})
                current_ids = {item.item_id for item in plan.current}
                to_send = set(plan.to_send_ids)
                # Items that vanished (deleted, moved to another lab) before being sent.
                gone.extend(iid for iid, (state, _snap) in known.items()
                            if state == ITEM_PENDING and iid not in current_ids)
                for item in plan.current:
                    snap = json.dumps(item.to_json(), ensure_ascii=False)
                    if item.item_id not in known:
                        # Added to the LIS after the poll passed it (or met in another lab).
                        added.append({"ItemId": item.item_id,
                                      "RequisitionId": item.requisition_id,
                                      "State": ITEM_PENDING, "Snapshot": snap,
                                      "FirstSeenAt": ts, "UpdatedAt": ts})
                    elif item.item_id in to_send and known[item.item_id][1] != snap:
                        # The LIS changed the row: keep what is about to be sent.
                        snapshots.append({"b_id": item.item_id, "b_snap": snap})
                refused.extend({"b_id": f.item_id, "b_reason": f.reason} for f in plan.refusals)
                for draft in plan.drafts:
                    set_hash = item_set_hash(draft.item_ids)
                    order_rows.append({
                        "RequisitionId": plan.req_id, "Seq": draft.seq,
                        "ItemIds": ",".join(str(x) for x in sorted(draft.item_ids)),
                        "ItemSetHash": set_hash, "Generation": 1,
                        "IdempotencyKey": idempotency_key(plan.req_id, draft.seq, set_hash, 1),
                        "State": ORDER_PENDING, "Attempts": 0, "KeyAttempts": 0,
                        "KeyAnswered": False, "KeyUncertain": False, "NextAttemptAt": ts,
                        "Payload": json.dumps(draft.payload, ensure_ascii=False),
                        "CreatedAt": ts, "UpdatedAt": ts,
                    })
            if gone:
                self._set_items(conn, gone, ITEM_CANCELLED, ts,
                                reason="item removido do LIS ou transferido para outro "
                                       "laboratório antes do envio")
            if added:
                conn.execute(sa.insert(i), added)
            if snapshots:
                conn.execute(self._stmt_snapshot, snapshots)
            if refused:
                conn.execute(self._stmt_refuse, [{**row, "b_state": ITEM_REFUSED, "b_ts": ts}
                                                 for row in refused])
            ordered: list[dict[str, Any]] = []
            seqs: dict[int, int] = {}
            if order_rows:
                ids = conn.execute(
                    sa.insert(o).returning(o.c.OrderId, sort_by_parameter_order=True),
                    order_rows).scalars().all()
                for row, order_id in zip(order_rows, ids, strict=True):
                    rid = int(row["RequisitionId"])
                    new_orders[rid].append(int(order_id))
                    seqs[rid] = max(seqs.get(rid, 0), int(row["Seq"]))
                    ordered.extend({"b_id": int(x), "b_order": int(order_id), "b_ts": ts,
                                    "b_state": ITEM_ORDERED}
                                   for x in str(row["ItemIds"]).split(","))
            if ordered:
                conn.execute(self._stmt_order_items, ordered)
            if seqs:
                conn.execute(self._stmt_order_seq, [{"b_id": rid, "b_seq": seq}
                                                    for rid, seq in seqs.items()])
            groups: dict[bool, list[dict[str, Any]]] = {}
            for plan in plans:
                params: dict[str, Any] = {"b_id": plan.req_id, "b_ts": ts}
                if plan.version is not None:
                    params["b_version"] = plan.version
                groups.setdefault(plan.version is not None, []).append(params)
            for guarded, group in groups.items():
                conn.execute(self._stmt_settled[guarded], group)
        self.work_version += 1
        return new_orders

    def order_seq(self, req_id: int) -> int:
        """How many orders the requisition already has (for the next externalId suffix)."""
        return self.order_seqs([req_id])[req_id]

    def _set_items(
        self, conn: Connection, ids: Sequence[int], state: str, ts: dt.datetime, *,
        reason: str | None = None, order_id: int | None = None,
    ) -> None:
        params: dict[str, Any] = {"b_state": state, "b_ts": ts, "b_reason": reason}
        stmt = self._stmt_set_items
        if order_id is not None:
            params["b_order"] = order_id
            stmt = self._stmt_set_items_order
        for chunk in _chunks(ids):
            conn.execute(stmt, {**params, "b_ids": chunk})

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
            reqs = self.reqs
            for chunk in _chunks(sorted({int(r.RequisitionId) for r in rows})):
                conn.execute(sa.update(reqs).where(reqs.c.RequisitionId.in_(chunk))
                             .values(DueAt=ts, UpdatedAt=ts, Version=reqs.c.Version + 1))
        self.work_version += 1
        return len(rows)

    def resolve_refused(self, item_ids: Sequence[int], *, now: dt.datetime, note: str) -> int:
        """Refused items a person dealt with outside the monitor: never sent; return how many."""
        ts = utc_naive(now)
        i = self.items
        with self.engine.begin() as conn:
            ids = [int(x) for x in conn.execute(sa.select(i.c.ItemId).where(
                i.c.ItemId.in_(list(item_ids)), i.c.State == ITEM_REFUSED)).scalars()]
            if ids:
                self._set_items(conn, ids, ITEM_RESOLVED, ts, reason=note)
        return len(ids)

    # --- outbox ----------------------------------------------------------------------------
    def recover_inflight(self, *, now: dt.datetime, holder: str | None = None) -> int:
        """Orders left in 'sending' go back to pending with the same key.

        Without ``holder``: every such order (a dead holder's, on taking the lease over);
        with it: only that holder's (a graceful stop).
        """
        ts = utc_naive(now)
        o, a = self.orders, self.attempts
        cond: list[sa.ColumnElement[bool]] = [o.c.State == ORDER_SENDING]
        if holder is not None:
            cond.append(o.c.Holder == holder)
        with self.engine.begin() as conn:
            ids = [int(x) for x in conn.execute(sa.select(o.c.OrderId).where(*cond)).scalars()]
            for chunk in _chunks(ids):
                conn.execute(sa.update(o).where(o.c.OrderId.in_(chunk), *cond).values(
                    State=ORDER_PENDING, NextAttemptAt=ts, Holder=None, UpdatedAt=ts,
                    LastOutcome="no_answer", KeyUncertain=True,
                    LastError="envio interrompido (processo parado durante o envio)"))
                conn.execute(sa.update(a).where(a.c.OrderId.in_(chunk),
                                                a.c.FinishedAt.is_(None))
                             .values(FinishedAt=ts, Outcome="interrupted"))
        self.work_version += 1
        return len(ids)

    def claimable_orders(self, *, now: dt.datetime, limit: int,
                         exclude_requisitions: Iterable[int] = ()) -> list[tuple[int, int]]:
        """(order, requisition) of pending orders due now, first unfinished of their requisition.

        Two plain index lookups rather than one correlated NOT EXISTS: after a backlog
        arrives, PostgreSQL's statistics lag and its plan for the subquery turned
        quadratic (seconds per poll on 8,000 pending orders).
        """
        excluded = set(exclude_requisitions)
        with self._read() as conn:
            # requisition -> its lowest-seq due order; requisitions in order of first due time
            due: dict[int, tuple[int, int]] = {}
            for r in conn.execute(self._claimable_statement(limit), {"b_now": utc_naive(now)}):
                req, seq = int(r.RequisitionId), int(r.Seq)
                if req not in excluded and (req not in due or seq < due[req][1]):
                    due[req] = (int(r.OrderId), seq)
            if not due:
                return []
            first = {int(r.RequisitionId): int(r.Seq)
                     for r in conn.execute(self._stmt_first_unfinished,
                                           {"b_reqs": list(due)})}
            return [(order, req) for req, (order, seq) in due.items() if first.get(req) == seq]

    def claim(self, order_id: int, *, holder: str, now: dt.datetime) -> OrderRow | None:
        """Mark one pending order as being sent (attempt recorded first); None if taken."""
        claimed = self.claim_many([order_id], holder=holder, now=now)
        return claimed[0] if claimed else None

    def claim_many(self, order_ids: Sequence[int], *, holder: str,
                   now: dt.datetime) -> list[OrderRow]:
        """Mark pending orders as being sent, each with an open attempt: ONE transaction.

        Orders no longer pending (taken by someone else) are left out of the result.
        """
        return self.exchange([], now=now, claim_ids=order_ids, holder=holder).claimed

    def _claim_in(self, conn: Connection, order_ids: Sequence[int], holder: str,
                  ts: dt.datetime) -> list[OrderRow]:
        claimed: dict[int, OrderRow] = {}
        for chunk in _chunks(order_ids):
            conn.execute(self._stmt_claim, {"b_ids": chunk, "b_holder": holder, "b_ts": ts,
                                            "b_ts2": ts, "b_ts3": ts})
            for r in conn.execute(self._stmt_claimed, {"b_ids": chunk, "b_holder": holder,
                                                       "b_ts": ts}):
                claimed[int(r.OrderId)] = _order_row(r)
        if claimed:
            conn.execute(self._stmt_open_attempt, [
                {"OrderId": row.order_id, "IdempotencyKey": row.key, "StartedAt": ts,
                 "Holder": holder} for row in claimed.values()])
        return [claimed[i] for i in order_ids if i in claimed]

    def release_claims(self, order_ids: Sequence[int], *, holder: str) -> int:
        """Claimed orders that never went on the wire: pending again as before the claim.

        Same key, one attempt less, no attempt row; only while still claimed by ``holder``.
        """
        o, a = self.orders, self.attempts
        released = 0
        with self.engine.begin() as conn:
            for chunk in _chunks(list(order_ids)):
                res = conn.execute(sa.update(o).where(
                    o.c.OrderId.in_(chunk), o.c.State == ORDER_SENDING, o.c.Holder == holder)
                    .values(State=ORDER_PENDING, Holder=None,
                            Attempts=o.c.Attempts - 1, KeyAttempts=o.c.KeyAttempts - 1,
                            # SET reads the row as it was: Attempts is still the claimed one.
                            FirstAttemptAt=sa.case((o.c.Attempts == 1, sa.null()),
                                                   else_=o.c.FirstAttemptAt)))
                released += int(res.rowcount or 0)
                conn.execute(sa.delete(a).where(a.c.OrderId.in_(chunk), a.c.FinishedAt.is_(None),
                                                a.c.Holder == holder))
        self.work_version += 1
        return released

    def _order(self, conn: Connection, order_id: int) -> OrderRow | None:
        r = conn.execute(sa.select(self.orders).where(self.orders.c.OrderId == order_id)).first()
        return None if r is None else _order_row(r)

    def get_order(self, order_id: int) -> OrderRow | None:
        """One outbox row."""
        with self._read() as conn:
            return self._order(conn, order_id)

    def orders_by_state(self, state: str, limit: int = 1000) -> list[OrderRow]:
        """Outbox rows in one state, oldest first."""
        q = (sa.select(self.orders).where(self.orders.c.State == state)
             .order_by(self.orders.c.OrderId).limit(limit))
        with self._read() as conn:
            return [_order_row(r) for r in conn.execute(q)]

    def orders_of_requisition(self, req_id: int) -> list[OrderRow]:
        """Every order of one requisition."""
        q = (sa.select(self.orders).where(self.orders.c.RequisitionId == req_id)
             .order_by(self.orders.c.Seq))
        with self._read() as conn:
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
        """Record one attempt's outcome (see :meth:`finish_many`); False when fenced."""
        spec = Finish(order=order, state=state, status=status, outcome=outcome, detail=detail,
                      elapsed_ms=elapsed_ms, next_attempt_at=next_attempt_at,
                      new_generation=new_generation, key_answered=key_answered,
                      key_uncertain=key_uncertain, failed_file=failed_file)
        return self.finish_many([spec], now=now)[0]

    def finish_many(self, specs: Sequence[Finish], *, now: dt.datetime,
                    flags: dict[str, str | None] | None = None) -> list[bool]:
        """Record attempts' outcomes (see :meth:`exchange`); per spec, whether it was written."""
        return self.exchange(specs, now=now, flags=flags).written

    def exchange(self, specs: Sequence[Finish], *, now: dt.datetime,
                 flags: dict[str, str | None] | None = None, claim_ids: Sequence[int] = (),
                 holder: str = "") -> Exchange:
        """Record answers, set flags and claim the next orders: ONE transaction.

        Fenced: an answer is written only while its order is still being sent by the holder
        that claimed it (the rows are locked first), so a monitor that lost its lease cannot
        overwrite the successor's record. Items follow their order's state.
        """
        ts = utc_naive(now)
        with self.engine.begin() as conn:
            written = self._finish_in(conn, specs, ts) if specs else []
            for name, value in (flags or {}).items():
                self._set_flag(conn, name, value, ts)
            claimed = self._claim_in(conn, claim_ids, holder, ts) if claim_ids else []
        if any(written):
            self.work_version += 1  # a retry became due, or a later order was unblocked
        return Exchange(written=written, claimed=claimed)

    def _finish_in(self, conn: Connection, specs: Sequence[Finish], ts: dt.datetime) -> list[bool]:
        held: set[tuple[int, str | None]] = set()
        for chunk in _chunks([spec.order.order_id for spec in specs]):
            held.update((int(r.OrderId), r.Holder)
                        for r in conn.execute(self._stmt_lock, {"b_ids": chunk}))
        written = [(spec.order.order_id, spec.order.holder) in held for spec in specs]
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        attempts: list[dict[str, Any]] = []
        items: dict[tuple[str, str | None], list[int]] = {}
        for spec, ok in zip(specs, written, strict=True):
            if not ok:
                continue
            order = spec.order
            values = spec.order_values(ts)
            shapes.setdefault(tuple(sorted(values)), []).append(
                {"b_id": order.order_id, "b_holder": order.holder,
                 **{"v_" + k: v for k, v in values.items()}})
            attempts.append({"b_id": order.order_id, "b_ts": ts, "b_status": spec.status,
                             "b_outcome": spec.outcome, "b_detail": spec.attempt_detail(),
                             "b_elapsed": spec.elapsed_ms})
            item_state = _ITEM_STATE_OF_ORDER.get(spec.state)
            if item_state is not None:
                reason = None if spec.state in (ORDER_DELIVERED, ORDER_PENDING) else spec.detail
                items.setdefault((item_state, reason), []).extend(order.item_ids)
        for keys, rows in shapes.items():
            conn.execute(self._finish_statement(keys), rows)
        if attempts:
            conn.execute(self._stmt_close_attempt, attempts)
        for (item_state, reason), ids in items.items():
            self._set_items(conn, ids, item_state, ts, reason=reason)
        return written

    def _finish_statement(self, keys: tuple[str, ...]) -> sa.Update:
        """The fenced UPDATE for one shape of values (built once per shape)."""
        stmt = self._finish_stmts.get(keys)
        if stmt is None:
            o = self.orders
            stmt = (sa.update(o)
                    .where(o.c.OrderId == sa.bindparam("b_id"), o.c.State == ORDER_SENDING,
                           o.c.Holder == sa.bindparam("b_holder"))
                    .values({k: sa.bindparam("v_" + k) for k in keys}))
            self._finish_stmts[keys] = stmt
        return stmt

    def holding(self, order_ids: Sequence[int], holder: str) -> set[int]:
        """Which of these orders ``holder`` is still sending."""
        o = self.orders
        out: set[int] = set()
        with self._read() as conn:
            for chunk in _chunks(order_ids):
                out.update(int(x) for x in conn.execute(sa.select(o.c.OrderId).where(
                    o.c.OrderId.in_(chunk), o.c.State == ORDER_SENDING,
                    o.c.Holder == holder)).scalars())
        return out

    def holds(self, order_id: int, holder: str) -> bool:
        """Whether ``holder`` is still the one sending this order."""
        with self._read() as conn:
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
            # A person sends it again: a fresh retry budget (the history stays in attempts).
            values: dict[str, Any] = {"State": ORDER_PENDING, "NextAttemptAt": ts,
                                      "FirstAttemptAt": None, "Attempts": 0, "UpdatedAt": ts}
            if new_generation:
                gen = order.generation + 1
                values.update(Generation=gen, KeyAttempts=0, KeyAnswered=False,
                              KeyUncertain=False, IdempotencyKey=idempotency_key(
                                  order.requisition_id, order.seq,
                                  item_set_hash(order.item_ids), gen))
            conn.execute(sa.update(self.orders).where(self.orders.c.OrderId == order_id)
                         .values(**values))
            self._set_items(conn, list(order.item_ids), ITEM_ORDERED, ts)
        self.work_version += 1
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
        with self.engine.begin() as conn:
            self._set_flag(conn, name, value, utc_naive(now))

    def _set_flag(self, conn: Connection, name: str, value: str | None, ts: dt.datetime) -> None:
        res = conn.execute(sa.update(self.flags).where(self.flags.c.Name == name)
                           .values(Value=value, UpdatedAt=ts))
        if res.rowcount == 0:
            conn.execute(sa.insert(self.flags).values(Name=name, Value=value, UpdatedAt=ts))

    def get_flag(self, name: str) -> tuple[str | None, dt.datetime | None]:
        """Value and time of a flag ((None, None) when never set)."""
        with self._read() as conn:
            row = conn.execute(sa.select(self.flags.c.Value, self.flags.c.UpdatedAt)
                               .where(self.flags.c.Name == name)).first()
            return (None, None) if row is None else (row.Value, row.UpdatedAt)

    # --- lease -----------------------------------------------------------------------------
    def try_lease(
        self, *, holder: str, host: str, pid: int, now: dt.datetime, ttl_s: float,
        holder_alive: bool | None = None, last_poll: dt.datetime | None = None,
    ) -> tuple[bool, str | None]:
        """Take or renew the lease; return (held, current holder).

        ``holder_alive`` is False when the caller knows the current holder is a dead
        process on this same host: the lease is taken at once instead of waiting it out.
        """
        ts = utc_naive(now)
        expires = ts + dt.timedelta(seconds=ttl_s)
        lt = self.lease
        poll = utc_naive(last_poll) if last_poll is not None else None
        with self.engine.begin() as conn:
            cond = sa.or_(lt.c.Holder == holder, lt.c.ExpiresAt < ts)
            res = conn.execute(sa.update(lt).where(lt.c.Name == LEASE_NAME, cond).values(
                Holder=holder, Host=host, Pid=pid, ExpiresAt=expires, LastPollAt=poll,
                AcquiredAt=sa.case((lt.c.Holder == holder, lt.c.AcquiredAt), else_=ts)))
            if res.rowcount == 1:
                return True, holder
            row = conn.execute(sa.select(lt).where(lt.c.Name == LEASE_NAME)).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(sa.insert(lt).values(
                            Name=LEASE_NAME, Holder=holder, Host=host, Pid=pid,
                            AcquiredAt=ts, ExpiresAt=expires, LastPollAt=poll))
                    return True, holder
                except sa.exc.IntegrityError:
                    row = conn.execute(sa.select(lt).where(lt.c.Name == LEASE_NAME)).first()
                    return False, row.Holder if row else None
            if holder_alive is False:
                res = conn.execute(sa.update(lt).where(
                    lt.c.Name == LEASE_NAME, lt.c.Holder == row.Holder).values(
                    Holder=holder, Host=host, Pid=pid, ExpiresAt=expires, AcquiredAt=ts,
                    LastPollAt=poll))
                if res.rowcount == 1:
                    return True, holder
            return False, str(row.Holder)

    def lease_info(self) -> dict[str, Any] | None:
        """The lease row as a dict (None when never taken)."""
        with self._read() as conn:
            row = conn.execute(sa.select(self.lease).where(self.lease.c.Name == LEASE_NAME)).first()
            return None if row is None else dict(row._mapping)

    def release_lease(self, *, holder: str, flags: dict[str, str | None] | None = None,
                      now: dt.datetime | None = None) -> None:
        """Give the lease up (graceful stop) so a successor starts at once; set ``flags``."""
        with self.engine.begin() as conn:
            for name, value in (flags or {}).items():
                self._set_flag(conn, name, value, utc_naive(now or dt.datetime.now(
                    dt.timezone.utc)))
            conn.execute(sa.delete(self.lease).where(self.lease.c.Name == LEASE_NAME,
                                                     self.lease.c.Holder == holder))

    # --- status --------------------------------------------------------------------------------
    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per state in the ledger and in the outbox."""
        out: dict[str, dict[str, int]] = {"items": {}, "orders": {}}
        with self._read() as conn:
            for table, key in ((self.items, "items"), (self.orders, "orders")):
                q = sa.select(table.c.State, sa.func.count()).group_by(table.c.State)
                out[key] = {str(s): int(n) for s, n in conn.execute(q)}
        return out

    def oldest_waiting(self) -> dt.datetime | None:
        """Creation time of the oldest order not yet final."""
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.min(self.orders.c.CreatedAt)).where(
                self.orders.c.State.in_([ORDER_PENDING, ORDER_SENDING]))).scalar()

    def items_by_state(self, state: str, limit: int = 1000) -> list[ItemRow]:
        """Ledger rows in one state."""
        q = (sa.select(self.items).where(self.items.c.State == state)
             .order_by(self.items.c.ItemId).limit(limit))
        with self._read() as conn:
            return [_item_row(r) for r in conn.execute(q)]

    def attempts_of(self, order_id: int) -> list[dict[str, Any]]:
        """Every attempt of one order."""
        q = (sa.select(self.attempts).where(self.attempts.c.OrderId == order_id)
             .order_by(self.attempts.c.AttemptId))
        with self._read() as conn:
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
