"""Operator commands' logic: re-send FAILED_DIR files and refused items, status, check.

No Typer here (``cli_ops`` prints and maps to exit codes); everything is callable from
tests with real components. Sending reuses the engine: an order known to the state store
is re-queued, claimed and its answer recorded with ``Monitor.record_outcome``, under the
monitor's lease, so the outbox stays the one record of what reached Bemsoft.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.sql import visitors
from urllib3.exceptions import InsecureRequestWarning

from . import __version__
from .bemsoft import DEFINITELY_NOT_SAVED, Kind, Outcome, describe_request_error
from .config import ENV_FILE_VAR, Settings, config_warnings, env_files, redact_db_url
from .dbconn import lis_schema, lis_url, make_engine, state_url
from .deadletter import ensure_private_dir, list_failed, read_failed
from .engine import FLAG_AUTH_PAUSED, FLAG_LAST_POLL, Monitor
from .errors import ConfigError, MonitorError
from .logsetup import mask_payload, mask_text, pii_shown, prepare_log_file
from .oserrors import json_error_text, os_error_fix, os_error_text
from .redact import redact_secrets
from .source import LisSource, lis_tables
from .store import (
    ITEM_CONFERIR,
    ITEM_DEAD,
    ITEM_DELIVERED,
    ITEM_REFUSED,
    ORDER_CONFERIR,
    ORDER_DEAD,
    ORDER_DELIVERED,
    ORDER_PENDING,
    ORDER_RESOLVED,
    ORDER_SENDING,
    ItemRow,
    OrderRow,
    StateStore,
)

log = logging.getLogger(__name__)

ORDER_STATES = (ORDER_PENDING, ORDER_SENDING, ORDER_DELIVERED, ORDER_DEAD, ORDER_CONFERIR,
                ORDER_RESOLVED)
ITEM_STATES = ("pending", "ordered", ITEM_DELIVERED, ITEM_REFUSED, "cancelled", ITEM_DEAD,
               ITEM_CONFERIR)

# --- shared -------------------------------------------------------------------------------


def open_state_store(settings: Settings) -> StateStore:
    """The real state store (never the in-memory one of DRY_RUN); creates nothing."""
    if settings.state_db_url:
        engine = make_engine(state_url(settings), settings=settings, for_state=True)
        schema = lis_schema(settings, engine.dialect.name) if engine.dialect.name == "mssql" \
            else None
        return StateStore(engine, schema=schema)
    engine = make_engine(lis_url(settings), settings=settings, for_state=True)
    return StateStore(engine, schema=lis_schema(settings, engine.dialect.name))


def state_initialized(store: StateStore) -> bool:
    """True when the monitor's outbox exists in the state database (it has run there)."""
    with store.engine.connect() as conn:
        return sa.inspect(conn).has_table(store.orders.name, schema=store.orders.schema)


def _has_table(store: StateStore, table: sa.Table) -> bool:
    with store.engine.connect() as conn:
        return sa.inspect(conn).has_table(table.name, schema=table.schema)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """Naive UTC from the store → aware UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


#: Common driver messages (psycopg, pyodbc/SQL Server, SQLite), their gist in Portuguese.
_DB_REASONS = (
    (("connection refused", "actively refused"), "conexão recusada"),
    (("login failed", "password authentication failed", "authentication failed"),
     "usuário ou senha recusados"),
    (("could not translate host name", "name or service not known", "server not found",
      "getaddrinfo failed", "no such host"), "nome do servidor não encontrado (DNS)"),
    (("timeout expired", "timed out", "login timeout"), "tempo de conexão esgotado"),
    (("does not exist", "cannot open database", "unable to open database"),
     "banco inexistente ou inacessível"),
    (("permission denied",), "sem permissão"),
)


def db_error_text(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """First line of a database error, passwords removed; led by its gist in Portuguese."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc) or type(exc).__name__
    first = text.strip().splitlines()[0] if text.strip() else text
    lowered = first.lower()
    gist = next((pt for needles, pt in _DB_REASONS if any(n in lowered for n in needles)), None)
    shown = f"{gist} (driver: {first})" if gist else first
    return redact_secrets(shown, secrets)[:300]


def missing_env_file_line() -> str | None:
    """'nenhum arquivo .env encontrado (procurado em: …)' when no .env exists, else None.

    An explicit BEMSOFT_ENV_FILE that does not exist is reported by the settings themselves.
    """
    if os.environ.get(ENV_FILE_VAR, "").strip():
        return None
    files = env_files()
    if any(path.is_file() for path in files):
        return None
    folders = ", ".join(dict.fromkeys(str(path.parent) for path in files))
    return f"nenhum arquivo .env encontrado (procurado em: {folders})"


# --- retry of FAILED_DIR files ------------------------------------------------------------

R_WOULD_SEND = "enviaria"
R_DELIVERED = "entregue"
R_ALREADY = "já entregue"
R_QUEUED = "na fila"
R_RETRY_LATER = "nova tentativa"
R_FAILED = "falhou"
R_CONFERIR = "conferir"
R_INVALID = "ignorado"
R_NOT_SENT = "não enviado"

CONFERIR_HINT = ("Confira no portal da Bemsoft: se o pedido estiver lá, marque-o como resolvido "
                 "no painel (ou guarde o arquivo em outra pasta); se não estiver, rode de novo "
                 "com --conferir para reenviá-lo com uma nova Idempotency-Key.")

#: What each answer came to, as ``retry --verbose`` shows it.
OUTCOME_LABELS: dict[Kind, str] = {
    Kind.DELIVERED: "entregue",
    Kind.ALREADY: "já recebido antes",
    Kind.REJECTED: "recusado pela Bemsoft",
    Kind.AUTH: "token recusado",
    Kind.RATE_LIMITED: "limite de requisições",
    Kind.NOT_SAVED: "não salvo",
    Kind.UNREACHABLE: "não chegou ao serviço de pedidos",
    Kind.SERVER_ERROR: "erro no servidor",
    Kind.NO_ANSWER: "sem resposta",
}

#: Results after which the file may go to --move-ok.
MOVABLE = frozenset({R_DELIVERED, R_ALREADY})
#: Results that make ``retry`` exit 1.
FAILED_RESULTS = frozenset({R_RETRY_LATER, R_FAILED, R_CONFERIR, R_NOT_SENT})


@dataclass
class RetryRow:
    """What happened to one file."""

    file: Path
    requisition: str
    result: str
    detail: str
    external: bool = False
    moved_to: Path | None = None
    verbose: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.result in FAILED_RESULTS


def external_payload(event: dict[str, Any]) -> dict[str, Any] | None:
    """The POST body inside an event of unknown origin: ``event.payload`` or the event itself."""
    payload = event.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("batch"), dict):
        return payload
    if isinstance(event.get("batch"), dict):
        return event
    return None


def external_key(payload: dict[str, Any], generation: int = 1) -> str:
    """Idempotency-Key of an external file: stable for the same payload, so a re-run gets 409."""
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    return f"retry-{digest}" if generation <= 1 else f"retry-{digest}-g{generation}"


def _batch_id(payload: dict[str, Any] | None) -> str | None:
    if not payload:
        return None
    batch = payload.get("batch")
    value = batch.get("externalId") if isinstance(batch, dict) else None
    return str(value) if value else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def move_file(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` without overwriting a file of the same name."""
    target = folder / path.name
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{path.stem}_{n}{path.suffix}"
    shutil.move(str(path), str(target))
    return target


class FileRetrier:
    """Re-sends FAILED_DIR files one by one (dry run unless ``send``)."""

    def __init__(
        self,
        *,
        monitor: Monitor,
        send: bool,
        move_ok: Path | None = None,
        verbose: bool = False,
        state_ready: bool = True,
        conferir: bool = False,
    ) -> None:
        self.monitor = monitor
        self.store = monitor.store
        self.client = monitor.client
        self.send = send
        self.move_ok = move_ok
        self.verbose = verbose
        self.state_ready = state_ready
        # Orders in CONFERIR may already be at Bemsoft: re-sent (with a new key) only when
        # a person checked the portal and asked for it (--conferir).
        self.conferir = conferir
        self.token_problem: str | None = None
        self._lease_checked = False
        self._lease_holder: str | None = None

    # --- lease ---------------------------------------------------------------------------
    def _lease(self) -> bool:
        """Take (or renew) the monitor's lease; remember who holds it when we cannot."""
        held = self.monitor.hold_lease()
        if not held:
            info = self.store.lease_info()
            self._lease_holder = str(info["Holder"]) if info else "?"
        return held

    def close(self) -> None:
        """Release the lease (if taken)."""
        self.monitor.close(grace_s=0)

    # --- one file ----------------------------------------------------------------------
    def process(self, path: Path) -> RetryRow:
        """Handle one file; never raises for a bad file."""
        ff = read_failed(path)
        if ff.problem is not None or ff.event is None:
            return RetryRow(path, "?", R_INVALID, f"{ff.problem}; arquivo ignorado")
        event = ff.event
        order = self._known_order(event)
        if order is not None:
            row = self._retry_order(path, order, event)
        else:
            row = self._retry_external(path, event)
        if self.send and self.move_ok is not None and row.result in MOVABLE and path.exists():
            try:
                row.moved_to = move_file(path, self.move_ok)
            except OSError as exc:
                row.detail += (f"; não foi possível mover para {self.move_ok} "
                               f"({os_error_text(exc)}; {os_error_fix(exc)})")
        return row

    def _known_order(self, event: dict[str, Any]) -> OrderRow | None:
        if not self.state_ready:
            return None
        raw_id = event.get("orderId")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)):
            return None
        try:
            order = self.store.get_order(int(raw_id))
        except ValueError:
            return None
        if order is None:
            return None
        # A file copied from another site's state store may carry an orderId that exists
        # here for another requisition: only the same requisition and items count.
        req = event.get("CodSolicitacao")
        if req is not None and str(req) != str(order.requisition_id):
            return None
        items = event.get("itemIds")
        if isinstance(items, list) and {str(i) for i in items} != {str(i) for i in order.item_ids}:
            return None
        return order

    def _show_payload(self, row: RetryRow, payload: dict[str, Any], key: str) -> None:
        if self.verbose:
            text = json.dumps(mask_payload(payload), ensure_ascii=False, indent=2)
            row.verbose.append(f"Idempotency-Key: {key}\npayload:\n{text}")

    def _show_outcome(self, row: RetryRow, outcome: Outcome) -> None:
        if self.verbose:
            body = outcome.body_excerpt if pii_shown() else mask_text(outcome.body_excerpt)
            row.verbose.append(f"resposta: HTTP {outcome.status or '-'} "
                               f"({OUTCOME_LABELS.get(outcome.kind, outcome.kind.value)}) "
                               f"em {outcome.elapsed_s * 1000:.0f} ms: {body or outcome.message}")

    # --- orders of the outbox ------------------------------------------------------------
    @staticmethod
    def _key_note(order: OrderRow, event: dict[str, Any], *, conferir: bool) -> str:
        """Which Idempotency-Key a re-send uses, and why when it is not the file's."""
        if conferir:
            return "com uma nova Idempotency-Key, gerada no envio (estava em CONFERIR)"
        file_key = event.get("idempotencyKey")
        if isinstance(file_key, str) and file_key and file_key != order.key:
            return (f"com a Idempotency-Key {order.key}, não a {file_key} do arquivo: a "
                    "Bemsoft respondeu que nada foi salvo com a chave do arquivo, e o monitor "
                    "passou a uma nova geração (com a chave antiga, a Bemsoft poderia responder "
                    "409 a um pedido que ela não salvou)")
        return f"com a mesma Idempotency-Key ({order.key})"

    def _retry_order(self, path: Path, order: OrderRow, event: dict[str, Any]) -> RetryRow:
        req = str(order.requisition_id)
        ident = f"pedido {order.order_id}"
        if order.state in (ORDER_DELIVERED, ORDER_RESOLVED):
            what = "entregue" if order.state == ORDER_DELIVERED else "marcado como resolvido"
            return RetryRow(path, req, R_ALREADY, f"{ident} já {what}; ignorado (não será "
                                                  "reenviado)")
        if order.state in (ORDER_PENDING, ORDER_SENDING):
            return RetryRow(path, req, R_QUEUED, f"{ident} já está na fila do monitor; ele fará "
                                                 "o envio")
        conferir = order.state == ORDER_CONFERIR
        if conferir and not self.conferir:
            return RetryRow(path, req, R_CONFERIR, f"{ident} em CONFERIR, não reenviado: "
                            f"{(order.last_error or '').strip()[:160]} {CONFERIR_HINT}")
        key_note = self._key_note(order, event, conferir=conferir)
        if not self.send:
            row = RetryRow(path, req, R_WOULD_SEND,
                           f"{ident} ({'conferir' if conferir else 'falhou'}: "
                           f"{(order.last_error or '').strip()[:160]}); seria reenviado {key_note}")
            self._show_payload(row, order.payload,
                               "(nova, gerada no envio)" if conferir else order.key)
            return row
        if self.token_problem is not None:
            return RetryRow(path, req, R_NOT_SENT, f"não enviado: {self.token_problem}")
        now = self.monitor.clock.now()
        if not self._lease():
            self.store.requeue_order(order.order_id, now=now, new_generation=conferir)
            return RetryRow(path, req, R_QUEUED,
                            f"{ident} devolvido à fila: outro monitor está ativo "
                            f"({self._lease_holder}) e fará o envio")
        if not self.store.requeue_order(order.order_id, now=now, new_generation=conferir):
            return RetryRow(path, req, R_QUEUED, f"{ident} mudou de estado; ficou com o monitor")
        claimed = self.store.claim(order.order_id, holder=self.monitor.holder,
                                   now=self.monitor.clock.now())
        if claimed is None:
            return RetryRow(path, req, R_QUEUED, f"{ident} já foi pego por outro envio")
        row = RetryRow(path, req, R_FAILED, "")
        self._show_payload(row, claimed.payload, claimed.key)
        assert self.client is not None
        outcome = self.client.post_order(claimed.payload, key=claimed.key)
        self._show_outcome(row, outcome)
        state = self.monitor.record_outcome(claimed, outcome)
        if outcome.kind == Kind.AUTH:
            self.token_problem = outcome.message
        if state == ORDER_DELIVERED:
            row.result = R_DELIVERED
            row.detail = f"{ident} entregue ({outcome.message})"
        elif state == ORDER_CONFERIR:
            row.result = R_CONFERIR
            row.detail = f"{ident}: {outcome.message}. {CONFERIR_HINT}"
        elif state == ORDER_PENDING:
            row.result = R_RETRY_LATER
            row.detail = (f"{ident} não entregue agora ({outcome.message}); ficou na fila e o "
                          "monitor tentará de novo")
        else:
            row.result = R_FAILED
            row.detail = f"{ident} recusado de novo: {outcome.message}"
            self._replace_superseded(path, order.order_id, row)
        return row

    def _replace_superseded(self, path: Path, order_id: int, row: RetryRow) -> None:
        """A new dead letter was written for the same order: the old file is redundant."""
        current = self.store.get_order(order_id)
        new_file = Path(current.failed_file) if current and current.failed_file else None
        if new_file is None or not new_file.exists():
            return
        try:
            if new_file.resolve() == path.resolve():
                return
            path.unlink()
        except OSError:
            return
        row.detail += f"; arquivo substituído por {new_file.name}"

    # --- files the outbox does not know -------------------------------------------------
    def _retry_external(self, path: Path, event: dict[str, Any]) -> RetryRow:
        payload = external_payload(event)
        req = str(event.get("CodSolicitacao") or _batch_id(payload) or "?")
        if payload is None:
            return RetryRow(path, req, R_INVALID,
                            "evento de formato desconhecido: não é um pedido do banco de estado "
                            "e não traz o corpo do pedido (chave \"payload\" ou \"batch\"); "
                            "arquivo ignorado")
        meta = self._retry_meta(path)
        generation = int(meta.get("generation") or 1)
        key = external_key(payload, generation)
        origin = "arquivo externo (fora do banco de estado)"
        if meta.get("conferir"):
            if not self.conferir:
                return RetryRow(path, req, R_CONFERIR,
                                f"{origin} em CONFERIR, não reenviado: 409 depois de um erro do "
                                f"servidor na tentativa anterior. {CONFERIR_HINT}",
                                external=True)
            # The person checked: the order is not at Bemsoft, a new key lets it through.
            generation += 1
            key = external_key(payload, generation)
        if meta.get("lastOutcome") == Kind.DELIVERED.value:
            return RetryRow(path, req, R_ALREADY,
                            f"{origin} já entregue em {meta.get('deliveredAt', '?')}; ignorado",
                            external=True)
        if not self.send:
            row = RetryRow(path, req, R_WOULD_SEND, f"{origin}; seria enviado com a chave {key}",
                           external=True)
            self._show_payload(row, payload, key)
            return row
        if self.token_problem is not None:
            return RetryRow(path, req, R_NOT_SENT, f"não enviado: {self.token_problem}",
                            external=True)
        assert self.client is not None
        row = RetryRow(path, req, R_FAILED, "", external=True)
        self._show_payload(row, payload, key)
        outcome = self.client.post_order(payload, key=key)
        self._show_outcome(row, outcome)
        previous = meta.get("lastOutcome")
        meta.pop("conferir", None)
        meta.update(attempts=int(meta.get("attempts") or 0) + 1, lastOutcome=outcome.kind.value,
                    lastStatus=outcome.status, lastKey=key, generation=generation,
                    lastAttemptAt=_utcnow().isoformat(timespec="seconds"))
        if outcome.kind == Kind.DELIVERED:
            row.result, row.detail = R_DELIVERED, f"{origin} entregue ({outcome.message})"
            meta["deliveredAt"] = meta["lastAttemptAt"]
        elif outcome.kind == Kind.ALREADY and previous == Kind.SERVER_ERROR.value:
            row.result = R_CONFERIR
            row.detail = (f"{origin}: 409 após um erro do servidor na tentativa anterior; não é "
                          f"possível saber se a Bemsoft salvou o pedido. {CONFERIR_HINT}")
            meta["conferir"] = True
        elif outcome.kind == Kind.ALREADY:
            row.result = R_ALREADY
            row.detail = (f"{origin}: a Bemsoft já recebeu este pedido (HTTP 409, chave {key}); "
                          "não duplicado")
            meta["lastOutcome"] = Kind.DELIVERED.value
            meta["deliveredAt"] = meta["lastAttemptAt"]
        else:
            if outcome.kind == Kind.AUTH:
                self.token_problem = outcome.message
            if outcome.kind in DEFINITELY_NOT_SAVED:
                # Nothing was saved: the next attempt may (and after a 201-with-error must)
                # use a new key, or it would get a 409 for an order that does not exist.
                meta["generation"] = generation + 1
            row.result = R_FAILED
            row.detail = f"{origin}: {outcome.message}"
        self._save_meta(path, meta, row)
        return row

    @staticmethod
    def _retry_meta(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (OSError, ValueError):
            return {}
        meta = data.get("retry") if isinstance(data, dict) else None
        return dict(meta) if isinstance(meta, dict) else {}

    @staticmethod
    def _save_meta(path: Path, meta: dict[str, Any], row: RetryRow) -> None:
        """Keep the retry state on the file itself (``"retry"`` beside reason/event)."""
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
            data["retry"] = meta
            _write_json_atomic(path, data)
        except OSError as exc:
            row.detail += (f"; não foi possível anotar o resultado no arquivo "
                           f"({os_error_text(exc)}; {os_error_fix(exc)})")
        except ValueError as exc:  # the file was changed meanwhile into something unreadable
            why = json_error_text(exc) if isinstance(exc, json.JSONDecodeError) else \
                "o arquivo não está mais em UTF-8"
            row.detail += f"; não foi possível anotar o resultado no arquivo ({why})"


@dataclass
class RetrySummary:
    """Counts of one retry run."""

    rows: list[RetryRow]

    def count(self, result: str) -> int:
        return sum(1 for r in self.rows if r.result == result)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r.failed)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.result] = out.get(r.result, 0) + 1
        return out


def retry_files(
    paths: Sequence[Path],
    retrier: FileRetrier,
    *,
    on_row: Callable[[RetryRow], None] | None = None,
    stop: threading.Event | None = None,
) -> RetrySummary:
    """Process the files in order; ``on_row`` sees each result; ``stop`` ends between files."""
    rows: list[RetryRow] = []
    for path in paths:
        if stop is not None and stop.is_set():
            break
        row = retrier.process(path)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return RetrySummary(rows)


def select_files(folder: Path, limit: int | None) -> list[Path]:
    """FAILED_DIR files, oldest first (see :func:`list_failed`), at most ``limit``."""
    files = list_failed(folder)
    return files[:limit] if limit else files


# --- retry of refused items ---------------------------------------------------------------


@dataclass
class RefusedResult:
    """What ``retry --refused`` did."""

    refused: list[ItemRow]
    requeued: int = 0
    delivered: int = 0
    still_refused: int = 0
    waiting: int = 0
    failed: int = 0
    lease_held: bool = True
    sent: bool = False
    still: list[ItemRow] = field(default_factory=list)  # refused again, with the new reason


def item_states(store: StateStore, item_ids: Sequence[int]) -> dict[int, str]:
    """Current ledger state of the given items."""
    out: dict[int, str] = {}
    with store.engine.connect() as conn:
        for start in range(0, len(item_ids), 500):
            chunk = list(item_ids[start:start + 500])
            q = sa.select(store.items.c.ItemId, store.items.c.State).where(
                store.items.c.ItemId.in_(chunk))
            out.update({int(r.ItemId): str(r.State) for r in conn.execute(q)})
    return out


def retry_refused(monitor: Monitor, *, send: bool) -> RefusedResult:
    """Requeue every refused item and, with ``send``, run one full cycle to deliver them now."""
    refused = monitor.store.items_by_state(ITEM_REFUSED, limit=1_000_000)
    result = RefusedResult(refused=refused)
    if not send or not refused:
        return result
    result.sent = True
    result.requeued = monitor.retry_refused()
    stats = monitor.cycle(drain=True)
    result.lease_held = stats.lease_held
    ids = {r.item_id for r in refused}
    result.still = [r for r in monitor.store.items_by_state(ITEM_REFUSED, limit=1_000_000)
                    if r.item_id in ids]
    states = item_states(monitor.store, sorted(ids))
    for state in states.values():
        if state == ITEM_DELIVERED:
            result.delivered += 1
        elif state == ITEM_REFUSED:
            result.still_refused += 1
        elif state in (ITEM_DEAD, ITEM_CONFERIR):
            result.failed += 1
        else:
            result.waiting += 1
    return result


# --- status -------------------------------------------------------------------------------


def collect_status(settings: Settings, *, store: StateStore | None = None,
                   now: dt.datetime | None = None) -> dict[str, Any]:
    """The monitor's state as one JSON-ready dict with stable keys.

    Keys (all always present):

    - ``version`` (str), ``initialized`` (bool: the outbox tables exist),
      ``state_db`` (str, password hidden), ``dry_run`` (bool)
    - ``checkpoint`` (int|null: ``_MonitorState.LastItemId``)
    - ``last_successful_poll`` (ISO-8601 UTC str|null), ``last_poll_age_s`` (float|null)
    - ``orders`` ({state: n} for pending, sending, delivered, dead, conferir, resolved)
    - ``items`` ({state: n} for pending, ordered, delivered, refused, cancelled, dead, conferir)
    - ``oldest_waiting_age_s`` (float|null: oldest order not yet final)
    - ``dead_letters`` (int: orders in ``dead``), ``conferir`` (int: orders to confirm),
      ``refused_items`` (int)
    - ``failed_dir`` (str), ``failed_files`` (int: ``*.json`` files in FAILED_DIR)
    - ``catalog_entries`` (int|null), ``catalog_age_s`` (float|null): the saved catalogue
    - ``lease`` ({holder, host, pid, acquired_at, expires_at, expired}|null)
    - ``auth_paused`` (str|null: why sending is paused for the token)

    Never creates a table. Raises ``sqlalchemy.exc.SQLAlchemyError`` when the state
    database cannot be reached.
    """
    now = now or _utcnow()
    store = store or open_state_store(settings)
    out: dict[str, Any] = {
        "version": __version__,
        "initialized": False,
        "state_db": redact_db_url(store.engine.url.render_as_string(hide_password=True)),
        "dry_run": settings.bemsoft_dry_run,
        "checkpoint": None,
        "last_successful_poll": None,
        "last_poll_age_s": None,
        "orders": dict.fromkeys(ORDER_STATES, 0),
        "items": dict.fromkeys(ITEM_STATES, 0),
        "oldest_waiting_age_s": None,
        "dead_letters": 0,
        "conferir": 0,
        "refused_items": 0,
        "failed_dir": str(settings.failed_dir),
        "failed_files": len(list_failed(Path(settings.failed_dir))),
        "catalog_entries": None,
        "catalog_age_s": None,
        "lease": None,
        "auth_paused": None,
    }
    out.update(catalog_status(settings, now=now))
    if _has_table(store, store.state):
        out["checkpoint"] = store.checkpoint()
    if not state_initialized(store):
        return out
    out["initialized"] = True
    counts = store.counts()
    out["orders"].update(counts["orders"])
    out["items"].update(counts["items"])
    out["dead_letters"] = out["orders"][ORDER_DEAD]
    out["conferir"] = out["orders"][ORDER_CONFERIR]
    out["refused_items"] = out["items"][ITEM_REFUSED]
    oldest = _aware(store.oldest_waiting())
    if oldest is not None:
        out["oldest_waiting_age_s"] = round(max(0.0, (now - oldest).total_seconds()), 1)
    if _has_table(store, store.flags):
        # The monitor renews its lease with its last successful poll; older versions wrote
        # a flag instead.
        lease = store.lease_info() if _has_table(store, store.lease) else None
        last = _aware(lease.get("LastPollAt")) if lease else None
        poll = last.isoformat() if last is not None else store.get_flag(FLAG_LAST_POLL)[0]
        if poll:
            out["last_successful_poll"] = poll
            try:
                when = dt.datetime.fromisoformat(poll)
                aware = _aware(when)
                assert aware is not None
                out["last_poll_age_s"] = round(max(0.0, (now - aware).total_seconds()), 1)
            except ValueError:
                pass
        paused, _ = store.get_flag(FLAG_AUTH_PAUSED)
        out["auth_paused"] = paused or None
    if _has_table(store, store.lease):
        info = store.lease_info()
        if info:
            expires = _aware(info["ExpiresAt"])
            acquired = _aware(info["AcquiredAt"])
            out["lease"] = {
                "holder": str(info["Holder"]),
                "host": str(info["Host"]),
                "pid": int(info["Pid"]),
                "acquired_at": acquired.isoformat() if acquired else None,
                "expires_at": expires.isoformat() if expires else None,
                "expired": bool(expires is not None and expires < now),
            }
    return out


def catalog_status(settings: Settings, *, now: dt.datetime) -> dict[str, Any]:
    """Entries and age of the saved catalogue copy (read from the file, never fetched)."""
    path = Path(settings.bemsoft_catalog_cache)
    out: dict[str, Any] = {"catalog_entries": None, "catalog_age_s": None}
    if not path.is_file():
        return out
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):
        return out
    tests = data.get("tests") if isinstance(data, dict) else None
    if isinstance(tests, list):
        out["catalog_entries"] = len(tests)
    fetched = data.get("fetched_at") if isinstance(data, dict) else None
    if isinstance(fetched, bool) or not isinstance(fetched, (int, float)):
        try:
            fetched = path.stat().st_mtime
        except OSError:
            return out
    out["catalog_age_s"] = round(max(0.0, now.timestamp() - float(fetched)), 1)
    return out


# --- check --------------------------------------------------------------------------------

CheckStatus = Literal["ok", "fail", "warn", "skip"]
SYMBOLS: dict[str, str] = {"ok": "✓", "fail": "✗", "warn": "!", "skip": "–"}

CLOCK_WARN_S = 60.0
CLOCK_FAIL_S = 300.0
CHECK_DB_TIMEOUT_S = 10
CHECK_HTTP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Check:
    """One line of ``check``."""

    status: CheckStatus
    label: str
    detail: str = ""
    fix: str = ""

    def line(self) -> str:
        text = f"{SYMBOLS[self.status]} {self.label}"
        if self.detail:
            text += f": {self.detail}"
        if self.fix:
            text += f" → {self.fix}"
        return text


def needed_lis_columns(source: LisSource) -> dict[str, list[str]]:
    """Every LIS column the monitor's queries use, per table, in table order."""
    used: set[tuple[str, str]] = set()
    for query in (source.new_items_query(ranges=[(1, 1)]),
                  source.visible_ids_query(after_id=0, limit=1),
                  source.requisitions_query([1])):
        for element in visitors.iterate(query):
            if isinstance(element, sa.Column) and isinstance(element.table, sa.Table):
                used.add((element.table.name, element.name))
    out: dict[str, list[str]] = {}
    for table in (source.t.item, source.t.requisition, source.t.patient, source.t.exam):
        out[table.name] = [c.name for c in table.columns if (table.name, c.name) in used]
    return out


def missing_lis_columns(conn: sa.Connection, source: LisSource,
                        schema: str | None) -> dict[str, list[str] | None]:
    """Per LIS table: None when the table is missing, else the missing columns (maybe [])."""
    inspector = sa.inspect(conn)
    present = {name.lower(): name for name in inspector.get_table_names(schema=schema)}
    out: dict[str, list[str] | None] = {}
    for table, columns in needed_lis_columns(source).items():
        real = present.get(table.lower())
        if real is None:
            out[table] = None
            continue
        have = {c["name"].lower() for c in inspector.get_columns(real, schema=schema)}
        out[table] = [c for c in columns if c.lower() not in have]
    return out


def writable_dir_problem(folder: Path) -> str | None:
    """Create ``folder`` owner-only if needed and check it accepts files.

    None when it does; else 'what is wrong: path; what to do', in Portuguese.
    """
    problem = _dir_problem(folder, private=True)
    return None if problem is None else f"{problem[0]}; {problem[1]}"


def _dir_problem(folder: Path, *, private: bool = False) -> tuple[str, str] | None:
    """Create ``folder`` (0o700 when private), write/delete a probe; (reason, fix) or None."""
    try:
        if private:
            ensure_private_dir(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".check-{os.getpid()}.tmp"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        return os_error_text(exc), os_error_fix(exc)
    return None


def _db_now_expr(dialect: str) -> sa.ColumnElement[Any]:
    if dialect == "mssql":
        return sa.func.sysutcdatetime()  # CURRENT_TIMESTAMP is the server's local time
    if dialect == "postgresql":
        return sa.func.now()
    return sa.func.current_timestamp()  # SQLite: UTC text


def _as_utc(value: Any) -> dt.datetime | None:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _clock_check(label: str, other: dt.datetime, local: dt.datetime, *, can_fail: bool,
                 fix: str) -> Check:
    skew = (local - other).total_seconds()
    where = "adiantado" if skew > 0 else "atrasado"
    detail = f"relógio local {where} {abs(skew):.0f} s em relação {label}"
    if can_fail and abs(skew) > CLOCK_FAIL_S:
        return Check("fail", "relógio", detail, fix)
    if abs(skew) > CLOCK_WARN_S:
        return Check("warn", "relógio", detail, fix)
    return Check("ok", "relógio", f"diferença de {abs(skew):.0f} s em relação {label}")


#: SQLAlchemy dialect (with its DB-API driver) per LIS/state backend the monitor supports.
DIALECTS = {"mssql": "mssql.pyodbc", "sqlite": "sqlite.pysqlite",
            "postgresql": "postgresql.psycopg"}


def _load_dialect(name: str) -> str | None:
    """Import a dialect and its driver module; the problem text or None."""
    from sqlalchemy.dialects import registry

    try:
        registry.load(name).import_dbapi()
    except Exception as exc:  # ImportError, or OSError from a native library
        return _short(exc)
    return None


def bundled_components(url: sa.URL | None) -> Iterator[Check]:
    """One line: which database drivers load and whether the simulator's catalogue is there.

    A driver the configured database needs is a failure; the others are warnings (the
    executable must carry all of them, a source install may lack the optional ones).
    """
    from .simulator import load_catalog_sample

    backend = url.get_backend_name() if url is not None else None
    loaded: list[str] = []
    for backend_name, dialect in DIALECTS.items():
        problem = _load_dialect(dialect)
        if problem is None:
            loaded.append(dialect)
        elif backend_name == backend:
            yield Check("fail", "componentes", f"driver {dialect} não carrega ({problem})",
                        "reinstale o programa (pip install -e .) ou gere o executável de novo")
        else:
            yield Check("warn", "componentes", f"driver {dialect} não carrega ({problem})")
    try:
        tests = len(load_catalog_sample())
    except Exception as exc:  # a missing data file in a bad build
        yield Check("fail", "componentes", f"catálogo de exemplo do simulador ausente ({exc})",
                    "reinstale o programa ou gere o executável de novo")
        tests = 0
    if loaded:
        extra = f"; catálogo de exemplo com {tests} exame(s)" if tests else ""
        yield Check("ok", "componentes", f"drivers {', '.join(loaded)}{extra}")


class Checker:
    """Runs the checks of ``bemsoft-monitor check`` one by one (a generator of lines)."""

    def __init__(self, settings: Settings, *, offline: bool = False) -> None:
        self.s = settings
        self.offline = offline
        self.secrets = settings.secrets

    def _scrub(self, text: str) -> str:
        return redact_secrets(text, self.secrets)

    def run(self) -> Iterator[Check]:
        """Every check in order; a failed prerequisite turns its dependants into skips."""
        yield from self._config()
        yield from self._components()
        yield from self._maps()
        driver = list(self._driver())
        yield from driver
        if any(check.status == "fail" for check in driver):
            # Connecting would only repeat the driver's failure as a misleading network error.
            yield Check("skip", "banco do LIS", "não verificado (driver do SQL Server ausente)")
            lis_ok = False
        else:
            lis_ok = yield from self._lis()
        yield from self._state(lis_ok)
        yield from self._bemsoft()
        yield from self._folders()

    # --- configuration -------------------------------------------------------------------
    def _config(self) -> Iterator[Check]:
        files = [str(p) for p in env_files() if p.is_file()]
        no_env = missing_env_file_line()
        detail = (f"arquivo {', '.join(files)}" if files else
                  f"{no_env}; usando só variáveis de ambiente" if no_env else
                  "sem arquivo .env (só variáveis)")
        mode = "BEMSOFT_DRY_RUN=1, nada é enviado" if self.s.bemsoft_dry_run else "envio real"
        yield Check("ok", "configuração válida", f"{detail}; {mode}")
        for warning in config_warnings(self.s):
            yield Check("warn", "configuração", warning)

    def _components(self) -> Iterator[Check]:
        """Database drivers and data files this installation (or executable) carries."""
        yield from bundled_components(self._lis_url())

    def _maps(self) -> Iterator[Check]:
        from .catalog import load_material_map, load_test_map

        for setting, path, loader, what in (
            ("BEMSOFT_TEST_MAP_PATH", self.s.bemsoft_test_map_path, load_test_map,
             "código(s)"),
            ("BEMSOFT_MATERIAL_MAP_PATH", self.s.bemsoft_material_map_path, load_material_map,
             "material(is)"),
        ):
            if not path:
                continue
            try:
                mapping = loader(Path(path))
            except ConfigError as exc:
                for problem in exc.problems:
                    yield Check("fail", setting, problem)
                continue
            yield Check("ok", setting, f"{len(mapping)} {what} em {path}")

    # --- database -------------------------------------------------------------------------
    def _lis_url(self) -> sa.URL | None:
        try:
            url = lis_url(self.s)
            return make_url(url) if isinstance(url, str) else url
        except (ConfigError, ValueError):
            return None

    def _driver(self) -> Iterator[Check]:
        url = self._lis_url()
        if url is None or url.get_backend_name() != "mssql":
            if url is not None:
                yield Check("skip", "driver ODBC", f"não usado (banco {url.get_backend_name()})")
            return
        label = "driver do SQL Server"
        if url.get_driver_name() == "mssqlpython":
            try:
                __import__("mssql_python")
            except ImportError as exc:
                yield Check("fail", label, f"mssql-python não instalado ({exc})",
                            "pip install 'bemsoft-monitor[mssql-python]' ou DB_DRIVER=pyodbc")
                return
            yield Check("ok", label, "mssql-python instalado")
            return
        if url.get_driver_name() != "pyodbc":
            return
        try:
            import pyodbc
        except ImportError as exc:
            fix = ("instale o ODBC Driver 18 for SQL Server da Microsoft" if sys.platform ==
                   "win32" else "instale o unixODBC (apt-get install unixodbc ou yum install "
                   "unixODBC) e o driver ODBC da Microsoft (msodbcsql18) ou o FreeTDS")
            yield Check("fail", label, f"pyodbc não carrega ({exc})", fix)
            return
        wanted = str(url.query.get("driver") or self.s.odbc_driver).strip().strip("{}")
        if "/" in wanted or "\\" in wanted:
            if Path(wanted).is_file():
                yield Check("ok", label, f"arquivo do driver encontrado: {wanted}")
            else:
                yield Check("fail", label, f"arquivo do driver não encontrado: {wanted}",
                            "corrija ODBC_DRIVER com o caminho completo do .so/.dll")
            return
        installed = list(pyodbc.drivers())
        if any(d.lower() == wanted.lower() for d in installed):
            yield Check("ok", label, f"ODBC '{wanted}' instalado")
            return
        listed = ", ".join(installed) if installed else "nenhum"
        yield Check("fail", label, f"ODBC '{wanted}' não instalado (instalados: {listed})",
                    "instale o driver ou ajuste ODBC_DRIVER para um dos instalados")

    def _lis_engine(self) -> sa.Engine:
        quick = self.s.model_copy(update={
            "db_login_timeout": min(self.s.db_login_timeout, CHECK_DB_TIMEOUT_S)})
        return make_engine(lis_url(quick), settings=quick)

    def _describe_db(self, url: sa.URL) -> str:
        if self.s.db_url:
            return redact_db_url(self.s.db_url)
        return f"{self.s.db_server}, banco {self.s.db_name}"

    def _lis(self) -> Generator[Check, None, bool]:
        """Connect, tables/columns, clock; returns (via StopIteration) whether it connected."""
        url = self._lis_url()
        if url is None:
            yield Check("fail", "banco do LIS", "URL de conexão não pôde ser montada",
                        "confira DB_SERVER/DB_NAME ou DB_URL")
            return False
        if url.get_backend_name() == "sqlite":
            database = url.database or ""
            if database and database != ":memory:" and not database.startswith("file:") \
                    and not Path(database).is_file():
                yield Check("fail", "banco do LIS", f"arquivo SQLite não existe: {database}",
                            "confira o caminho em DB_URL")
                return False
        try:
            engine = self._lis_engine()
        except ConfigError as exc:
            yield Check("fail", "banco do LIS", "; ".join(exc.problems))
            return False
        schema = lis_schema(self.s, engine.dialect.name)
        source = LisSource(tables=lis_tables(schema), support_labs=self.s.support_labs)
        try:
            with engine.connect() as conn:
                started = time.monotonic()
                conn.execute(sa.text("SELECT 1"))
                ms = (time.monotonic() - started) * 1000
                yield Check("ok", "banco do LIS acessível", f"{self._describe_db(url)} "
                                                            f"({engine.dialect.name}, {ms:.0f} ms)")
                missing = missing_lis_columns(conn, source, schema)
                bad = False
                where = f" no schema {schema}" if schema else ""
                for table, columns in missing.items():
                    if columns is None:
                        bad = True
                        yield Check("fail", f"tabela {table}", f"não encontrada{where}",
                                    "confira DB_NAME/DB_SCHEMA (o banco é o do LIS?)")
                    elif columns:
                        bad = True
                        yield Check("fail", f"tabela {table}",
                                    f"faltam as colunas {', '.join(columns)}",
                                    "o LIS é de outra versão? avise o suporte")
                if not bad:
                    yield Check("ok", "tabelas do LIS",
                                f"{', '.join(missing)} com todas as colunas usadas")
                yield self._db_clock(conn, engine.dialect.name)
                conn.rollback()
        except sa.exc.SQLAlchemyError as exc:
            yield Check("fail", "banco do LIS", f"sem conexão: {db_error_text(exc, self.secrets)}",
                        "confira DB_SERVER, DB_NAME, DB_USER/DB_PASS, o firewall (porta 1433) "
                        "e se o SQL Server aceita conexões TCP")
            return False
        finally:
            engine.dispose()
        return True

    def _db_clock(self, conn: sa.Connection, dialect: str) -> Check:
        try:
            value = conn.execute(sa.select(_db_now_expr(dialect))).scalar()
        except sa.exc.SQLAlchemyError as exc:
            return Check("warn", "relógio do banco", f"não consultado: "
                                                     f"{db_error_text(exc, self.secrets)}")
        db_now = _as_utc(value)
        if db_now is None:
            return Check("skip", "relógio do banco", "formato de data não reconhecido")
        check = _clock_check("ao banco de dados", db_now, _utcnow(), can_fail=False,
                             fix="acerte o relógio (NTP) deste computador ou do servidor do "
                                 "banco")
        return Check(check.status, "relógio do banco", check.detail, check.fix)

    def _state(self, lis_ok: bool) -> Iterator[Check]:
        label = "tabelas de estado do monitor"
        if not self.s.state_db_url and not lis_ok:
            yield Check("skip", label, "não verificadas (banco do LIS inacessível)")
            return
        try:
            store = open_state_store(self.s)
        except ConfigError as exc:
            yield Check("fail", label, "; ".join(exc.problems))
            return
        try:
            store.create_tables()
            with store.engine.connect() as conn:
                trans = conn.begin()
                now = _utcnow().replace(tzinfo=None)
                res = conn.execute(sa.update(store.flags).where(store.flags.c.Name == "CheckProbe")
                                   .values(Value="check", UpdatedAt=now))
                if res.rowcount == 0:
                    conn.execute(sa.insert(store.flags).values(Name="CheckProbe", Value="check",
                                                               UpdatedAt=now))
                trans.rollback()
            where = "STATE_DB_URL" if self.s.state_db_url else "banco do LIS"
            yield Check("ok", label, f"existem e aceitam gravação ({where})")
        except sa.exc.SQLAlchemyError as exc:
            yield Check("fail", label, f"sem permissão ou inacessível: "
                                       f"{db_error_text(exc, self.secrets)}",
                        "o usuário do banco precisa poder criar tabelas e gravar nelas "
                        "(ou use STATE_DB_URL para guardar o estado em outro banco)")
        finally:
            store.dispose()

    # --- Bemsoft --------------------------------------------------------------------------
    def _bemsoft(self) -> Iterator[Check]:
        labels = ("Bemsoft acessível", "token", "catálogo /tests")
        # DRY_RUN with a token still checks it: a lab tries the monitor in DRY_RUN first.
        why = "--offline" if self.offline else \
            "BEMSOFT_DRY_RUN=1 sem BEMSOFT_TOKEN" if self.s.bemsoft_dry_run and not self.s.token \
            else None
        if why is not None:
            for label in (*labels, "TLS", "relógio"):
                yield Check("skip", label, f"não verificado ({why})")
            return
        import requests

        from .catalog import parse_catalog

        base = self.s.bemsoft_base_url
        https = base.lower().startswith("https://")
        url = base + self.s.bemsoft_tests_endpoint
        session = requests.Session()
        session.trust_env = False  # as the monitor: only BEMSOFT_PROXY, never the system's
        if self.s.bemsoft_proxy:
            session.proxies = {"http": self.s.bemsoft_proxy, "https": self.s.bemsoft_proxy}
        started = time.monotonic()
        try:
            with warnings.catch_warnings():
                # BEMSOFT_VERIFY=0 has its own TLS line; urllib3's English warning is noise.
                warnings.simplefilter("ignore", InsecureRequestWarning)
                resp = session.get(url, headers={"Authorization": f"Bearer {self.s.token}",
                                                 "Accept": "application/json",
                                                 "User-Agent": f"BemsoftMonitor/{__version__}"},
                                   timeout=min(self.s.bemsoft_timeout, CHECK_HTTP_TIMEOUT_S),
                                   verify=self.s.verify, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            yield Check("fail", "TLS", f"certificado de {base} não validado "
                                       f"({self._scrub(self._http_reason(exc, url))})",
                        "instale a cadeia de certificados da empresa e aponte "
                        "BEMSOFT_VERIFY=/caminho/ca.pem; BEMSOFT_VERIFY=0 só para teste")
            yield Check("skip", "token", "não verificado (falha de TLS)")
            yield Check("skip", "catálogo /tests", "não verificado (falha de TLS)")
            return
        except requests.exceptions.RequestException as exc:
            yield Check("fail", labels[0], f"{url}: {self._scrub(self._http_reason(exc, url))}",
                        "confira BEMSOFT_BASE_URL, a internet/DNS e o firewall ou proxy")
            yield Check("skip", "token", "não verificado (Bemsoft inacessível)")
            yield Check("skip", "catálogo /tests", "não verificado (Bemsoft inacessível)")
            return
        finally:
            session.close()
        ms = (time.monotonic() - started) * 1000
        yield Check("ok", labels[0], f"{base} (HTTP {resp.status_code}, {ms:.0f} ms)")
        if https:
            yield Check("ok", "TLS", "certificado válido" if self.s.verify is not False
                        else "certificado NÃO verificado (BEMSOFT_VERIFY=0)")
        elif not _loopback(base):
            yield Check("warn", "TLS", "BEMSOFT_BASE_URL usa http: o token trafega sem "
                                       "criptografia", "use https://")
        else:
            yield Check("skip", "TLS", "não usado (http no próprio computador)")
        yield from self._http_clock(resp.headers.get("Date"))
        status = resp.status_code
        if status in (401, 403):
            yield Check("fail", "token", f"recusado pela Bemsoft (HTTP {status})",
                        "confira BEMSOFT_TOKEN no .env (sem aspas nem espaços)")
            yield Check("skip", "catálogo /tests", "não verificado (token recusado)")
            return
        if 300 <= status < 400:
            yield Check("fail", "token", f"não verificado: HTTP {status} redirecionado para "
                                         f"{resp.headers.get('Location', '?')}",
                        "confira BEMSOFT_BASE_URL (https?) e BEMSOFT_TESTS_ENDPOINT")
            yield Check("skip", "catálogo /tests", "não verificado")
            return
        if status != 200:
            text = self._scrub(" ".join(resp.text.split())[:160])
            yield Check("fail", "token", f"não verificado: HTTP {status} ({text})",
                        "confira BEMSOFT_BASE_URL e BEMSOFT_TESTS_ENDPOINT")
            yield Check("skip", "catálogo /tests", "não verificado")
            return
        yield Check("ok", "token", "aceito pela Bemsoft")
        try:
            entries = parse_catalog(resp.content, source=f"GET {self.s.bemsoft_tests_endpoint}")
        except MonitorError as exc:
            yield Check("fail", "catálogo /tests", self._scrub(str(exc)),
                        "confira BEMSOFT_TESTS_ENDPOINT")
            return
        if not entries:
            yield Check("fail", "catálogo /tests", "vazio", "confira BEMSOFT_TESTS_ENDPOINT")
            return
        tests = {e.test_id for e in entries}
        multi = sum(1 for t in tests if sum(1 for e in entries if e.test_id == t) > 1)
        yield Check("ok", "catálogo /tests", f"{len(entries)} entrada(s), {len(tests)} exame(s)"
                                              f", {multi} com mais de um material")

    def _http_reason(self, exc: BaseException, url: str) -> str:
        return describe_request_error(exc, url=url, proxy=self.s.bemsoft_proxy,
                                      timeout_s=min(self.s.bemsoft_timeout, CHECK_HTTP_TIMEOUT_S))

    def _http_clock(self, header: str | None) -> Iterator[Check]:
        if not header:
            yield Check("skip", "relógio", "a Bemsoft não informou a hora (cabeçalho Date)")
            return
        try:
            remote = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            yield Check("skip", "relógio", f"cabeçalho Date ilegível: {header!r}")
            return
        if remote.tzinfo is None:
            remote = remote.replace(tzinfo=dt.timezone.utc)
        yield _clock_check("à Bemsoft", remote, _utcnow(), can_fail=True,
                           fix="acerte o relógio deste computador (sincronização NTP); datas "
                               "erradas mudam a data dos pedidos")

    # --- folders -------------------------------------------------------------------------
    def _folders(self) -> Iterator[Check]:
        failed_dir = Path(self.s.failed_dir)
        problem = _dir_problem(failed_dir, private=True)
        if problem:
            yield Check("fail", "FAILED_DIR", f"{failed_dir}: {problem[0]}",
                        f"{problem[1]} ou aponte FAILED_DIR para outra pasta")
        else:
            yield Check("ok", "FAILED_DIR", f"{failed_dir} gravável")
        for setting, path in (("REFUSED_REPORT", Path(self.s.refused_report)),
                              ("BEMSOFT_CATALOG_CACHE", Path(self.s.bemsoft_catalog_cache))):
            problem = _dir_problem(path.parent)
            if problem:
                yield Check("fail", setting, f"pasta {path.parent}: {problem[0]}",
                            f"{problem[1]} ou aponte {setting} para outra pasta")
        if self.s.log_file is None:
            yield Check("skip", "LOG_FILE", "não definido (log só no console)")
            return
        log_problem = prepare_log_file(Path(self.s.log_file))
        if log_problem:
            yield Check("fail", "LOG_FILE", log_problem)
        else:
            yield Check("ok", "LOG_FILE", f"{self.s.log_file} gravável")


def _loopback(base_url: str) -> bool:
    from urllib.parse import urlsplit

    host = (urlsplit(base_url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
