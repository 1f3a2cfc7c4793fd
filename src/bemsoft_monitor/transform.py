"""Pure transformation: the pending LIS items of one requisition -> Bemsoft order + refusals.

No I/O and no clock reads: the current time comes in as ``now``.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .catalog import Resolver
from .config import Settings
from .models import LisItem, OrderDraft, Refusal, TransformResult

__all__ = [
    "PLACEHOLDER_BIRTHDATE",
    "batch_external_id",
    "build_orders",
    "normalize_gender",
    "order_external_id",
    "parse_hora",
]

#: Birth dates on or before this day are LIS placeholders, not real dates.
PLACEHOLDER_BIRTHDATE = dt.date(1900, 1, 1)

_MIDNIGHT = dt.time(0, 0, 0)
_HORA = re.compile(r"(\d{1,2})\s*[:hH]\s*(\d{2})(?:\s*:\s*(\d{2})(?:[.,]\d+)?)?")
_GENDERS = {
    "m": "M",
    "masc": "M",
    "masc.": "M",
    "masculino": "M",
    "f": "F",
    "fem": "F",
    "fem.": "F",
    "feminino": "F",
}
_NON_DIGITS = re.compile(r"\D")


# --- small pure helpers (public where the README or other modules use them) -----------------


def parse_hora(value: object) -> dt.time | None:
    """``solicitacao.Hora`` as a time: '8:00', '08:00', '08:00:00', '8h00'; None for junk."""
    if isinstance(value, dt.datetime):
        return value.time().replace(microsecond=0)
    if isinstance(value, dt.time):
        return value.replace(microsecond=0, tzinfo=None)
    if not isinstance(value, str):
        return None
    match = _HORA.fullmatch(value.strip())
    if not match:
        return None
    hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    return dt.time(hour, minute, second)


def normalize_gender(value: object) -> str | None:
    """'M', ' masculino ', 'FEMININO', 'Fem.' -> 'M'/'F'; anything else -> None."""
    if not isinstance(value, str):
        return None
    decomposed = unicodedata.normalize("NFKD", value)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _GENDERS.get("".join(plain.casefold().split()))


def batch_external_id(requisition_id: int, seq: int) -> str:
    """``sol-<req>`` for the first order of a requisition, ``sol-<req>-<seq>`` after."""
    return f"sol-{requisition_id}" if seq == 1 else f"sol-{requisition_id}-{seq}"


def order_external_id(requisition_id: int, seq: int) -> str:
    """``order-<req>`` for the first order of a requisition, ``order-<req>-<seq>`` after."""
    return f"order-{requisition_id}" if seq == 1 else f"order-{requisition_id}-{seq}"


def _compact(prefix: str, number: object, seq: int | None = None) -> str:
    return f"{prefix}{number}" if seq is None or seq == 1 else f"{prefix}{number}-{seq}"


def _fit(long: str, short: str, limit: int) -> str | None:
    """The long form when it fits, else the compact one, else None."""
    if len(long) <= limit:
        return long
    if len(short) <= limit:
        return short
    return None


def _as_datetime(value: object, tz: dt.tzinfo) -> dt.datetime | None:
    """A LIS date/time as naive lab-local time, seconds precision; None when unusable."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(tz).replace(tzinfo=None)
        return value.replace(microsecond=0)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, _MIDNIGHT)
    return None


def _as_date(value: object) -> dt.date | None:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return None


def _clean(value: object) -> str:
    """Text with whitespace collapsed and trimmed ('' for None/non-text)."""
    if value is None:
        return ""
    return " ".join(str(value).split())


def _first(items: Sequence[LisItem], attr: str) -> Any:
    """First non-null (and, for text, non-blank) value of a repeated column."""
    for item in items:
        value = getattr(item, attr)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        return value
    return None


def _local_now(now: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    if now.tzinfo is None:  # a naive `now` is taken as UTC
        now = now.replace(tzinfo=dt.timezone.utc)
    return now.astimezone(tz).replace(tzinfo=None, microsecond=0)


def _d(value: dt.datetime) -> str:
    return value.date().isoformat()


def _t(value: dt.datetime) -> str:
    return value.strftime("%H:%M:%S")


def _shown(value: object) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return "vazio"
    text = str(value)
    return repr(text if len(text) <= 20 else text[:20] + "...")


# --- requisition-level part -------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    batch_id: str
    order_id: str
    order_at: dt.datetime
    patient: dict[str, Any]
    physician: dict[str, str] | None


def _order_moment(items: Sequence[LisItem], tz: dt.tzinfo, now: dt.datetime) -> dt.datetime:
    """The specification's chain: dtaentrada + Hora, then ItemSol.DataEntrada, then now."""
    entered = sorted(
        d for d in (_as_datetime(i.item_entered_at, tz) for i in items) if d is not None
    )
    requisition_date = _as_datetime(_first(items, "requisition_date"), tz)
    if requisition_date is not None:
        day = requisition_date.date()
        hora = parse_hora(_first(items, "requisition_time"))
        if hora is None and requisition_date.time() != _MIDNIGHT:
            hora = requisition_date.time()  # the LIS kept the time in dtaentrada itself
        if hora is None:
            # Only a date: the time comes from the items entered that day; the date stays
            # the requisition's even when items were collected the day after.
            same_day = [d for d in entered if d.date() == day]
            hora = same_day[0].time() if same_day else _MIDNIGHT
        return dt.datetime.combine(day, hora)
    if entered:
        return entered[0]
    return _local_now(now, tz)


def _patient_problems(
    items: Sequence[LisItem], settings: Settings, today: dt.date
) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    limit = settings.bemsoft_extid_max

    patient_id = _first(items, "patient_id")
    cpf_digits = _NON_DIGITS.sub("", str(_first(items, "patient_cpf") or ""))
    external_id: str | None = None
    if patient_id is not None:
        external_id = _fit(f"pat-{patient_id}", _compact("p", patient_id), limit)
        kind = "pat-<codpaciente>"
    elif len(cpf_digits) == 11 and len(set(cpf_digits)) > 1:
        external_id = _fit(f"cpf-{cpf_digits}", _compact("c", cpf_digits), limit)
        kind = "cpf-<CPF>"
    else:
        kind = ""
        cpf_state = (
            "ausente"
            if not cpf_digits
            else f"inválido, {len(cpf_digits)} dígitos"
            if len(cpf_digits) != 11
            else "inválido, dígitos todos iguais"
        )
        problems.append(
            f"paciente sem identificação: solicitacao.codpaciente vazio e CPF {cpf_state}; "
            "vincule o paciente à solicitação no LIS"
        )
    if kind and external_id is None:
        problems.append(
            f"identificador do paciente ({kind}) passa do limite BEMSOFT_EXTID_MAX={limit} "
            "caracteres mesmo na forma curta; aumente BEMSOFT_EXTID_MAX no .env"
        )

    name = _clean(_first(items, "patient_name"))
    if not name:
        problems.append("nome do paciente vazio (paciente.nome); preencha o nome no LIS")

    raw_sex = _first(items, "patient_sex")
    gender = normalize_gender(raw_sex) or settings.default_gender
    if gender is None:
        problems.append(
            f"sexo do paciente ausente/inválido ({_shown(raw_sex)}); defina DEFAULT_GENDER=M "
            "ou F no .env ou corrija paciente.sexo"
        )

    birth = _as_date(_first(items, "patient_birth"))
    if birth is None:
        birth_state = "ausente"
    elif birth <= PLACEHOLDER_BIRTHDATE:
        birth_state = f"{birth.isoformat()}, valor provisório"
    elif birth > today:
        birth_state = "no futuro"
    else:
        birth_state = ""
    if birth_state:
        birth = settings.default_birthdate
        if birth is None:
            problems.append(
                f"data de nascimento do paciente ausente/inválida ({birth_state}); defina "
                "DEFAULT_BIRTHDATE=AAAA-MM-DD no .env ou corrija paciente.datanasc"
            )

    patient = {
        "externalId": external_id,
        "name": name,
        "birthDate": birth.isoformat() if birth else None,
        "gender": gender,
        "weight": 0,
        "height": 0,
    }
    return patient, problems


def _header(
    items: Sequence[LisItem], settings: Settings, seq: int, now: dt.datetime
) -> _Header | list[str]:
    tz = settings.lab_tz
    limit = settings.bemsoft_extid_max
    requisition_id = items[0].requisition_id
    problems: list[str] = []

    batch_id = _fit(
        batch_external_id(requisition_id, seq), _compact("s", requisition_id, seq), limit
    )
    order_id = _fit(
        order_external_id(requisition_id, seq), _compact("o", requisition_id, seq), limit
    )
    if batch_id is None or order_id is None:
        problems.append(
            f"identificador do lote/pedido ({_compact('s', requisition_id, seq)}) passa do "
            f"limite BEMSOFT_EXTID_MAX={limit} caracteres; aumente BEMSOFT_EXTID_MAX no .env"
        )

    patient, patient_problems = _patient_problems(items, settings, _local_now(now, tz).date())
    problems.extend(patient_problems)

    physician: dict[str, str] | None = None
    doctor = settings.physician
    if doctor is not None:
        if len(doctor["number"]) > limit:
            problems.append(
                f"PHYSICIAN_NUMBER tem {len(doctor['number'])} caracteres, acima de "
                f"BEMSOFT_EXTID_MAX={limit}; corrija PHYSICIAN_NUMBER ou aumente "
                "BEMSOFT_EXTID_MAX no .env"
            )
        physician = {
            "externalId": doctor["number"],
            "name": doctor["name"],
            "councilAbbreviation": doctor["council"],
            "councilNumber": doctor["number"],
            "councilUf": doctor["uf"],
        }

    if problems or batch_id is None or order_id is None:
        return problems
    return _Header(
        batch_id=batch_id,
        order_id=order_id,
        order_at=_order_moment(items, tz, now),
        patient=patient,
        physician=physician,
    )


# --- item-level part ----------------------------------------------------------------------------


class _ItemRefused(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, reason: str, kind: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.retryable = reason, kind, retryable


def _label(item: LisItem, code: str | None) -> str:
    description = _clean(item.description) or _clean(item.exam_description)
    if description and code:
        return f"{description} ({code})"
    if description:
        return description
    if code:
        return f"código {code}"
    return f"item {item.item_id}"


def _information(item: LisItem) -> list[dict[str, str]]:
    pairs = (
        ("origem", _clean(item.origin) or "Sistema"),
        ("descricao", _clean(item.description) or _clean(item.exam_description)),
    )
    return [{"key": key, "value": value} for key, value in pairs if value]


def _test(
    item: LisItem, header: _Header, resolver: Resolver, settings: Settings
) -> tuple[dict[str, Any], dt.datetime]:
    limit = settings.bemsoft_extid_max
    external_id = _fit(f"item-{item.item_id}", _compact("i", item.item_id), limit)
    if external_id is None:
        raise _ItemRefused(
            f"identificador do item (i{item.item_id}) passa do limite BEMSOFT_EXTID_MAX={limit}"
            " caracteres; aumente BEMSOFT_EXTID_MAX no .env",
            "extid",
        )
    resolution = resolver.resolve(item)
    if resolution.status != "ok" or not resolution.test_id or not resolution.specimen_id:
        raise _ItemRefused(
            resolution.refusal or "exame não resolvido", resolution.status, resolution.retryable
        )
    collected = _as_datetime(item.item_entered_at, settings.lab_tz) or header.order_at
    test = {
        "externalId": external_id,
        "collectionDate": _d(collected),
        "collectionTime": _t(collected),
        "supportTestId": resolution.test_id,
        "supportSpecimenId": resolution.specimen_id,
        "additionalInformations": _information(item),
        "condition": "",
        "preservative": "",
        "diuresisVolume": 0,
        "diuresisTime": 0,
    }
    return test, collected


# --- entry point -------------------------------------------------------------------------------


def build_orders(
    items: Sequence[LisItem],
    *,
    settings: Settings,
    resolver: Resolver,
    first_seq: int,
    now: dt.datetime,
) -> TransformResult:
    """Turn one requisition's pending items into one Bemsoft order and per-item refusals.

    Never raises: bad data and unexpected errors become :class:`Refusal` records in
    Portuguese. Fallbacks, in order:

    - Items are sorted by ``CodItemSol``; requisition/patient columns use the first
      non-blank value among the rows.
    - externalIds: ``sol-<req>``/``order-<req>`` (``-<seq>`` appended when seq > 1),
      ``item-<CodItemSol>``, ``pat-<codpaciente>`` or, without codpaciente, ``cpf-<11
      digits>`` (punctuation removed; all-equal digits are a placeholder, not a CPF).
      Any id longer than BEMSOFT_EXTID_MAX uses its compact form (``s<req>``, ``o<req>``,
      ``i<id>``, ``p<id>``, ``c<cpf>``, with ``-<seq>``); still too long -> refused.
      The physician's externalId is PHYSICIAN_NUMBER (refused when longer than the limit).
    - Order date/time: ``solicitacao.dtaentrada`` + ``Hora`` ('8:00', '08:00', '08:00:00',
      '8h00'); Hora empty/junk -> the time part of dtaentrada, or, when it has none (00:00),
      the earliest ``ItemSol.DataEntrada`` of that same day, else 00:00:00; dtaentrada NULL
      -> the earliest ``ItemSol.DataEntrada``; none -> ``now`` in LAB_UTC_OFFSET.
      Timezone-aware values are converted to LAB_UTC_OFFSET; naive ones are lab time.
    - Test collection date/time: ``ItemSol.DataEntrada``, else the order's date/time.
    - Batch date/time: the order's, unless a test is collected on a later day; then the
      latest collection date/time (Bemsoft drops tests collected after the batch date).
    - Gender: M/F/Masculino/Feminino/Masc/Fem in any case or spacing; otherwise
      DEFAULT_GENDER; otherwise every item is refused.
    - Birth date: ``paciente.datanasc`` unless NULL, on/before 1900-01-01 or in the future;
      otherwise DEFAULT_BIRTHDATE; otherwise every item is refused.
    - Patient name: whitespace collapsed; empty -> every item is refused.
    - Physician: sent only when the four PHYSICIAN_* settings are filled.
    - additionalInformations: ``origem`` = ItemSol.Origem or 'Sistema'; ``descricao`` =
      DescExames (else texame.descricao); empty values are left out.
    - An item the catalogue cannot resolve is refused alone; the other items still go.
    """
    if not items:
        return TransformResult()
    ordered = sorted(
        {item.item_id: item for item in reversed(items)}.values(), key=lambda item: item.item_id
    )
    requisition_id = ordered[0].requisition_id
    refusals: list[Refusal] = []
    mine: list[LisItem] = []
    for item in ordered:
        if item.requisition_id == requisition_id:
            mine.append(item)
        else:
            refusals.append(
                Refusal(
                    item.item_id,
                    f"erro interno: item da solicitação {item.requisition_id} entregue junto com a "
                    f"solicitação {requisition_id}; informe o suporte",
                    kind="internal",
                    retryable=True,
                )
            )

    try:
        header = _header(mine, settings, first_seq, now)
    except Exception as exc:
        reason = (
            f"solicitação {requisition_id}: erro inesperado ao montar o pedido ({exc!r}); "
            "informe o suporte"
        )
        refusals.extend(Refusal(i.item_id, reason, kind="internal") for i in mine)
        return TransformResult(refusals=refusals)
    if isinstance(header, list):
        reason = f"solicitação {requisition_id}: " + "; ".join(header)
        kind = "extid" if all("BEMSOFT_EXTID_MAX" in p for p in header) else "patient"
        refusals.extend(Refusal(i.item_id, reason, kind=kind) for i in mine)
        return TransformResult(refusals=refusals)

    tests: list[dict[str, Any]] = []
    collected_at: list[dt.datetime] = []
    accepted: list[int] = []
    for item in mine:
        code: str | None = None
        try:
            code = resolver.local_code(item)
            test, collected = _test(item, header, resolver, settings)
        except _ItemRefused as refused:
            refusals.append(
                Refusal(
                    item.item_id,
                    f"{_label(item, code)}: {refused.reason}",
                    kind=refused.kind,
                    retryable=refused.retryable,
                )
            )
            continue
        except Exception as exc:
            refusals.append(
                Refusal(
                    item.item_id,
                    f"{_label(item, code)}: erro inesperado ao montar o item ({exc!r}); informe o "
                    "suporte",
                    kind="internal",
                )
            )
            continue
        tests.append(test)
        collected_at.append(collected)
        accepted.append(item.item_id)

    if not tests:
        return TransformResult(refusals=refusals)

    order_at = header.order_at
    latest = max(collected_at)
    batch_at = latest if latest.date() > order_at.date() else order_at
    order: dict[str, Any] = {
        "externalId": header.order_id,
        "date": _d(order_at),
        "time": _t(order_at),
        "patientHeight": 0,
        "patientWeight": 0,
        "patient": header.patient,
    }
    if header.physician is not None:
        order["physician"] = header.physician
    order["tests"] = tests
    payload = {
        "batch": {
            "externalId": header.batch_id,
            "date": _d(batch_at),
            "time": _t(batch_at),
            "order": order,
        }
    }
    draft = OrderDraft(
        requisition_id=requisition_id, seq=first_seq, item_ids=tuple(accepted), payload=payload
    )
    return TransformResult(orders=[draft], refusals=refusals)
