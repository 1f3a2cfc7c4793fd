"""Plain records passed between modules: LIS rows, catalogue entries, built orders."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LisItem:
    """One row of the source query (ItemSol ⋈ solicitacao ⋈ paciente ⋈ texame)."""

    item_id: int  # ItemSol.CodItemSol
    requisition_id: int  # ItemSol.CodSolicitacao
    exam_type_id: int | None = None  # ItemSol.CodTExame
    item_entered_at: dt.datetime | None = None  # ItemSol.DataEntrada
    description: str | None = None  # ItemSol.DescExames
    conv_code: str | None = None  # ItemSol.CodConvExames
    support_lab: str | None = None  # ItemSol.NomeTerceirizado
    origin: str | None = None  # ItemSol.Origem
    requisition_date: dt.datetime | None = None  # solicitacao.dtaentrada
    requisition_time: str | None = None  # solicitacao.Hora (raw text)
    patient_id: int | None = None  # solicitacao.codpaciente
    patient_name: str | None = None  # paciente.nome
    patient_cpf: str | None = None  # paciente.cpf
    patient_birth: dt.datetime | dt.date | None = None  # paciente.datanasc
    patient_sex: str | None = None  # paciente.sexo
    exam_code: str | None = None  # texame.CodigoExame
    exam_description: str | None = None  # texame.descricao

    def to_json(self) -> dict[str, Any]:
        """Return the row as JSON-ready data (dates as ISO text)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, (dt.date, dt.datetime)):
                value = value.isoformat()
            out[name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LisItem:
        """Rebuild a row written by :meth:`to_json`."""
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name not in data:
                continue
            value = data[name]
            if name in ("item_entered_at", "requisition_date", "patient_birth") and isinstance(
                value, str
            ):
                value = dt.datetime.fromisoformat(value)
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class CatalogEntry:
    """One line of Bemsoft's ``GET /tests``: a test and one of its specimens."""

    test_id: str
    name: str
    specimen_id: str
    specimen_name: str


@dataclass(frozen=True)
class Refusal:
    """An item that cannot be sent, with the reason in Portuguese and how to fix it."""

    item_id: int
    reason: str
    # What went wrong: "patient", "extid", "missing_code", "not_in_catalog", "ambiguous",
    # "no_catalog", "internal" (see transform.build_orders).
    kind: str = "invalid"
    # True when the same item may succeed later without a person fixing anything
    # (e.g. the catalogue was not loaded yet): keep it pending instead of refusing it for good.
    retryable: bool = False


@dataclass(frozen=True)
class OrderDraft:
    """One POST /requests body ready to be stored in the outbox."""

    requisition_id: int
    seq: int  # 1 for the first order of a requisition, 2 for the next…
    item_ids: tuple[int, ...]
    payload: dict[str, Any]


@dataclass(frozen=True)
class TransformResult:
    """What the transform made of one requisition's pending items."""

    orders: list[OrderDraft] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
