"""Read-only SQLAlchemy Core queries on the LIS tables; nothing else touches them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import GenericFunction

from .models import LisItem

if TYPE_CHECKING:
    from typing_extensions import Unpack

    AnySelect: TypeAlias = sa.Select[Unpack[tuple[Any, ...]]]


@dataclass(frozen=True)
class LisTables:
    """The four LIS tables, bound to a schema (``dbo`` on SQL Server, none elsewhere)."""

    item: sa.Table
    requisition: sa.Table
    patient: sa.Table
    exam: sa.Table


def lis_tables(schema: str | None = None) -> LisTables:
    """Describe the LIS tables with their exact (quoted) column names."""
    md = sa.MetaData(schema=schema)
    item = sa.Table(
        "ItemSol", md,
        sa.Column("CodItemSol", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("CodSolicitacao", sa.Integer, nullable=False, index=True),
        sa.Column("CodTExame", sa.Integer),
        sa.Column("DataEntrada", sa.DateTime),
        sa.Column("DescExames", sa.String(100)),
        sa.Column("CodConvExames", sa.String(20)),
        sa.Column("NomeTerceirizado", sa.String(80)),
        sa.Column("Valor", sa.Numeric(19, 4)),
        sa.Column("VlTerceirizado", sa.Numeric(19, 4)),
        sa.Column("SituacaoResultado", sa.String(20)),
        sa.Column("Origem", sa.String(20)),
    )
    requisition = sa.Table(
        "solicitacao", md,
        sa.Column("codsolicitacao", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("codpaciente", sa.Integer),
        sa.Column("CodConvenio", sa.Integer),
        sa.Column("dtaentrada", sa.DateTime),
        sa.Column("Hora", sa.String(8)),
        sa.Column("Valortotal", sa.Numeric(19, 4)),
        sa.Column("TipoPgto", sa.String(20)),
        sa.Column("Obs_Sol", sa.Text),
    )
    patient = sa.Table(
        "paciente", md,
        sa.Column("codpaciente", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("nome", sa.String(100)),
        sa.Column("cpf", sa.String(14)),
        sa.Column("datanasc", sa.DateTime),
        sa.Column("sexo", sa.String(10)),
        sa.Column("fone", sa.String(20)),
        sa.Column("EmailPac", sa.String(100)),
        sa.Column("cidade", sa.String(60)),
        sa.Column("uf", sa.String(2)),
    )
    exam = sa.Table(
        "texame", md,
        sa.Column("CodTexame", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("CodigoExame", sa.String(20)),
        sa.Column("descricao", sa.String(100)),
    )
    return LisTables(item=item, requisition=requisition, patient=patient, exam=exam)


class lab_key(GenericFunction[str]):  # noqa: N801 - SQL function naming
    """UPPER(RTRIM(x)) that upper-cases accented letters on every backend.

    SQLite's built-in UPPER() only knows ASCII, so 'diagnóstico' would not match
    'DIAGNÓSTICO'; there the expression calls a Python function registered by
    :func:`install_sqlite_functions`.
    """

    type = sa.String()
    inherit_cache = True
    name = "lab_key"


@compiles(lab_key)
def _lab_key_default(element: lab_key, compiler: object, **kw: object) -> str:
    return f"UPPER(RTRIM({compiler.process(element.clauses, **kw)}))"  # type: ignore[attr-defined]


@compiles(lab_key, "sqlite")
def _lab_key_sqlite(element: lab_key, compiler: object, **kw: object) -> str:
    return f"bm_lab_key({compiler.process(element.clauses, **kw)})"  # type: ignore[attr-defined]


def _py_lab_key(value: object) -> str | None:
    return None if value is None else str(value).rstrip().upper()


def install_sqlite_functions(engine: sa.Engine) -> None:
    """Register ``bm_lab_key`` on every new SQLite connection of ``engine``."""
    if engine.dialect.name != "sqlite":
        return

    @sa.event.listens_for(engine, "connect")
    def _register(dbapi_conn: object, _record: object) -> None:
        dbapi_conn.create_function(  # type: ignore[attr-defined]
            "bm_lab_key", 1, _py_lab_key, deterministic=True)


def normalize_lab_name(name: str | None) -> str:
    """Compare support-lab names as SQL Server's CI collation does: case and trailing spaces."""
    return (name or "").strip().casefold()


class LisSource:
    """The monitor's view of the LIS: new items, one requisition, gap checks."""

    def __init__(self, *, tables: LisTables, support_labs: Sequence[str]) -> None:
        self.t = tables
        self.support_labs = tuple(support_labs)
        self._wanted = frozenset(normalize_lab_name(n) for n in support_labs)
        # Bound IN-list of the configured names (trimmed, upper-cased) compared with
        # UPPER(RTRIM(NomeTerceirizado)), so SQLite and PostgreSQL filter like SQL Server's
        # default collation (case-insensitive, trailing spaces ignored).
        self._lab_params = sorted({n.strip().upper() for n in support_labs})

    # --- query builders (also compiled with the mssql dialect in tests) ------------------
    def _columns(self) -> list[sa.ColumnElement[object]]:
        i, s, p, e = self.t.item, self.t.requisition, self.t.patient, self.t.exam
        return [
            i.c.CodItemSol, i.c.CodSolicitacao, i.c.CodTExame, i.c.DataEntrada, i.c.DescExames,
            i.c.CodConvExames, i.c.NomeTerceirizado, i.c.Origem,
            s.c.dtaentrada, s.c.Hora, s.c.codpaciente,
            p.c.nome, p.c.cpf, p.c.datanasc, p.c.sexo,
            e.c.CodigoExame, e.c.descricao,
        ]

    def _joined(self) -> sa.FromClause:
        i, s, p, e = self.t.item, self.t.requisition, self.t.patient, self.t.exam
        return (
            i.join(s, s.c.codsolicitacao == i.c.CodSolicitacao)
            .outerjoin(p, p.c.codpaciente == s.c.codpaciente)
            .outerjoin(e, e.c.CodTexame == i.c.CodTExame)
        )

    def _lab_filter(self) -> sa.ColumnElement[bool]:
        col = lab_key(self.t.item.c.NomeTerceirizado)
        return col.in_(sa.bindparam("labs", self._lab_params, expanding=True))

    def visible_ids_query(
        self, *, after_id: int, gaps: Sequence[tuple[int, int]] = (), limit: int
    ) -> AnySelect:
        """Ids visible now above the checkpoint and inside open gaps, ascending, every lab.

        Read from the CodItemSol index only; the lower bound lets the index seek straight
        to the oldest open gap instead of walking the table.
        """
        i = self.t.item
        col = i.c.CodItemSol
        where: sa.ColumnElement[bool] = col > after_id
        if gaps:
            where = sa.and_(col >= min(lo for lo, _hi in gaps),
                            sa.or_(where, *(col.between(lo, hi) for lo, hi in gaps)))
        return sa.select(col).where(where).order_by(col).limit(limit)

    def new_items_query(
        self, *, ranges: Sequence[tuple[int, int]], limit: int | None = None
    ) -> AnySelect:
        """Items of the configured labs with ids inside ``ranges`` (inclusive), oldest first."""
        i = self.t.item
        col = i.c.CodItemSol
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        where: sa.ColumnElement[bool] = col.between(lo, hi)
        if len(ranges) > 1:
            where = sa.and_(where, sa.or_(*(col.between(a, b) for a, b in ranges)))
        query = (
            sa.select(*self._columns())
            .select_from(self._joined())
            .where(where, self._lab_filter())
            .order_by(col)
        )
        return query if limit is None else query.limit(limit)

    def requisition_query(self, requisition_id: int) -> AnySelect:
        """Every current item of one requisition for the configured support labs."""
        i = self.t.item
        return (
            sa.select(*self._columns())
            .select_from(self._joined())
            .where(i.c.CodSolicitacao == requisition_id, self._lab_filter())
            .order_by(i.c.CodItemSol)
        )

    def requisitions_query(self, requisition_ids: Sequence[int]) -> AnySelect:
        """Every current item of several requisitions (one round trip for a settle chunk)."""
        i = self.t.item
        return (
            sa.select(*self._columns())
            .select_from(self._joined())
            .where(i.c.CodSolicitacao.in_(sa.bindparam("reqs", list(requisition_ids),
                                                        expanding=True)),
                   self._lab_filter())
            .order_by(i.c.CodItemSol)
        )

    def max_id_query(self) -> AnySelect:
        """Highest CodItemSol in the LIS (for INITIAL_ITEM_ID=max)."""
        return sa.select(sa.func.max(self.t.item.c.CodItemSol))

    # --- execution ---------------------------------------------------------------------
    def visible_ids(
        self, conn: Connection, *, after_id: int, gaps: Sequence[tuple[int, int]] = (),
        limit: int,
    ) -> list[int]:
        """Run :meth:`visible_ids_query`."""
        query = self.visible_ids_query(after_id=after_id, gaps=gaps, limit=limit)
        return [int(x) for x in conn.execute(query).scalars()]

    def fetch_items(self, conn: Connection, ranges: Sequence[tuple[int, int]], *,
                    limit: int | None = None) -> list[LisItem]:
        """Run :meth:`new_items_query` and keep only the configured labs (Python check too)."""
        if not ranges:
            return []
        rows = conn.execute(self.new_items_query(ranges=ranges, limit=limit))
        return [item for item in map(_to_item, rows) if self._wants(item)]

    def fetch_requisition(self, conn: Connection, requisition_id: int) -> list[LisItem]:
        """Current items of one requisition."""
        rows = conn.execute(self.requisition_query(requisition_id))
        return [item for item in map(_to_item, rows) if self._wants(item)]

    def fetch_requisitions(
        self, conn: Connection, requisition_ids: Sequence[int]
    ) -> dict[int, list[LisItem]]:
        """Current items of several requisitions, by requisition (absent: no items left)."""
        out: dict[int, list[LisItem]] = {}
        ids = list(requisition_ids)
        # Bounded IN lists: SQL Server accepts at most 2100 parameters per statement.
        for start in range(0, len(ids), 500):
            rows = conn.execute(self.requisitions_query(ids[start:start + 500]))
            for item in map(_to_item, rows):
                if self._wants(item):
                    out.setdefault(item.requisition_id, []).append(item)
        return out

    def max_item_id(self, conn: Connection) -> int:
        """Highest CodItemSol, 0 for an empty table."""
        return int(conn.execute(self.max_id_query()).scalar() or 0)

    def _wants(self, item: LisItem) -> bool:
        return normalize_lab_name(item.support_lab) in self._wanted

    # --- exam codes in use (``mapping check``) -------------------------------------------
    def distinct_codes_query(
        self, since: dt.datetime | None, *, code_source: str = "convexames"
    ) -> AnySelect:
        """Local exam codes of the configured labs, one row per UPPER(trimmed) code.

        ``code_source`` is TEST_CODE_SOURCE (``convexames`` or ``codigoexame``). An item
        counts from ``since`` on by ``ItemSol.DataEntrada``; without it, by its
        requisition's ``dtaentrada``; items with neither date are always counted (they
        cannot be placed in time and the monitor would still meet them). Each row carries
        the lowest ``CodItemSol`` of its group and that item's code and descriptions.
        """
        i, s, e = self.t.item, self.t.requisition, self.t.exam
        raw = e.c.CodigoExame if code_source == "codigoexame" else i.c.CodConvExames
        # LTRIM(RTRIM()) rather than TRIM(): SQL Server has TRIM only from 2017 on.
        key = sa.func.upper(sa.func.ltrim(sa.func.rtrim(raw)))
        where: list[sa.ColumnElement[bool]] = [self._lab_filter()]
        if since is not None:
            start = sa.bindparam("since", since, type_=sa.DateTime())
            # Written as ORs rather than COALESCE() so an index on DataEntrada stays usable.
            where.append(sa.or_(
                i.c.DataEntrada >= start,
                sa.and_(i.c.DataEntrada.is_(None),
                        sa.or_(s.c.dtaentrada >= start, s.c.dtaentrada.is_(None))),
            ))
        codes = (
            sa.select(
                key.label("code_key"),
                sa.func.count().label("n_items"),
                sa.func.count(sa.distinct(i.c.CodSolicitacao)).label("n_requisitions"),
                sa.func.min(i.c.CodItemSol).label("sample_item_id"),
                sa.func.max(sa.func.coalesce(i.c.DataEntrada, s.c.dtaentrada)).label("last_seen"),
            )
            .select_from(
                i.join(s, s.c.codsolicitacao == i.c.CodSolicitacao)
                .outerjoin(e, e.c.CodTexame == i.c.CodTExame)
            )
            .where(*where)
            .group_by(key)
            .subquery("codes")
        )
        sample = i.alias("sample_item")
        sample_exam = e.alias("sample_exam")
        # Outer joins: a sample item deleted meanwhile must not hide its whole group.
        return (
            sa.select(
                codes.c.code_key, codes.c.n_items, codes.c.n_requisitions,
                codes.c.sample_item_id, codes.c.last_seen,
                sample.c.CodConvExames, sample.c.CodTExame, sample.c.DescExames,
                sample_exam.c.CodigoExame, sample_exam.c.descricao,
            )
            .select_from(
                codes.outerjoin(sample, sample.c.CodItemSol == codes.c.sample_item_id)
                .outerjoin(sample_exam, sample_exam.c.CodTexame == sample.c.CodTExame)
            )
            .order_by(codes.c.n_items.desc(), codes.c.code_key)
        )

    def fetch_distinct_codes(
        self, conn: Connection, since: dt.datetime | None, *, code_source: str = "convexames"
    ) -> list[dict[str, object]]:
        """Run :meth:`distinct_codes_query`; plain values per row.

        Keys: ``code_key`` (UPPER trimmed code, None when NULL), ``items``, ``requisitions``,
        ``sample_item_id``, ``last_seen``, ``sample_code`` (the sample item's code as
        written), ``exam_type_id``, ``description`` (DescExames), ``exam_description``.
        """
        rows = conn.execute(self.distinct_codes_query(since, code_source=code_source))
        out: list[dict[str, object]] = []
        for row in rows:
            m = row._mapping
            sample_code = m["CodigoExame"] if code_source == "codigoexame" else m["CodConvExames"]
            out.append({
                "code_key": _str(m["code_key"]),
                "items": int(m["n_items"] or 0),
                "requisitions": int(m["n_requisitions"] or 0),
                "sample_item_id": _int(m["sample_item_id"]),
                "last_seen": _dt(m["last_seen"]),
                "sample_code": _str(sample_code),
                "exam_type_id": _int(m["CodTExame"]),
                "description": _str(m["DescExames"]),
                "exam_description": _str(m["descricao"]),
            })
        return out


def _to_item(row: Row[tuple[object, ...]]) -> LisItem:
    m = row._mapping
    return LisItem(
        item_id=int(m["CodItemSol"]),
        requisition_id=int(m["CodSolicitacao"]),
        exam_type_id=_int(m["CodTExame"]),
        item_entered_at=_dt(m["DataEntrada"]),
        description=_str(m["DescExames"]),
        conv_code=_str(m["CodConvExames"]),
        support_lab=_str(m["NomeTerceirizado"]),
        origin=_str(m["Origem"]),
        requisition_date=_dt(m["dtaentrada"]),
        requisition_time=_str(m["Hora"]),
        patient_id=_int(m["codpaciente"]),
        patient_name=_str(m["nome"]),
        patient_cpf=_str(m["cpf"]),
        patient_birth=_dt(m["datanasc"]),
        patient_sex=_str(m["sexo"]),
        exam_code=_str(m["CodigoExame"]),
        exam_description=_str(m["descricao"]),
    )


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("cp1252", errors="replace")
    return str(value)


def _dt(value: object) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    return None
