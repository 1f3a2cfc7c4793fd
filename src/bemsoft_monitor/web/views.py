"""What the painel shows and does: read-only views over the state store, and the two actions.

Every read is a short query through the :class:`StateStore`; no transaction stays open
while a page is rendered. Patient data is masked unless the viewer may see it (a session
opened with ``PAINEL_PII_TOKEN``, or ``PAINEL_PII=1`` for everyone); secrets are stripped
from every text that came from the database.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ..bemsoft import BemsoftClient, Kind
from ..deadletter import ensure_private_dir
from ..logsetup import PATIENT_KEYS, mask_name, mask_payload, mask_text
from ..ops import catalog_status, collect_status, move_file
from ..oserrors import os_error_text
from ..redact import redact_secrets
from ..store import (
    ITEM_REFUSED,
    ITEM_RESOLVED,
    ORDER_CONFERIR,
    ORDER_DEAD,
    OrderRow,
    StateStore,
)

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine import Monitor

log = logging.getLogger(__name__)

CHART_HOURS = 24
CHART_W, CHART_H, CHART_TOP = 720, 160, 10
SENT_OUTCOMES = frozenset({"delivered", "already"})
LIST_LIMIT = 500
MIN_MASKED_LEN = 4
EXAMPLE_REQUISITIONS = 10  # per refusal group on the catalogue page
# /readyz fails when the LIS was last read longer ago than this many poll intervals
# (never under two minutes: a long cycle while catching up is not an outage).
LIS_STALE_POLLS = 10
LIS_STALE_MIN_S = 120.0
# Where the painel moves a FAILED_DIR file once its order is requeued or resolved (the
# retry command reads only the folder's top level, so these are never sent again).
REQUEUED_SUBDIR = "reenviados_painel"
RESOLVED_SUBDIR = "resolvidos_painel"
# /readyz trusts a good Bemsoft answer this recent (never under a minute, nor under the
# breaker's probe interval); older than that, it asks GET /tests itself, at most once per
# the same interval, so an idle monitor still notices an outage without hammering the API.
BEMSOFT_FRESH_MIN_S = 60.0
BEMSOFT_PROBE_TIMEOUT_S = 5.0
# Answers after which Bemsoft is working (the circuit breaker counts them as successes).
GOOD_ANSWERS = ("delivered", "already", "rejected", "not_saved", "rate_limited")
# How many of the latest attempts /readyz looks at for a good answer (newest first).
RECENT_ATTEMPTS = 50
# Webhook URL parts this long are treated as secrets on their own (a chat hook's path or
# query value; a single path segment only from 16 characters, so "services" stays a word).
MIN_SECRET_PART_LEN = 8
MIN_SECRET_SEGMENT_LEN = 16

ORDER_STATE_PT = {
    "pending": "na fila", "sending": "enviando", "delivered": "entregue",
    "dead": "não enviado (FAILED_DIR)", "conferir": "conferir", "resolved": "resolvido",
}
ITEM_STATE_PT = {
    "pending": "aguardando", "ordered": "no pedido", "delivered": "entregue",
    "refused": "recusado", "cancelled": "cancelado", "dead": "não enviado",
    "conferir": "conferir", ITEM_RESOLVED: "resolvido",
}


@dataclass
class BemsoftProbe:
    """The last GET /tests /readyz made itself (shared by every view of one painel)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    at: dt.datetime | None = None
    ok: bool = False
    detail: str = ""
    client: BemsoftClient | None = None


@dataclass
class Painel:
    """The painel's view of one running monitor.

    ``viewer_pii``: this viewer may see patient data (see :meth:`for_viewer`).
    """

    settings: Settings
    monitor: Monitor
    viewer_pii: bool = False
    probe: BemsoftProbe = field(default_factory=BemsoftProbe)

    @property
    def store(self) -> StateStore:
        return self.monitor.store

    def now(self) -> dt.datetime:
        return self.monitor.clock.now()

    def for_viewer(self, *, pii: bool) -> Painel:
        """The same painel as one session sees it (patient data shown only when ``pii``)."""
        return self if pii == self.viewer_pii else replace(self, viewer_pii=pii)

    @property
    def show_pii(self) -> bool:
        """Patient data unmasked: PAINEL_PII=1, or a session opened with PAINEL_PII_TOKEN."""
        return self.settings.painel_pii or self.viewer_pii

    @functools.cached_property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value to strip: the settings' own, DB URL passwords, webhook parts."""
        found = list(self.settings.secrets)
        for url in (self.settings.db_url, self.settings.state_db_url):
            found.extend(_url_passwords(url))
        hook = self.settings.alert_webhook_url
        if hook:
            try:
                parts = urlsplit(hook)
            except ValueError:
                parts = None
            if parts is not None:
                # Chat hooks carry their key in the path (/services/T…/B…/<key>) or query.
                found.append(parts.path)
                found.extend(p for p in parts.path.split("/") if len(p) >= MIN_SECRET_SEGMENT_LEN)
                found.extend(v for _k, v in parse_qsl(parts.query))
        kept = {v for v in found if v and len(v) >= MIN_SECRET_PART_LEN} | set(
            self.settings.secrets)
        # Longest first, so that a secret containing another is removed whole.
        return tuple(sorted(kept, key=len, reverse=True))

    # --- text hygiene ---------------------------------------------------------------
    def clean(self, text: str | None, patient: Sequence[str] = ()) -> str:
        """Secrets removed always; patient data masked unless this viewer may see it.

        ``patient``: this order's own name/birth date/CPF, masked wherever the text repeats
        them (an API error may echo the name in free text, which no pattern recognises).
        """
        if not text:
            return ""
        out = redact_secrets(str(text), self.secrets)
        if self.show_pii:
            return out
        for value in sorted(patient, key=len, reverse=True):
            # Letters and asterisks only: nothing in the replacement is a regex escape.
            shown = mask_name(value) if value.replace(" ", "").isalpha() else "***"
            out = re.compile(re.escape(value), re.IGNORECASE).sub(shown, out)
        return mask_text(out)

    def payload_text(self, payload: dict[str, Any]) -> str:
        """The payload as sent, patient fields masked (the physician is not patient data)."""
        shown = payload if self.show_pii else _with_physicians(
            mask_payload(payload, show_pii=False), payload)
        return redact_secrets(json.dumps(shown, ensure_ascii=False, indent=2), self.secrets)

    def local(self, value: dt.datetime | None) -> str:
        """A stored (naive UTC) or aware time in the lab's time zone."""
        if value is None:
            return "—"
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(self.settings.lab_tz).strftime("%d/%m/%Y %H:%M:%S")

    @staticmethod
    def patient_values(payload: Any, items: Sequence[Any] = ()) -> tuple[str, ...]:
        """The patient's identifying values in a payload and in LIS snapshots."""
        found: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == PHYSICIAN_KEY:
                        continue  # the physician's name is not the patient's
                    if key in PATIENT_KEYS and isinstance(value, str):
                        found.add(value.strip())
                    else:
                        walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(payload)
        for it in items:
            snap = getattr(it, "snapshot", None)
            if snap is not None:
                found.update(str(v).strip() for v in (snap.patient_name, snap.patient_cpf)
                             if v)
        # Short values ("F", "10") would mask ordinary words and numbers.
        return tuple(v for v in found if len(v) >= MIN_MASKED_LEN)

    # --- health ------------------------------------------------------------------------
    def readiness(self) -> list[dict[str, Any]]:
        """State store, LIS reading, Bemsoft and lease checks for /readyz."""
        checks: list[dict[str, Any]] = []
        try:
            with self.store.engine.connect() as conn:
                conn.execute(sa.select(1))
            checks.append({"nome": "banco_de_estado", "ok": True, "detalhe": "acessível"})
        except sa.exc.SQLAlchemyError as exc:
            reason = redact_secrets(str(getattr(exc, "orig", exc)).splitlines()[0][:200],
                                    self.secrets)
            checks.append({"nome": "banco_de_estado", "ok": False,
                           "detalhe": f"inacessível: {reason}"})
        m = self.monitor
        checks.append(self._lis_check())
        checks.append(self._bemsoft_check())
        if m.lease_held:
            checks.append({"nome": "trava", "ok": True, "detalhe": "este monitor envia"})
        else:
            checks.append({"nome": "trava", "ok": False,
                           "detalhe": "sem a trava: outro monitor está ativo ou o banco de "
                                      "estado ainda não foi lido"})
        return checks

    def bemsoft_fresh_s(self) -> float:
        """How recent a good Bemsoft answer must be for /readyz to trust it without a probe."""
        return max(BEMSOFT_FRESH_MIN_S, self.settings.bemsoft_breaker_seconds)

    def _bemsoft_check(self) -> dict[str, Any]:
        m = self.monitor
        if self.settings.bemsoft_dry_run:
            return {"nome": "bemsoft", "ok": True, "detalhe": "BEMSOFT_DRY_RUN=1: nada é enviado"}
        if m.auth_paused:
            return {"nome": "bemsoft", "ok": False,
                    "detalhe": f"token recusado, envio pausado: {self.clean(m.auth_paused)}"}
        if m.breaker.is_open:
            return {"nome": "bemsoft", "ok": False,
                    "detalhe": "Bemsoft fora do ar ou instável (sondagem periódica)"}
        now = self.now()
        window_s = self.bemsoft_fresh_s()
        # A time "in the future" (a clock set back) proves nothing and is left out.
        ages = [age for age in ((now - t).total_seconds() for t in self.bemsoft_answers())
                if 0 <= age <= window_s]
        if ages:
            return {"nome": "bemsoft", "ok": True,
                    "detalhe": f"última resposta da Bemsoft há {min(ages):.0f} s"}
        return self._probe_check(now, window_s)

    def bemsoft_answers(self) -> list[dt.datetime]:
        """When Bemsoft last answered well: the latest good POST answer, the catalogue fetch."""
        found: list[dt.datetime] = []
        a = self.store.attempts
        q = (sa.select(a.c.FinishedAt, a.c.Outcome).order_by(a.c.AttemptId.desc())
             .limit(RECENT_ATTEMPTS))
        try:
            with self.store.engine.connect() as conn:
                rows = conn.execute(q).all()
        except sa.exc.SQLAlchemyError:
            rows = []  # the state-store check reports that
        for finished, outcome in rows:
            if finished is not None and outcome in GOOD_ANSWERS:
                found.append(_utc(finished))
                break
        catalog = self.monitor.catalog
        loaded = catalog.loaded_at if catalog is not None else None
        if loaded is not None:
            found.append(dt.datetime.fromtimestamp(loaded, dt.timezone.utc))
        return found

    def _probe_check(self, now: dt.datetime, interval_s: float) -> dict[str, Any]:
        """GET /tests, asked at most once per ``interval_s``; later calls reuse the answer."""
        p = self.probe
        with p.lock:
            age_s = (now - p.at).total_seconds() if p.at is not None else None
            if age_s is None or not 0 <= age_s < interval_s:
                p.ok, p.detail = self._probe_once()
                p.at, age_s = now, 0.0
            return {"nome": "bemsoft", "ok": p.ok,
                    "detalhe": f"{p.detail} (sondagem GET /tests há {age_s:.0f} s; nenhuma "
                               f"resposta da Bemsoft nos últimos {interval_s:.0f} s)"}

    def _probe_once(self) -> tuple[bool, str]:
        s = self.settings
        p = self.probe
        if p.client is None:
            p.client = BemsoftClient(
                base_url=s.bemsoft_base_url, token=s.token, endpoint=s.bemsoft_endpoint,
                tests_endpoint=s.bemsoft_tests_endpoint,
                timeout_s=min(s.bemsoft_timeout, BEMSOFT_PROBE_TIMEOUT_S), verify=s.verify,
                proxy=s.bemsoft_proxy)
        out = p.client.check_token()
        if out.kind in (Kind.DELIVERED, Kind.RATE_LIMITED):
            return True, f"a Bemsoft respondeu HTTP {out.status}"
        if out.kind == Kind.AUTH:
            return False, f"token recusado pela Bemsoft (HTTP {out.status}); confira BEMSOFT_TOKEN"
        if out.status is None:
            return False, f"a Bemsoft não respondeu: {self.clean(out.message)[:200]}"
        return False, f"a Bemsoft respondeu HTTP {out.status}"

    def lis_stale_after_s(self) -> float:
        """How old the last successful LIS read may be before /readyz fails."""
        return max(LIS_STALE_MIN_S, LIS_STALE_POLLS * self.settings.poll_seconds)

    def _lis_check(self) -> dict[str, Any]:
        m = self.monitor
        last = m.last_successful_poll
        if not m.lease_held:
            return {"nome": "leitura_lis", "ok": False,
                    "detalhe": "este monitor não lê o LIS enquanto não tiver a trava"}
        if last is None:
            return {"nome": "leitura_lis", "ok": False,
                    "detalhe": "o LIS ainda não foi lido desde o início do monitor"}
        age_s = (self.now() - last).total_seconds()
        limit_s = self.lis_stale_after_s()
        if age_s > limit_s:
            return {"nome": "leitura_lis", "ok": False,
                    "detalhe": f"nenhuma leitura bem-sucedida do LIS há {age_s:.0f} s (limite "
                               f"{limit_s:.0f} s); veja o log do monitor"}
        return {"nome": "leitura_lis", "ok": True,
                "detalhe": f"última leitura há {max(age_s, 0):.0f} s"}

    # --- overview -----------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        now = self.now()
        status: dict[str, Any] | None
        error = None
        try:
            status = collect_status(self.settings, store=self.store, now=now)
        except sa.exc.SQLAlchemyError as exc:
            status = None
            error = redact_secrets(str(getattr(exc, "orig", exc)).splitlines()[0][:200],
                                   self.secrets)
        chart = self.chart(now) if status is not None else None
        m = self.monitor
        return {
            "status": status, "erro_banco": error, "chart": chart,
            "trava": m.lease_held, "pausado": self.clean(m.auth_paused) or None,
            "disjuntor": m.breaker.is_open, "dry_run": self.settings.bemsoft_dry_run,
            "ultima_leitura": self.local(m.last_successful_poll)
            if m.last_successful_poll else None,
            "estados": ORDER_STATE_PT, "estados_itens": ITEM_STATE_PT,
        }

    def chart(self, now: dt.datetime) -> dict[str, Any]:
        """Orders sent and failed per hour over the last 24 h, laid out as SVG bars.

        Orders, not attempts: an order retried ten times in one hour is one failed order
        in that hour (and a sent one in the hour it was finally delivered).
        """
        now_utc = now.astimezone(dt.timezone.utc).replace(tzinfo=None) if now.tzinfo else now
        end = now_utc.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
        start = end - dt.timedelta(hours=CHART_HOURS)
        a = self.store.attempts
        q = (sa.select(a.c.OrderId, a.c.FinishedAt, a.c.Outcome)
             .where(a.c.FinishedAt >= start, a.c.FinishedAt < end, a.c.Outcome.is_not(None)))
        sent_ids: list[set[int]] = [set() for _ in range(CHART_HOURS)]
        failed_ids: list[set[int]] = [set() for _ in range(CHART_HOURS)]
        with self.store.engine.connect() as conn:
            for order_id, finished, outcome in conn.execute(q):
                slot = int((finished - start).total_seconds() // 3600)
                if 0 <= slot < CHART_HOURS:
                    if outcome in SENT_OUTCOMES:
                        sent_ids[slot].add(int(order_id))
                    elif outcome != "interrupted":
                        failed_ids[slot].add(int(order_id))
        sent = [len(ids) for ids in sent_ids]
        failed = [len(ids) for ids in failed_ids]
        peak = max([*sent, *failed, 1])
        slot_w = CHART_W / CHART_HOURS
        bar_w = (slot_w - 4) / 2
        bars = []
        for i in range(CHART_HOURS):
            hour = (start + dt.timedelta(hours=i)).replace(tzinfo=dt.timezone.utc)
            label = hour.astimezone(self.settings.lab_tz).strftime("%H")
            hs = round(sent[i] / peak * CHART_H, 1)
            hf = round(failed[i] / peak * CHART_H, 1)
            x = round(i * slot_w + 2, 1)
            bars.append({
                "label": label, "sent": sent[i], "failed": failed[i],
                "x_sent": x, "x_failed": round(x + bar_w, 1), "w": round(bar_w, 1),
                "h_sent": hs, "y_sent": round(CHART_TOP + CHART_H - hs, 1),
                "h_failed": hf, "y_failed": round(CHART_TOP + CHART_H - hf, 1),
                "x_label": round(i * slot_w + slot_w / 2, 1),
            })
        return {"bars": bars, "peak": peak, "total_sent": sum(sent),
                "total_failed": sum(failed), "width": CHART_W,
                "height": CHART_H + CHART_TOP + 20, "base": CHART_TOP + CHART_H}

    # --- requisition ----------------------------------------------------------------------
    def requisition(self, req_id: int) -> dict[str, Any] | None:
        """One requisition: items, orders with payload and attempts; None when unknown."""
        items = self.store.requisition_items(req_id)
        orders = self.store.orders_of_requisition(req_id)
        if not items and not orders:
            return None
        patient = None
        known = self.patient_values([o.payload for o in orders], items)
        rows = []
        for it in items:
            snap = it.snapshot
            if snap is not None and patient is None and snap.patient_name:
                patient = snap.patient_name if self.show_pii else mask_name(snap.patient_name)
            rows.append({
                "id": it.item_id, "estado": ITEM_STATE_PT.get(it.state, it.state),
                "estado_cod": it.state, "pedido": it.order_id,
                "codigo": (snap.conv_code or "").strip() if snap else "",
                "descricao": (snap.description or "").strip() if snap else "",
                "motivo": self.clean(it.reason, known),
            })
        return {"numero": req_id, "paciente": patient, "itens": rows,
                "pedidos": [self.order_view(o) for o in orders]}

    def order_view(self, o: OrderRow) -> dict[str, Any]:
        known = self.patient_values(o.payload)
        attempts = []
        for a in self.store.attempts_of(o.order_id):
            attempts.append({
                "inicio": self.local(a["StartedAt"]), "fim": self.local(a["FinishedAt"]),
                "status": a["Status"], "resultado": a["Outcome"] or "sem resposta ainda",
                "detalhe": self.clean(a["Detail"], known), "ms": a["ElapsedMs"],
                "chave": a["IdempotencyKey"],
            })
        return {
            "id": o.order_id, "req": o.requisition_id, "seq": o.seq, "estado_cod": o.state,
            "estado": ORDER_STATE_PT.get(o.state, o.state), "chave": o.key,
            "tentativas": o.attempts, "erro": self.clean(o.last_error, known),
            "status": o.last_status, "itens": list(o.item_ids),
            "payload": self.payload_text(o.payload), "tentativas_lista": attempts,
            "arquivo": Path(o.failed_file).name if o.failed_file else None,
            "acoes": o.state in (ORDER_DEAD, ORDER_CONFERIR),
        }

    # --- work lists -------------------------------------------------------------------------
    def pending_work(self) -> dict[str, Any]:
        dead = self.store.orders_by_state(ORDER_DEAD, limit=LIST_LIMIT)
        conferir = self.store.orders_by_state(ORDER_CONFERIR, limit=LIST_LIMIT)
        refused = self.store.items_by_state(ITEM_REFUSED, limit=LIST_LIMIT)
        return {
            "mortos": [self._brief(o) for o in dead],
            "conferir": [self._brief(o) for o in conferir],
            "recusados": [self._refused(it) for it in refused],
            "limite": LIST_LIMIT,
        }

    def _brief(self, o: OrderRow) -> dict[str, Any]:
        return {"id": o.order_id, "req": o.requisition_id, "seq": o.seq,
                "itens": len(o.item_ids), "tentativas": o.attempts, "status": o.last_status,
                "erro": self.clean(o.last_error, self.patient_values(o.payload))[:300],
                "arquivo": Path(o.failed_file).name if o.failed_file else None}

    def _refused(self, it: Any) -> dict[str, Any]:
        snap = it.snapshot
        return {"id": it.item_id, "req": it.requisition_id,
                "codigo": (snap.conv_code or "").strip() if snap else "",
                "descricao": (snap.description or "").strip() if snap else "",
                "motivo": self.clean(it.reason)}

    def catalog_problems(self) -> dict[str, Any]:
        """Refused items grouped by code and reason (the requisition number taken out)."""
        cat = catalog_status(self.settings, now=self.now())
        refused = self.store.items_by_state(ITEM_REFUSED, limit=100000)
        by_code: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        for it in refused:
            snap = it.snapshot
            code = (snap.conv_code or "").strip() if snap else ""
            known = self.patient_values((), [it])
            reason = self.clean(general_reason(it.reason or "", it.requisition_id), known)
            by_code[(code, reason)].append(it.requisition_id)
        ranked = sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[0][0]))
        groups = [{"codigo": c, "motivo": r, "itens": len(reqs),
                   "n_solicitacoes": len(set(reqs)),
                   "solicitacoes": sorted(set(reqs))[:EXAMPLE_REQUISITIONS]}
                  for (c, r), reqs in ranked]
        age = cat.get("catalog_age_s")
        return {
            "entradas": cat.get("catalog_entries"),
            "idade_h": None if age is None else round(float(age) / 3600, 1),
            "arquivo": str(self.settings.bemsoft_catalog_cache),
            "mapa_exames": str(self.settings.bemsoft_test_map_path or "—"),
            "mapa_materiais": str(self.settings.bemsoft_material_map_path or "—"),
            "grupos": groups, "total": len(refused),
        }

    # --- actions --------------------------------------------------------------------------
    def requeue(self, order_id: int, *, who: str) -> tuple[bool, str]:
        """Reenviar: back to the queue (new key only for 'conferir'); the loop sends it."""
        order = self.store.get_order(order_id)
        if order is None:
            return False, f"Pedido {order_id} não existe."
        if order.state not in (ORDER_DEAD, ORDER_CONFERIR):
            return False, (f"Pedido {order_id} está '{ORDER_STATE_PT.get(order.state)}'; "
                           "nada a reenviar.")
        conferir = order.state == ORDER_CONFERIR
        if not self.store.requeue_order(order_id, now=self.now(), new_generation=conferir):
            return False, f"Pedido {order_id} mudou de estado; nada foi feito."
        self._move_failed_file(order, REQUEUED_SUBDIR)
        log.info("painel: pedido %s (solicitação %s) devolvido à fila por %s%s", order_id,
                 order.requisition_id, who, " com nova Idempotency-Key" if conferir else "")
        return True, (f"Pedido {order_id} (solicitação {order.requisition_id}) voltou para a "
                      "fila; o monitor fará o envio em instantes.")

    def resolve(self, order_id: int, *, who: str) -> tuple[bool, str]:
        """Marcar como resolvido: nothing will be sent for this order."""
        order = self.store.get_order(order_id)
        if order is None:
            return False, f"Pedido {order_id} não existe."
        stamp = self.local(self.now())
        note = f"marcado como resolvido no painel por {who} em {stamp}"
        if not self.store.resolve_order(order_id, now=self.now(), note=note):
            return False, (f"Pedido {order_id} está '{ORDER_STATE_PT.get(order.state)}'; "
                           "nada a resolver.")
        self._move_failed_file(order, RESOLVED_SUBDIR)
        log.info("painel: pedido %s (solicitação %s) marcado como resolvido por %s", order_id,
                 order.requisition_id, who)
        return True, (f"Pedido {order_id} (solicitação {order.requisition_id}) marcado como "
                      "resolvido.")

    def requeue_refused(self, item_id: int, *, who: str) -> tuple[bool, str]:
        """Refused item back to pending (after fixing the mapping or catalogue)."""
        n = self.store.requeue_refused(now=self.now(), item_ids=[item_id])
        if not n:
            return False, f"Item {item_id} não está recusado; nada foi feito."
        log.info("painel: item recusado %s devolvido à fila por %s", item_id, who)
        return True, f"Item {item_id} voltou para a fila; será transformado e enviado de novo."

    def resolve_refused(self, item_id: int, *, who: str) -> tuple[bool, str]:
        """Marcar como resolvido for a refused item: dealt with outside the monitor, never sent."""
        note = f"marcado como resolvido no painel por {who} em {self.local(self.now())}"
        if not self.store.resolve_refused([item_id], now=self.now(), note=note):
            return False, f"Item {item_id} não está recusado; nada foi feito."
        log.info("painel: item recusado %s marcado como resolvido por %s", item_id, who)
        return True, f"Item {item_id} marcado como resolvido; ele não será enviado."

    def _move_failed_file(self, order: OrderRow, subdir: str) -> None:
        if not order.failed_file:
            return
        path = Path(order.failed_file)
        if not path.is_file():
            return
        try:
            move_file(path, ensure_private_dir(path.parent / subdir))
        except OSError as exc:
            log.warning("painel: não foi possível mover %s para %s: %s", path.name, subdir,
                        os_error_text(exc))


PHYSICIAN_KEY = "physician"
_REQ_PREFIX = "solicitação {req}: "


def general_reason(reason: str, requisition_id: int) -> str:
    """A refusal reason with its requisition number taken out, to group equal problems.

    ``solicitação 123: sexo ausente`` → ``sexo ausente``; ``(s123-2)`` → ``(s…-2)``.
    """
    req = str(requisition_id)
    out = reason.removeprefix(_REQ_PREFIX.format(req=req))
    out = re.sub(rf"\bsolicitação {req}(?!\d)", "solicitação …", out)
    # The order's external ids: sol-123, order-123-2, s123, o123-2.
    return re.sub(rf"(?<![\w-])(sol-|order-|s|o){req}(?![\d])", r"\1…", out)


def _with_physicians(masked: Any, original: Any) -> Any:
    """``masked`` with every physician object put back as in ``original``."""
    if isinstance(masked, dict) and isinstance(original, dict):
        return {k: (original[k] if k == PHYSICIAN_KEY and k in original
                    else _with_physicians(v, original.get(k))) for k, v in masked.items()}
    if isinstance(masked, list) and isinstance(original, list) and len(masked) == len(original):
        return [_with_physicians(m, o) for m, o in zip(masked, original, strict=True)]
    return masked


def _url_passwords(url: str | None) -> list[str]:
    """The password of a database URL, in its user part or its query string."""
    if not url:
        return []
    try:
        parsed = make_url(url)
    except Exception:  # an unparsable URL was refused by the settings already
        return []
    found = [parsed.password] if parsed.password else []
    for key, value in parsed.query.items():
        if key.lower() in ("password", "pwd", "passwd"):
            found.extend([value] if isinstance(value, str) else list(value))
    return [str(v) for v in found if v]


def _utc(value: dt.datetime) -> dt.datetime:
    """A stored time (naive UTC) as an aware one."""
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def item_exists(store: StateStore, item_id: int) -> bool:
    """Whether the ledger knows this item."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(store.items.c.ItemId).where(
            store.items.c.ItemId == item_id)).first() is not None

