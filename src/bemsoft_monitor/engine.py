"""The loop: ingest → settle due requisitions → send with bounded concurrency → record outcomes.

The clock is injected so tests do not wait. The LIS is only read inside short ``with``
blocks that never contain an HTTP call (invariant 2).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import datetime as dt
import json
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .backoff import backoff_delay_s
from .bemsoft import DEFINITELY_NOT_SAVED, BemsoftClient, Kind, Outcome
from .catalog import CatalogCache, MapReloader, Resolver
from .config import Settings
from .deadletter import append_refused_report, write_failed
from .errors import MonitorError
from .metrics import Metrics
from .models import LisItem
from .oserrors import os_error_fix, os_error_text
from .procutil import hostname, pid_alive
from .scan import plan_scan
from .source import LisSource
from .store import (
    ITEM_CANCELLED,
    ITEM_PENDING,
    ITEM_REFUSED,
    ORDER_CONFERIR,
    ORDER_DEAD,
    ORDER_DELIVERED,
    ORDER_PENDING,
    Finish,
    OrderRow,
    SettlePlan,
    StateStore,
)
from .transform import build_orders

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FLAG_AUTH_PAUSED = "AuthPaused"
FLAG_LAST_POLL = "LastSuccessfulPoll"
BREAKER_THRESHOLD = 3
MAX_BATCHES_PER_CYCLE = 20
SETTLE_CHUNK = 50  # requisitions re-read and settled per transaction
MAX_SETTLE_PER_CYCLE = 10_000
RECORD_BATCH = 200  # answers recorded per transaction
RECONNECT_REPEATS = 3  # one per engine (LIS, state store) and one to spare
QUEUE_ROUNDS = 4  # claimed orders waiting for a sending thread, in rounds of concurrency
READY_ROUNDS = 8  # candidate orders fetched at once, in rounds of BEMSOFT_CONCURRENCY
WORK_RECHECK_S = 30.0  # idle: outbox re-read at least this often (other processes' changes)


class Clock(Protocol):
    """Wall clock (aware UTC) and an interruptible wait."""

    def now(self) -> dt.datetime: ...

    def wait(self, stop: threading.Event, seconds: float) -> bool: ...


class SystemClock:
    """The real clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(max(0.0, seconds))


@dataclass
class CycleStats:
    """Counts of one cycle, for logs, tests and the demo."""

    read: int = 0
    new: int = 0
    settled: int = 0
    orders_created: int = 0
    refused: int = 0
    cancelled: int = 0
    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    lease_held: bool = True
    # The cycle stopped at its per-cycle bound with more to read or settle: during a
    # backlog the next cycle starts at once instead of after POLL_SECONDS.
    more: bool = False


class QuietUntil:
    """"Nothing is due before T", valid while the state store's work version is unchanged.

    Every write of this process that can make work due bumps the version; another process
    (the ``retry`` command) is noticed at the next recheck, at most ``recheck_s`` later.
    """

    def __init__(self) -> None:
        self.version: int | None = None
        self.until: dt.datetime | None = None

    def quiet(self, version: int, now: dt.datetime) -> bool:
        return (self.version == version and self.until is not None
                and store_naive(now) < self.until)

    def remember(self, version: int, now: dt.datetime, next_at: dt.datetime | None,
                 recheck_s: float) -> None:
        limit = store_naive(now) + dt.timedelta(seconds=recheck_s)
        self.version = version
        self.until = limit if next_at is None else min(limit, next_at)


@dataclass
class _Decision:
    """An answer's meaning: the row to write, what to do once written, flags to set with it."""

    finish: Finish
    effects: list[Callable[[], None]]
    flags: dict[str, str | None] = field(default_factory=dict)


class Breaker:
    """Circuit breaker: after repeated transient failures, one probe per interval."""

    def __init__(self, *, interval_s: float, threshold: int = BREAKER_THRESHOLD) -> None:
        self.interval_s = interval_s
        self.threshold = threshold
        self.failures = 0
        self.open_until: dt.datetime | None = None
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def allowance(self, now: dt.datetime, wanted: int) -> int:
        """How many new sends may start now."""
        if self.open_until is None:
            return wanted
        if now >= self.open_until and not self.probing:
            return min(1, wanted)
        return 0

    def started(self, now: dt.datetime) -> None:
        if self.open_until is not None and now >= self.open_until:
            self.probing = True

    def success(self) -> bool:
        """Record a good answer; return True when the breaker was open (recovery)."""
        was_open = self.open_until is not None
        self.failures = 0
        self.open_until = None
        self.probing = False
        return was_open

    def failure(self, now: dt.datetime) -> bool:
        """Record a transient failure; return True when the breaker has just opened."""
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold:
            opened = self.open_until is None
            self.open_until = now + dt.timedelta(seconds=self.interval_s)
            return opened
        return False


class Monitor:
    """One monitor process's work on one LIS and one state store."""

    def __init__(
        self,
        *,
        settings: Settings,
        lis_engine: Engine,
        source: LisSource,
        store: StateStore,
        client: BemsoftClient | None,
        catalog: CatalogCache | None,
        test_map: dict[str, str],
        material_map: dict[str, str],
        maps: MapReloader | None = None,
        clock: Clock | None = None,
        show_payload: Callable[[OrderRow], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.s = settings
        self.metrics = metrics or Metrics()
        self.lis = lis_engine
        self.source = source
        self.store = store
        self.client = client
        self.catalog = catalog
        self.test_map = test_map
        self.material_map = material_map
        self.maps = maps
        self._refusals_checked_for: float | None = None
        self.clock: Clock = clock or SystemClock()
        self.show_payload = show_payload
        self.host = hostname()
        self.pid = os.getpid()
        self.holder = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.breaker = Breaker(interval_s=settings.bemsoft_breaker_seconds)
        self._pool: cf.ThreadPoolExecutor | None = None
        # Sending: each worker sends an order and, while all goes well, goes on with the
        # next claimed one without waiting for this loop (which records answers and claims
        # more in batches). ``_sending``: handed to a worker; ``_queued``: claimed, not yet
        # on the wire (at most QUEUE_ROUNDS rounds); answers come back through ``_answers``.
        self._workers: set[cf.Future[None]] = set()
        self._sending: dict[int, OrderRow] = {}
        self._queued: collections.deque[OrderRow] = collections.deque()
        self._queue_lock = threading.Lock()
        self._answers: queue.SimpleQueue[tuple[OrderRow, Outcome]] = queue.SimpleQueue()
        self._answered = threading.Event()
        self._chain_ok = False
        self._lease_held = False
        self._lease_wait_logged = False
        self._db_down_since: dt.datetime | None = None
        self._auth_paused: str | None = None
        self._next_probe: dt.datetime | None = None
        self.last_successful_poll: dt.datetime | None = None
        self.started = False
        self._checkpoint: int | None = None
        self._maybe_gaps = True
        self._lease_renewed_at: dt.datetime | None = None
        self._unrecorded: list[tuple[OrderRow, Outcome]] = []
        self._dead_files: dict[int, Path] = {}
        # Idle polls skip the outbox queries while nothing can be due (see QuietUntil).
        self._due_known = QuietUntil()
        self._claim_known = QuietUntil()
        self._ready: collections.deque[tuple[int, int]] = collections.deque()
        self._recheck_s = min(WORK_RECHECK_S, 6 * settings.poll_seconds)

    # --- start / stop ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the state tables and the checkpoint row; recover the paused flag."""
        self.store.create_tables()
        now = self.clock.now()
        if self.store.checkpoint_unset():
            initial = self._initial_checkpoint()
            value = self.store.init_checkpoint(initial, now)
            log.info("checkpoint inicial: LastItemId=%s (INITIAL_ITEM_ID=%s)", value,
                     self.s.initial_item_id)
        else:
            log.info("checkpoint existente: LastItemId=%s", self.store.checkpoint())
        paused, _ = self.store.get_flag(FLAG_AUTH_PAUSED)
        self._auth_paused = paused or None
        self.started = True

    def _initial_checkpoint(self) -> int:
        if self.s.initial_item_id == "max":
            with self.lis.connect() as conn:
                return self.source.max_item_id(conn)
        return int(self.s.initial_item_id)

    def close(self, *, grace_s: float | None = None) -> None:
        """Finish in-flight sends within the grace period, release the rest and the lease."""
        grace = self.s.shutdown_grace_seconds if grace_s is None else grace_s
        self._chain_ok = False
        try:
            self._release_queued()
            if self._live_workers():
                log.info("parando: aguardando %d envio(s) em andamento (até %.0f s)",
                         len(self._sending), grace)
                cf.wait(list(self._workers), timeout=grace)
            self._record_pending()
            if self._sending:
                # Still on the wire: release them with the same key; a 409 later means
                # delivered.
                released = self.store.recover_inflight(now=self.clock.now(),
                                                       holder=self.holder)
                log.warning("parando: %d envio(s) sem resposta liberado(s) para reenvio com a "
                            "mesma Idempotency-Key", released)
                self._sending.clear()
        except sa.exc.SQLAlchemyError as exc:
            # The orders stay 'sending' in the store; the next start resends them with the
            # same key, so nothing is lost or duplicated.
            log.error("parando sem gravar %d resultado(s) (banco de estado indisponível: %s); "
                      "serão conferidos na próxima partida", len(self._unrecorded)
                      + len(self._sending) + len(self._queued), _db_reason(exc))
            self._sending.clear()
            self._queued.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._lease_held:
            try:
                # The last poll outlives the lease row, for `status` after a stop.
                last = self.last_successful_poll
                self.store.release_lease(
                    holder=self.holder, now=self.clock.now(),
                    flags={FLAG_LAST_POLL: last.isoformat()} if last is not None else None)
            except sa.exc.SQLAlchemyError:
                log.warning("não foi possível liberar a trava (lease); ela expira sozinha")
            self._lease_held = False

    # --- lease ------------------------------------------------------------------------------------
    def hold_lease(self) -> bool:
        """Take or renew the lease; on taking it, recover orders a dead holder left in flight."""
        now = self.clock.now()
        if (self._lease_held and self._lease_renewed_at is not None
                and (now - self._lease_renewed_at).total_seconds() < self.s.lease_seconds / 3):
            return True
        alive: bool | None = None
        if not self._lease_held:  # a renewal is one UPDATE; only a taker looks first
            info = self.store.lease_info()
            if info and info["Holder"] != self.holder and info["Host"] == self.host:
                alive = pid_alive(int(info["Pid"])) and int(info["Pid"]) != self.pid
        # The last successful poll travels with the renewal (for `status` in another
        # process): no write of its own on idle polls.
        held, current = self.store.try_lease(holder=self.holder, host=self.host, pid=self.pid,
                                             now=now, ttl_s=self.s.lease_seconds,
                                             holder_alive=alive,
                                             last_poll=self.last_successful_poll)
        if held:
            self._lease_renewed_at = now
        if held and not self._lease_held:
            self._checkpoint = None  # another holder may have moved it
            self._maybe_gaps = True
            recovered = self.store.recover_inflight(now=now)
            if recovered:
                log.warning("%d pedido(s) interrompido(s) por uma parada anterior voltam para a "
                            "fila com a mesma Idempotency-Key", recovered)
            log.info("trava do monitor obtida (%s)", self.holder)
            self._lease_wait_logged = False
        if not held and self._lease_held:
            log.error("trava do monitor perdida para %s; envio suspenso", current)
            self._chain_ok = False
            self._ready.clear()
            self._release_queued()
        if not held and not self._lease_wait_logged:
            log.warning("outro monitor está ativo neste banco de estado (%s); aguardando", current)
            self._lease_wait_logged = True
        self._lease_held = held
        self.metrics.lease_held.set(1 if held else 0)
        return held

    # --- cycle ------------------------------------------------------------------------------------
    def cycle(self, *, drain: bool = True) -> CycleStats:
        """One full cycle: read, settle what is due, send what is due.

        ``drain=True`` waits for every send (``run --once``); otherwise sends keep going in
        the background and are recorded on later cycles.
        """
        if not self.started:
            self.start()
        stats = CycleStats()
        if not self._again_if_dropped(self.hold_lease):
            stats.lease_held = False
            return stats
        if not self._db_step(self._ingest, stats):
            return stats
        self._refresh_catalog()
        self._reload_maps()
        if not self._db_step(self._settle_due, stats):
            return stats
        self._send(stats, drain=drain)
        return stats

    def _db_step(self, step: Callable[[CycleStats], None], stats: CycleStats) -> bool:
        try:
            self._again_if_dropped(lambda: step(stats))
        except sa.exc.DBAPIError as exc:
            if not is_outage(exc):
                raise  # a bug or bad data, not an outage: the loop logs it with its cause
            if self._db_down_since is None:
                self._db_down_since = self.clock.now()
                log.error("banco de dados indisponível: %s; nova tentativa a cada %.0f s, nada "
                          "será perdido", _db_reason(exc), self.s.poll_seconds)
            return False
        if self._db_down_since is not None:
            down = (self.clock.now() - self._db_down_since).total_seconds()
            log.info("banco de dados disponível novamente (fora por %.0f s)", down)
            self._db_down_since = None
        return True

    @staticmethod
    def _again_if_dropped(step: Callable[[], _T]) -> _T:
        """Run ``step`` again while it meets pooled connections the server had closed.

        Connections are not pinged on checkout (an idle poll costs one round trip), so
        after a database restart the first statement finds a dead connection; SQLAlchemy
        then discards that engine's pool and the repeat runs on a fresh one (the LIS and
        the state store have one engine each). Every step is safe to repeat: what it wrote
        before the failure was committed or rolled back whole.
        """
        for _ in range(RECONNECT_REPEATS):
            try:
                return step()
            except sa.exc.DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                log.info("conexão com o banco fechada pelo servidor; reconectando")
        return step()

    # --- ingest -----------------------------------------------------------------------------------
    def _ingest(self, stats: CycleStats) -> None:
        """Read new items (and late commits inside open gaps) window by window.

        Per window: which ids are visible (one index-only query), then the items inside
        what that answer covered, then items + checkpoint + gaps in ONE state transaction
        (see :mod:`.scan` for why this order never skips a late commit).
        """
        window = self.s.batch_size
        for _ in range(MAX_BATCHES_PER_CYCLE):
            now = self.clock.now()
            if self._checkpoint is None:
                self._checkpoint = self.store.checkpoint() or 0
            checkpoint = self._checkpoint
            # Idle polls cost one LIS query: the gap table is read only while gaps exist.
            gaps = (self.store.open_gaps(now=now, grace_s=self.s.out_of_order_grace_seconds)
                    if self._maybe_gaps else [])
            with self.lis.connect() as conn:  # read-only, closed before any HTTP call
                ids = self.source.visible_ids(conn, after_id=checkpoint,
                                              gaps=[(g.lo, g.hi) for g in gaps], limit=window)
                plan = plan_scan(checkpoint=checkpoint, gaps=gaps, ids=ids, window=window,
                                 now=now, keep_holes=self.s.out_of_order_grace_seconds > 0)
                items = self.source.fetch_items(conn, plan.fetch)
                conn.rollback()
            self._maybe_gaps = bool(plan.gaps)
            if items or plan.checkpoint is not None or plan.gaps_changed:
                result = self.store.record_items(
                    items, checkpoint=plan.checkpoint,
                    gaps=plan.gaps if plan.gaps_changed else None,
                    now=now, debounce_s=self.s.debounce_seconds)
                if plan.checkpoint is not None:
                    self._checkpoint = max(checkpoint, plan.checkpoint)
                stats.read += len(items)
                stats.new += result.new_items
                self.metrics.items_read.inc(result.new_items)
                if result.new_items:
                    log.info("%d item(ns) novo(s) lido(s); checkpoint=%s", result.new_items,
                             self._checkpoint)
            if len(ids) < window:
                break
            # A backlog takes many windows: record answers and start sends meanwhile.
            self.pump()
        else:
            stats.more = True
        self.last_successful_poll = self.clock.now()
        self.metrics.last_successful_poll.set(self.last_successful_poll.timestamp())

    # --- catalogue --------------------------------------------------------------------------------
    def _refresh_catalog(self) -> None:
        if self.catalog is None or self.s.bemsoft_dry_run:
            return
        try:
            self.catalog.refresh_if_stale()
        except MonitorError as exc:  # pragma: no cover - refresh_if_stale keeps errors itself
            log.warning("catálogo não atualizado: %s", exc)
        # Compared with the copy the refusals were last checked against, so a refresh made
        # inside a settle (a code missing from the copy) also brings older refusals back.
        if self.catalog.loaded_at != self._refusals_checked_for:
            self._refusals_checked_for = self.catalog.loaded_at
            if self._refusals_checked_for is not None:
                self._requeue_resolvable_refusals("catálogo")

    def _reload_maps(self) -> None:
        """Re-read map files that changed; send what the new version resolves."""
        if self.maps is None or not self.maps.refresh():
            return
        self.test_map, self.material_map = self.maps.test_map, self.maps.material_map
        log.info("mapa de exames ou de materiais relido")
        self._requeue_resolvable_refusals("mapeamento")

    def _resolver(self) -> Resolver:
        return Resolver(
            catalog=self.catalog.catalog if self.catalog else None,
            test_map=self.test_map, material_map=self.material_map,
            code_source=self.s.test_code_source, variant_policy=self.s.bemsoft_variant_policy,
            dry_run=self.s.bemsoft_dry_run,
            material_map_path=self.s.bemsoft_material_map_path,
        )

    def _requeue_resolvable_refusals(self, cause: str) -> int:
        """Refused items that would now be built (catalogue or map fixed) go back to the queue.

        Each requisition's refused items are run through the transform again, so an item
        refused for patient data or an externalId length stays refused instead of coming
        back after every catalogue refresh.
        """
        resolver = self._resolver()
        by_req: dict[int, list[LisItem]] = {}
        for row in self.store.items_by_state(ITEM_REFUSED, limit=100000):
            if row.snapshot is not None:
                by_req.setdefault(row.requisition_id, []).append(row.snapshot)
        if not by_req:
            return 0
        seqs = self.store.order_seqs(list(by_req))
        now = self.clock.now()
        ids: list[int] = []
        for req_id, items in by_req.items():
            result = build_orders(items, settings=self.s, resolver=resolver,
                                  first_seq=seqs.get(req_id, 0) + 1, now=now)
            still = {r.item_id for r in result.refusals}
            ids.extend(i.item_id for i in items if i.item_id not in still)
        if not ids:
            return 0
        n = self.store.requeue_refused(now=now, item_ids=ids)
        log.info("%d item(ns) recusado(s) agora resolvido(s) pelo %s voltam para a fila", n, cause)
        return n

    def retry_refused(self) -> int:
        """Put every refused item back in the queue (``retry --refused``)."""
        return self.store.requeue_refused(now=self.clock.now())

    # --- settle -----------------------------------------------------------------------------------
    def _settle_due(self, stats: CycleStats) -> None:
        """Settle every due requisition, a chunk per transaction, sends running in between."""
        now = self.clock.now()
        if self._due_known.quiet(self.store.work_version, now):
            return
        version = self.store.work_version
        next_due = self.store.next_due_at()  # idle: this one query is the whole settle step
        if next_due is None or next_due > store_naive(now):
            self._due_known.remember(version, now, next_due, self._recheck_s)
            return
        resolver = self._resolver()
        catalog_retried = False
        settled = 0
        while settled < MAX_SETTLE_PER_CYCLE:
            now = self.clock.now()
            due = self.store.due_requisitions(now=now, limit=SETTLE_CHUNK)
            if not due:
                return
            resolver, catalog_retried = self._settle_chunk(due, stats, resolver,
                                                           catalog_retried)
            settled += len(due)
            if len(due) < SETTLE_CHUNK:
                return
            # A backlog takes many chunks: record answers and start sends meanwhile.
            self.pump()
        stats.more = True

    def _settle_chunk(self, due: list[tuple[int, int]], stats: CycleStats,
                      resolver: Resolver, catalog_retried: bool) -> tuple[Resolver, bool]:
        """Re-read a chunk of due requisitions from the LIS and settle them in one transaction."""
        req_ids = [rid for rid, _version in due]
        with self.lis.connect() as conn:  # read-only, closed before any HTTP call
            current_of = self.source.fetch_requisitions(conn, req_ids)
            conn.rollback()
        ledgers = self.store.ledger_states(req_ids)
        seqs = self.store.order_seqs(req_ids)
        plans: list[SettlePlan] = []
        by_req: dict[int, tuple[list[LisItem], list[int]]] = {}
        for req_id, version in due:
            current = current_of.get(req_id, [])
            ledger = ledgers.get(req_id, {})
            sendable = [i for i in current
                        if ledger.get(i.item_id) in (None, ITEM_PENDING, ITEM_CANCELLED)]
            result = build_orders(sendable, settings=self.s, resolver=resolver,
                                  first_seq=seqs.get(req_id, 0) + 1,
                                  now=self.clock.now()) if sendable else None
            if (result is not None and result.refusals and self.catalog is not None
                    and not self.s.bemsoft_dry_run and not catalog_retried
                    and self._refusals_need_catalog(result)):
                # A code missing from a cached catalogue may exist in a fresh one.
                catalog_retried = True
                if self.catalog.refresh_on_miss():
                    resolver = self._resolver()
                    result = build_orders(sendable, settings=self.s, resolver=resolver,
                                          first_seq=seqs.get(req_id, 0) + 1,
                                          now=self.clock.now())
            drafts = tuple(result.orders) if result else ()
            refusals = tuple(result.refusals) if result else ()
            current_ids = {i.item_id for i in current}
            gone = [iid for iid, st in ledger.items()
                    if st == ITEM_PENDING and iid not in current_ids]
            plans.append(SettlePlan(
                req_id=req_id, current=tuple(current),
                to_send_ids=tuple(i for d in drafts for i in d.item_ids),
                drafts=drafts, refusals=refusals, version=version))
            by_req[req_id] = (sendable, gone)
        new_orders = self.store.settle_many(plans, now=self.clock.now())
        for plan in plans:
            sendable, gone = by_req[plan.req_id]
            order_ids = new_orders.get(plan.req_id, [])
            stats.settled += 1
            stats.orders_created += len(order_ids)
            stats.refused += len(plan.refusals)
            stats.cancelled += len(gone)
            self.metrics.refused_items.inc(len(plan.refusals))
            if gone:
                log.info("solicitação %s: %d item(ns) removido(s) do LIS antes do envio "
                         "(cancelado(s))", plan.req_id, len(gone))
            if plan.refusals:
                for refusal in plan.refusals:
                    log.warning("solicitação %s, item %s recusado: %s", plan.req_id,
                                refusal.item_id, refusal.reason)
                self._report_refusals(plan.req_id, list(plan.refusals),
                                      {i.item_id: i for i in sendable})
            if self.s.bemsoft_dry_run and self.show_payload is not None:
                for order_id in order_ids:
                    order = self.store.get_order(order_id)
                    if order is not None:
                        self.show_payload(order)
        return resolver, catalog_retried

    @staticmethod
    def _refusals_need_catalog(result: Any) -> bool:
        return any(r.kind in ("not_in_catalog", "no_catalog") for r in result.refusals)

    def _report_refusals(self, req_id: int, refusals: list[Any],
                         items: dict[int, LisItem]) -> None:
        rows = []
        stamp = self.clock.now().astimezone(self.s.lab_tz).strftime("%Y-%m-%d %H:%M:%S")
        for r in refusals:
            item = items.get(r.item_id)
            rows.append({
                "data": stamp, "solicitacao": str(req_id), "item": str(r.item_id),
                "codigo": (item.conv_code or "").strip() if item else "",
                "codigo_exame": (item.exam_code or "").strip() if item else "",
                "descricao": (item.description or "").strip() if item else "",
                "motivo": r.reason,
            })
        try:
            append_refused_report(Path(self.s.refused_report), rows)
        except OSError as exc:
            log.error("não foi possível gravar o relatório de itens recusados %s: %s; %s",
                      self.s.refused_report, os_error_text(exc), os_error_fix(exc))

    # --- send -------------------------------------------------------------------------------------
    def _send(self, stats: CycleStats, *, drain: bool) -> None:
        if self.s.bemsoft_dry_run or self.client is None:
            return
        self._exchange(stats)
        if self._auth_paused is not None and not self._probe_token():
            return
        while True:
            self._fill(stats)
            if not self._live_workers():
                self._exchange(stats)  # answers that came in since the last look
                if not self._live_workers() and not self._queued:
                    return
                continue
            if not drain:
                return
            self._answered.wait(timeout=1.0)
            self._exchange(stats)
            if self._auth_paused is not None:
                # Paused: let what is on the wire finish, start nothing new.
                cf.wait(list(self._workers))
                self._exchange(stats, launch=False)
                return

    @property
    def sends_in_flight(self) -> int:
        """Orders handed to a sending thread and not yet answered."""
        return len(self._sending)

    def wait_for_sends(self, stop: threading.Event, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for an answer (or a stop); record what finished."""
        if not self._live_workers() and self._answers.empty():
            self.clock.wait(stop, timeout_s)
            return
        self._answered.wait(timeout=timeout_s)
        self._exchange(CycleStats())

    def _live_workers(self) -> int:
        self._workers = {w for w in self._workers if not w.done()}
        return len(self._workers)

    def _room(self, now: dt.datetime) -> int:
        """How many orders to claim now (idle workers, the next round, pause, breaker)."""
        if self._auth_paused is not None:
            return 0
        workers = self.s.bemsoft_concurrency - self._live_workers()
        # While all goes well, a few rounds of claimed orders wait for the workers, so they
        # keep sending while this loop reads the LIS or settles; after a failure only idle
        # workers get orders (the breaker decides).
        ahead = (self.s.bemsoft_concurrency * QUEUE_ROUNDS - len(self._queued)
                 if self._chain_ok else 0)
        return self.breaker.allowance(now, max(0, workers - len(self._queued)) + max(0, ahead))

    def _candidates(self, now: dt.datetime, room: int) -> list[int]:
        """Pending orders that may be claimed now (at most ``room``).

        During a backlog one query fetches the next few rounds of candidates
        (``READY_ROUNDS`` × concurrency); they are claimed from memory until used up. A
        stale one costs nothing: the claim only takes orders still pending.
        """
        if room <= 0:
            return []
        with self._queue_lock:  # workers move orders from the queue to _sending
            busy = {o.requisition_id for o in self._sending.values()}
            busy.update(o.requisition_id for o in self._queued)
        if not self._ready:
            if self._claim_known.quiet(self.store.work_version, now):
                return []
            version = self.store.work_version
            next_at = self.store.next_attempt_at()  # idle: one query, nothing more
            due = next_at is not None and next_at <= store_naive(now)
            fetched = self.store.claimable_orders(
                now=now, limit=max(room, self.s.bemsoft_concurrency) * READY_ROUNDS,
                exclude_requisitions=busy) if due else []
            if not fetched:
                # Due but blocked (a busy requisition): look again at the next recheck.
                self._claim_known.remember(version, now, None if due else next_at,
                                           self._recheck_s)
                return []
            self._ready.extend(fetched)
        out: list[int] = []
        while self._ready and len(out) < room:
            order_id, req_id = self._ready.popleft()
            if req_id in busy:
                continue  # still pending: a later query brings it back
            busy.add(req_id)
            out.append(order_id)
        return out

    def _launch(self, orders: list[OrderRow], now: dt.datetime, stats: CycleStats) -> None:
        """Queue claimed orders and start a worker for each idle slot."""
        assert self.client is not None
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.s.bemsoft_concurrency,
                                               thread_name_prefix="envio")
        with self._queue_lock:
            self._queued.extend(orders)
        stats.sent += len(orders)
        idle = self.s.bemsoft_concurrency - self._live_workers()
        while idle > 0:
            first = self._take_queued(force=True)
            if first is None:
                break
            self.breaker.started(now)
            self._workers.add(self._pool.submit(self._work, first))
            idle -= 1

    def _take_queued(self, *, force: bool = False) -> OrderRow | None:
        """The next claimed order for a worker (None: none, or chaining is stopped)."""
        if not force and not self._chain_ok:
            return None
        with self._queue_lock:
            if not self._queued:
                return None
            order = self._queued.popleft()
            self._sending[order.order_id] = order
        if log.isEnabledFor(logging.DEBUG):
            log.debug("enviando pedido %s (solicitação %s, chave %s): %s", order.order_id,
                      order.requisition_id, order.key,
                      json.dumps(order.payload, ensure_ascii=False))
        return order

    def _work(self, order: OrderRow | None) -> None:
        """A sending thread: this order, then the next claimed ones while answers are good."""
        assert self.client is not None
        while order is not None:
            try:
                outcome = self.client.post_order(order.payload, key=order.key)
            except Exception as exc:  # a send must never crash the loop
                outcome = Outcome(Kind.NO_ANSWER, None, f"erro inesperado no envio: {exc!r}")
            self._answers.put((order, outcome))
            self._answered.set()
            if outcome.kind not in (Kind.DELIVERED, Kind.ALREADY):
                return  # the loop decides what comes next (pause, breaker, backoff)
            order = self._take_queued()

    def _release_queued(self) -> None:
        """Give claimed orders that never went on the wire back to the queue, untouched."""
        with self._queue_lock:
            orders = list(self._queued)
            self._queued.clear()
        if orders:
            self.store.release_claims([o.order_id for o in orders], holder=self.holder)

    def _fill(self, stats: CycleStats) -> None:
        """Claim and start as many sends as there is room for."""
        now = self.clock.now()
        self._update_chain()
        ids = self._candidates(now, self._room(now))
        if ids:
            self._launch(self.store.claim_many(ids, holder=self.holder, now=now), now, stats)
        elif self._queued:
            self._launch([], now, stats)  # idle workers take what is already claimed

    def _update_chain(self) -> None:
        """Workers chain orders only while sending is healthy; otherwise claims go back."""
        ok = self._auth_paused is None and not self.breaker.is_open and self._lease_held
        self._chain_ok = ok
        if not ok and self._queued:
            self._release_queued()

    def _harvest(self, stats: CycleStats | None = None) -> None:
        """Move finished sends' answers to the queue of answers to record."""
        self._answered.clear()
        while True:
            try:
                order, outcome = self._answers.get_nowait()
            except queue.Empty:
                break
            with self._queue_lock:
                self._sending.pop(order.order_id, None)
            self._unrecorded.append((order, outcome))
            if stats is not None:
                stats.outcomes[outcome.kind.value] = stats.outcomes.get(outcome.kind.value, 0) + 1

    def _exchange(self, stats: CycleStats, *, launch: bool = True) -> None:
        """Record the answers received and, in the same transaction, claim the next orders.

        Answers stay queued in memory while the state store is unreachable. New orders are
        claimed with the answers only when every answer is a delivery (nothing that could
        pause sending or open the circuit breaker); otherwise they are claimed afterwards.
        """
        self._harvest(stats)
        while self._unrecorded:
            batch = self._unrecorded[:RECORD_BATCH]
            now = self.clock.now()
            ids: list[int] = []
            if launch and all(o.kind == Kind.DELIVERED for _, o in batch):
                ids = self._candidates(now, self._room(now))
            _states, claimed = self._commit_answers(batch, now, claim_ids=ids)
            del self._unrecorded[:len(batch)]
            self._update_chain()
            if claimed:
                self._launch(claimed, now, stats)

    def _record_pending(self) -> None:
        """Record every answer received (nothing new is claimed)."""
        self._exchange(CycleStats(), launch=False)

    def record_outcome(self, order: OrderRow, outcome: Outcome) -> str:
        """Apply the response table of bemsoft-api.md to one order; return its new state."""
        return self.record_outcomes([(order, outcome)])[0]

    def record_outcomes(self, answers: list[tuple[OrderRow, Outcome]]) -> list[str]:
        """Record many answers in one state-store transaction; return each order's new state."""
        return self._commit_answers(answers, self.clock.now(), claim_ids=[])[0]

    def _commit_answers(self, answers: list[tuple[OrderRow, Outcome]], now: dt.datetime, *,
                        claim_ids: list[int]) -> tuple[list[str], list[OrderRow]]:
        """Decide, write (fenced) and apply answers; claim ``claim_ids`` in the same transaction.

        An order taken over by another monitor meanwhile is left alone ("fenced"). The
        holder is read first only for answers that have side effects (a dead-letter file).
        """
        risky = [o for o, out in answers if out.kind not in (Kind.DELIVERED, Kind.ALREADY)]
        fenced: set[int] = set()
        for holder in {o.holder or "" for o in risky}:
            ids = [o.order_id for o in risky if (o.holder or "") == holder]
            fenced |= set(ids) - self.store.holding(ids, holder)
        decisions: list[_Decision | None] = [
            None if order.order_id in fenced else self._decide(order, outcome, now)
            for order, outcome in answers]
        flags: dict[str, str | None] = {}
        for d in decisions:
            if d is not None:
                flags.update(d.flags)
        result = self.store.exchange([d.finish for d in decisions if d is not None], now=now,
                                     flags=flags, claim_ids=claim_ids, holder=self.holder)
        written = iter(result.written)
        states: list[str] = []
        for (order, outcome), decision in zip(answers, decisions, strict=True):
            if decision is None or not next(written):
                log.warning("resposta do pedido %s ignorada: ele foi retomado por outro "
                            "monitor (%s)", order.order_id, outcome.message)
                states.append("fenced")
                continue
            self._dead_files.pop(order.order_id, None)
            for effect in decision.effects:
                try:
                    effect()
                except Exception:  # a log or metric must never undo a recorded answer
                    log.exception("erro ao registrar o efeito de uma resposta")
            states.append(decision.finish.state)
        return states, result.claimed

    def _decide(self, order: OrderRow, outcome: Outcome, now: dt.datetime) -> _Decision:
        """What an answer means for its order (the response table of bemsoft-api.md).

        Pure except for the dead-letter file, which is written before the outcome is
        recorded so that the row can point to it.
        """
        common: dict[str, Any] = {"status": outcome.status, "outcome": outcome.kind.value,
                                  "elapsed_ms": int(outcome.elapsed_s * 1000),
                                  "response": outcome.body_excerpt}
        kind = outcome.kind
        effects: list[Callable[[], None]] = [
            lambda: self.metrics.orders.labels(kind.value).inc()]
        # Every attempt, answered or not: a timeout is the slowest send of all.
        effects.append(lambda: self.metrics.send_latency.observe(outcome.elapsed_s))
        if kind in (Kind.DELIVERED, Kind.ALREADY, Kind.REJECTED, Kind.NOT_SAVED,
                    Kind.RATE_LIMITED):
            effects.append(self._breaker_success)
        if kind == Kind.DELIVERED:
            effects.append(lambda: log.info(
                "solicitação %s entregue (pedido %s, %d exame(s))", order.requisition_id,
                order.order_id, len(order.item_ids)))
            return _Decision(Finish(order=order, state=ORDER_DELIVERED, detail=outcome.message,
                                    **common), effects)
        if kind == Kind.ALREADY:
            if order.key_answered or not order.key_uncertain:
                why = ("409 depois de uma resposta de falha com a mesma chave"
                       if order.key_answered else
                       "409 sem nenhuma tentativa anterior sem resposta com esta chave")
                detail = (f"{outcome.message}. Conferir: {why}; não é possível saber se a "
                          "Bemsoft salvou o pedido. Verifique no portal e use Reenviar ou "
                          "Marcar como resolvido.")
                effects.append(lambda: log.error(
                    "solicitação %s em CONFERIR (pedido %s): %s", order.requisition_id,
                    order.order_id, why))
                return _Decision(Finish(order=order, state=ORDER_CONFERIR, detail=detail,
                                        **common), effects)
            effects.append(lambda: log.info(
                "solicitação %s já estava na Bemsoft (409 após tentativa sem resposta)",
                order.requisition_id))
            return _Decision(Finish(order=order, state=ORDER_DELIVERED,
                                    detail=outcome.message + " (entregue numa tentativa "
                                    "anterior sem resposta)", **common), effects)
        # A fresh key is safe only when no attempt with the current key may have been
        # saved; otherwise the key is kept so Bemsoft can still deduplicate by it.
        fresh_key = kind in DEFINITELY_NOT_SAVED and not order.key_uncertain
        # These answers come after Bemsoft processed the request: the key may be recorded.
        touched = True if kind in (Kind.SERVER_ERROR, Kind.NOT_SAVED, Kind.REJECTED) else None
        if kind == Kind.REJECTED:
            return self._dead_letter(order, outcome, common, effects, now=now,
                                     new_generation=fresh_key, key_answered=touched)
        if kind == Kind.AUTH:
            effects.append(lambda: self._pause_for_token(outcome, now))
            return _Decision(Finish(order=order, state=ORDER_PENDING, detail=outcome.message,
                                    next_attempt_at=now, new_generation=fresh_key, **common),
                             effects, flags={FLAG_AUTH_PAUSED: outcome.message})
        # Retryable: RATE_LIMITED, NOT_SAVED, UNREACHABLE, SERVER_ERROR, NO_ANSWER.
        uncertain = True if kind in (Kind.SERVER_ERROR, Kind.NO_ANSWER) else None
        if uncertain or kind == Kind.UNREACHABLE:
            effects.append(lambda: self._breaker_failure(outcome, now))
        first = order.first_attempt_at or store_naive(now)
        elapsed = (store_naive(now) - first).total_seconds()
        out_of_time = elapsed >= self.s.bemsoft_retry_horizon_seconds
        # BEMSOFT_RETRIES counts new attempts after the first, as urllib3's Retry(total=N)
        # of the original monitor did.
        out_of_tries = 0 < self.s.bemsoft_retries < order.attempts
        if out_of_time or out_of_tries:
            limit = ("horizonte de novas tentativas (BEMSOFT_RETRY_HORIZON_SECONDS)"
                     if out_of_time else "número máximo de tentativas (BEMSOFT_RETRIES)")
            return self._dead_letter(order, outcome, common, effects, now=now,
                                     new_generation=fresh_key, key_answered=touched,
                                     key_uncertain=uncertain,
                                     extra=f"; {limit} esgotado após {order.attempts} "
                                           "tentativa(s)")
        delay = backoff_delay_s(order.attempts, base_s=self.s.bemsoft_backoff,
                                cap_s=self.s.bemsoft_backoff_max,
                                retry_after_s=outcome.retry_after_s)
        effects.append(self.metrics.retries.inc)
        effects.append(lambda: log.warning(
            "solicitação %s: %s; nova tentativa em %.1f s (tentativa %d)",
            order.requisition_id, outcome.message, delay, order.attempts))
        return _Decision(Finish(order=order, state=ORDER_PENDING, detail=outcome.message,
                                next_attempt_at=now + dt.timedelta(seconds=delay),
                                new_generation=fresh_key, key_answered=touched,
                                key_uncertain=uncertain, **common), effects)

    def _breaker_success(self) -> None:
        if self.breaker.success():
            log.info("Bemsoft respondendo novamente; envios retomados")

    def _breaker_failure(self, outcome: Outcome, now: dt.datetime) -> None:
        if self.breaker.failure(now):
            log.error("Bemsoft fora do ar ou instável (%s); uma sondagem a cada %.0f s",
                      outcome.message, self.breaker.interval_s)

    def _dead_letter(self, order: OrderRow, outcome: Outcome, common: dict[str, Any],
                     effects: list[Callable[[], None]], *, now: dt.datetime,
                     new_generation: bool, extra: str = "", key_answered: bool | None = None,
                     key_uncertain: bool | None = None) -> _Decision:
        reason = outcome.message + extra
        # An answer recorded again after a state-store outage reuses its file.
        path: Path | None = self._dead_files.get(order.order_id)
        if path is None:
            try:
                path = write_failed(Path(self.s.failed_dir), reason=reason,
                                    event=self.failed_event(order, reason=reason),
                                    name_hint=str(order.requisition_id), now=now)
                self._dead_files[order.order_id] = path
            except OSError as exc:
                # The order stays dead in the outbox: nothing is lost even without the file.
                log.error("não foi possível gravar em FAILED_DIR (%s): %s; o pedido continua "
                          "registrado no banco de estado; %s", self.s.failed_dir,
                          os_error_text(exc), os_error_fix(exc))
        effects.append(self.metrics.dead_letters.inc)
        effects.append(lambda: log.error(
            "solicitação %s não enviada: %s (arquivo: %s)", order.requisition_id, reason,
            path or "não gravado"))
        return _Decision(Finish(order=order, state=ORDER_DEAD, detail=reason,
                                new_generation=new_generation, key_answered=key_answered,
                                key_uncertain=key_uncertain,
                                failed_file=str(path) if path else None, **common), effects)

    def failed_event(self, order: OrderRow, *, reason: str) -> dict[str, Any]:
        """The ``event`` of a FAILED_DIR file: the order, its items and what was sent."""
        rows = self.store.requisition_items(order.requisition_id)
        items = [row.snapshot.to_json() for row in rows
                 if row.item_id in order.item_ids and row.snapshot is not None]
        return {
            "CodSolicitacao": order.requisition_id,
            "orderId": order.order_id,
            "seq": order.seq,
            "idempotencyKey": order.key,
            "generation": order.generation,
            "itemIds": list(order.item_ids),
            "attempts": order.attempts,
            "items": items,
            "payload": order.payload,
        }

    # --- token pause ------------------------------------------------------------------------------
    def _pause_for_token(self, outcome: Outcome, now: dt.datetime) -> None:
        """Pause all sending (the flag itself is written with the outcome)."""
        if self._auth_paused is None:
            log.error("envio PAUSADO: %s. Os pedidos ficam guardados e o envio volta sozinho "
                      "quando o token for aceito", outcome.message)
        self._auth_paused = outcome.message
        self.metrics.auth_paused.set(1)
        self._next_probe = now + dt.timedelta(seconds=self.s.bemsoft_breaker_seconds)

    def _probe_token(self) -> bool:
        """While paused, ask GET /tests once per interval whether the token works again."""
        assert self.client is not None
        now = self.clock.now()
        if self._next_probe is not None and now < self._next_probe:
            return False
        result = self.client.check_token()
        if result.kind == Kind.DELIVERED:
            log.info("token aceito novamente pela Bemsoft; envios retomados")
            self._auth_paused = None
            self.metrics.auth_paused.set(0)
            self._next_probe = None
            self.store.set_flag(FLAG_AUTH_PAUSED, None, now=now)
            return True
        self._next_probe = now + dt.timedelta(seconds=self.s.bemsoft_breaker_seconds)
        return False

    def refresh_gauges(self) -> None:
        """Queue gauges from the state store (called when /metrics is scraped)."""
        counts = self.store.counts()["orders"]
        for state in ("pending", "sending", "delivered", "dead", "conferir", "resolved"):
            self.metrics.queue_depth.labels(state).set(counts.get(state, 0))
        oldest = self.store.oldest_waiting()
        now = store_naive(self.clock.now())
        self.metrics.oldest_waiting_age.set((now - oldest).total_seconds() if oldest else 0)
        age = self.catalog.age_s() if self.catalog is not None else None
        self.metrics.catalog_age.set(age if age is not None else -1)

    @property
    def lease_held(self) -> bool:
        """Whether this process holds the state-store lease."""
        return self._lease_held

    @property
    def auth_paused(self) -> str | None:
        """The token problem while sending is paused, else None."""
        return self._auth_paused

    # --- loop -------------------------------------------------------------------------------------
    def pump(self) -> None:
        """Between polls: renew the lease when due, record finished sends, start new ones."""
        if not self._lease_held or self.s.bemsoft_dry_run or self.client is None:
            return
        if not self._again_if_dropped(self.hold_lease):
            self._record_pending()  # answers still count; nothing new is claimed
            return
        self._send(CycleStats(), drain=False)

    def run(self, stop: threading.Event) -> None:
        """Cycle until ``stop`` is set; never lets one failure end the loop."""
        errors_in_row = 0
        next_poll = self.clock.now()
        while not stop.is_set():
            try:
                if not self.started:
                    self.start()
                if self.clock.now() >= next_poll:
                    stats = self.cycle(drain=False)
                    next_poll = self.clock.now() + dt.timedelta(
                        seconds=0 if stats.more else self.s.poll_seconds)
                    if not stats.lease_held:
                        self.clock.wait(stop, min(self.s.poll_seconds, self.s.lease_seconds / 3))
                        continue
                else:
                    self.pump()
                errors_in_row = 0
                # Answers are recorded here too: a state-store outage must not end the loop.
                # Woken at least every third of the lease, so it is renewed between polls
                # however long POLL_SECONDS is.
                remaining = (next_poll - self.clock.now()).total_seconds()
                self.wait_for_sends(stop, max(0.01, min(remaining, self.s.lease_seconds / 3)))
            except sa.exc.DBAPIError as exc:
                errors_in_row += 1
                if not is_outage(exc):
                    log.exception("erro do banco de dados que não é uma queda de conexão (%s); "
                                  "o monitor continua e tenta de novo", _db_reason(exc))
                    self.clock.wait(stop, _pause_s(self.s.poll_seconds, errors_in_row))
                    next_poll = self.clock.now()
                    continue
                if self._db_down_since is None:
                    self._db_down_since = self.clock.now()
                    log.error("banco de dados indisponível: %s; nova tentativa com espera "
                              "crescente, nada será perdido", _db_reason(exc))
                self.clock.wait(stop, _pause_s(self.s.poll_seconds, errors_in_row))
                next_poll = self.clock.now()
                continue
            except Exception:
                errors_in_row += 1
                log.exception("erro inesperado no ciclo; o monitor continua")
                self.clock.wait(stop, _pause_s(self.s.poll_seconds, errors_in_row))
                next_poll = self.clock.now()
                continue
        self.close()


def is_outage(exc: sa.exc.DBAPIError) -> bool:
    """A lost or refused connection (retry later), not a constraint or a bad statement."""
    return bool(exc.connection_invalidated) or isinstance(
        exc, (sa.exc.OperationalError, sa.exc.InterfaceError))


def _pause_s(poll_s: float, errors_in_row: int) -> float:
    return float(min(60.0, poll_s * (2 ** min(errors_in_row, 5))))


def store_naive(value: dt.datetime) -> dt.datetime:
    """Aware → naive UTC, as the store keeps times."""
    if value.tzinfo is not None:
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _db_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).splitlines()[0] if str(exc) else repr(exc)
    from .redact import redact_secrets

    return redact_secrets(text)[:300]
