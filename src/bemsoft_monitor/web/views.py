"""What the painel shows and does: read-only views over the state store, and the two actions.

Every read is a short query through the :class:`StateStore`; no transaction stays open
while a page is rendered. Patient data is masked unless ``PAINEL_PII=1``; secrets are
stripped from every text that came from the database.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..deadletter import ensure_private_dir
from ..logsetup import PATIENT_KEYS, mask_name, mask_payload, mask_text
from ..ops import catalog_status, collect_status, move_file
from ..redact import redact_secrets
from ..store import (
    ITEM_REFUSED,
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
# /readyz fails when the LIS was last read longer ago than this many poll intervals
# (never under two minutes: a long cycle while catching up is not an outage).
LIS_STALE_POLLS = 10
LIS_STALE_MIN_S = 120.0
# Where the painel moves a FAILED_DIR file once its order is requeued or resolved (the
# retry command reads only the folder's top level, so these are never sent again).
REQUEUED_SUBDIR = "reenviados_painel"
RESOLVED_SUBDIR = "resolvidos_painel"

ORDER_STATE_PT = {
    "pending": "na fila", "sending": "enviando", "delivered": "entregue",
    "dead": "não enviado (FAILED_DIR)", "conferir": "conferir", "resolved": "resolvido",
}
ITEM_STATE_PT = {
    "pending": "aguardando", "ordered": "no pedido", "delivered": "entregue",
    "refused": "recusado", "cancelled": "cancelado", "dead": "não enviado",
    "conferir": "conferir",
}


@dataclass
class Painel:
    """The painel's view of one running monitor."""

    settings: Settings
    monitor: Monitor

    @property
    def store(self) -> StateStore:
        return self.monitor.store

    def now(self) -> dt.datetime:
        return self.monitor.clock.now()

    @property
    def show_pii(self) -> bool:
        return self.settings.painel_pii

    # --- text hygiene ---------------------------------------------------------------
    def clean(self, text: str | None, patient: Sequence[str] = ()) -> str:
        """Secrets removed always; patient data masked unless PAINEL_PII=1.

        ``patient``: this order's own name/birth date/CPF, masked wherever the text repeats
        them (an API error may echo the name in free text, which no pattern recognises).
        """
        if not text:
            return ""
        out = redact_secrets(str(text), self.settings.secrets)
        if self.show_pii:
            return out
        for value in sorted(patient, key=len, reverse=True):
            # Letters and asterisks only: nothing in the replacement is a regex escape.
            shown = mask_name(value) if value.replace(" ", "").isalpha() else "***"
            out = re.compile(re.escape(value), re.IGNORECASE).sub(shown, out)
        return mask_text(out)

    def payload_text(self, payload: dict[str, Any]) -> str:
        shown = payload if self.show_pii else mask_payload(payload, show_pii=False)
        return redact_secrets(json.dumps(shown, ensure_ascii=False, indent=2),
                              self.settings.secrets)

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
                                    self.settings.secrets)
            checks.append({"nome": "banco_de_estado", "ok": False,
                           "detalhe": f"inacessível: {reason}"})
        m = self.monitor
        checks.append(self._lis_check())
        if self.settings.bemsoft_dry_run:
            checks.append({"nome": "bemsoft", "ok": True,
                           "detalhe": "BEMSOFT_DRY_RUN=1: nada é enviado"})
        elif m.auth_paused:
            why = self.clean(m.auth_paused)
            checks.append({"nome": "bemsoft", "ok": False,
                           "detalhe": f"token recusado, envio pausado: {why}"})
        elif m.breaker.is_open:
            checks.append({"nome": "bemsoft", "ok": False,
                           "detalhe": "Bemsoft fora do ar ou instável (sondagem periódica)"})
        else:
            checks.append({"nome": "bemsoft", "ok": True,
                           "detalhe": "sem token recusado nem instabilidade detectada"})
        if m.lease_held:
            checks.append({"nome": "trava", "ok": True, "detalhe": "este monitor envia"})
        else:
            checks.append({"nome": "trava", "ok": False,
                           "detalhe": "sem a trava: outro monitor está ativo ou o banco de "
                                      "estado ainda não foi lido"})
        return checks

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
                                   self.settings.secrets)
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
        cat = catalog_status(self.settings, now=self.now())
        refused = self.store.items_by_state(ITEM_REFUSED, limit=100000)
        by_code: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        for it in refused:
            snap = it.snapshot
            code = (snap.conv_code or "").strip() if snap else ""
            by_code[(code, self.clean(it.reason))].append(it.requisition_id)
        ranked = sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[0][0]))
        groups = [{"codigo": c, "motivo": r, "itens": len(reqs),
                   "solicitacoes": sorted(set(reqs))[:10]} for (c, r), reqs in ranked]
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
                        exc.strerror)


def item_exists(store: StateStore, item_id: int) -> bool:
    """Whether the ledger knows this item."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(store.items.c.ItemId).where(
            store.items.c.ItemId == item_id)).first() is not None

