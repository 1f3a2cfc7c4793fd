"""Mapping check: how each local exam code seen in the LIS resolves to a Bemsoft test.

Pure logic: rows from :meth:`LisSource.fetch_distinct_codes` plus a :class:`Resolver`
in, a report out (statuses, the fix for each problem, summary, CSV text). No I/O.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .catalog import Resolution, Resolver, normalize_code, normalize_material
from .deadletter import excel_safe
from .models import CatalogEntry, LisItem

__all__ = [
    "CSV_COLUMNS",
    "STATUS_LABELS",
    "CodeReport",
    "CodeUsage",
    "MapFiles",
    "check_codes",
    "count_by_status",
    "csv_row",
    "describe_entry",
    "explain_code",
    "explain_local_code",
    "has_problems",
    "merge_code_rows",
    "render_csv",
    "summary_line",
]

#: Portuguese label of each resolution status, in the order the summary lists them.
STATUS_LABELS: dict[str, str] = {
    "ok": "ok",
    "ambiguous": "ambíguo",
    "not_in_catalog": "fora do catálogo",
    "missing_code": "sem código",
    "no_catalog": "sem catálogo",
}
# Problems first (most work to fix first), then the ones that are fine.
_STATUS_RANK = {"missing_code": 0, "not_in_catalog": 1, "ambiguous": 2, "no_catalog": 3, "ok": 4}
_MAX_VARIANTS_SHOWN = 10
_MAX_HINTS = 3

CSV_COLUMNS = (
    "código",
    "descrição (exemplo)",
    "itens",
    "solicitações",
    "item de exemplo (CodItemSol)",
    "último registro",
    "supportTestId",
    "origem do supportTestId",
    "situação",
    "material (supportSpecimenId)",
    "detalhe",
    "correção",
)


@dataclass(frozen=True)
class CodeUsage:
    """One local exam code and the LIS items that carry it."""

    code: str | None  # trimmed, as written in the sample item; None when NULL or blank
    items: int
    requisitions: int = 0
    sample_item_id: int | None = None
    description: str | None = None  # ItemSol.DescExames of the sample item
    exam_description: str | None = None  # texame.descricao of the sample item
    exam_type_id: int | None = None  # ItemSol.CodTExame of the sample item
    last_seen: dt.datetime | None = None

    @property
    def key(self) -> str:
        """The code as every comparison sees it (trimmed, case-folded; '' when blank)."""
        return normalize_code(self.code)


@dataclass(frozen=True)
class MapFiles:
    """Where the map files are, only to name them in the fixes (None = not configured)."""

    test_map: Path | None = None
    material_map: Path | None = None


@dataclass(frozen=True)
class CodeReport:
    """A code's resolution with what to show and what to do."""

    usage: CodeUsage
    support_id: str | None  # the supportTestId looked up (None without a code)
    from_map: bool  # True when support_id came from BEMSOFT_TEST_MAP_PATH
    resolution: Resolution
    material: str  # chosen specimen, e.g. "PLASMA (Plasma fluoretado)"; '' unless ok
    detail: str  # variants, catalogue suggestions or a note
    fix: str  # what a person must do, in Portuguese; '' when nothing

    @property
    def status(self) -> str:
        """The resolver's status: ok, ambiguous, not_in_catalog, missing_code, no_catalog."""
        return self.resolution.status

    @property
    def ok(self) -> bool:
        """True when items with this code would be sent."""
        return self.resolution.ok


# --- rows from the LIS ---------------------------------------------------------------------


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def merge_code_rows(rows: Iterable[Mapping[str, object]]) -> list[CodeUsage]:
    """Merge the query's groups by :func:`normalize_code` (SQLite's UPPER() is ASCII-only).

    NULL and blank codes become one group with ``code=None``. The sample of a merged group
    is its lowest item id.
    """
    merged: dict[str, CodeUsage] = {}
    for row in rows:
        code = _text(row.get("sample_code")) or _text(row.get("code_key"))
        usage = CodeUsage(
            code=code,
            items=_int(row.get("items")),
            requisitions=_int(row.get("requisitions")),
            sample_item_id=_opt_int(row.get("sample_item_id")),
            description=_text(row.get("description")),
            exam_description=_text(row.get("exam_description")),
            exam_type_id=_opt_int(row.get("exam_type_id")),
            last_seen=_opt_dt(row.get("last_seen")),
        )
        before = merged.get(usage.key)
        merged[usage.key] = usage if before is None else _merge(before, usage)
    return list(merged.values())


def _merge(a: CodeUsage, b: CodeUsage) -> CodeUsage:
    first, other = (a, b) if _sample_order(a) <= _sample_order(b) else (b, a)
    seen = [t for t in (a.last_seen, b.last_seen) if t is not None]
    return CodeUsage(
        code=first.code or other.code,
        items=a.items + b.items,
        # Exact only when the groups share no requisition; an upper bound otherwise.
        requisitions=a.requisitions + b.requisitions,
        sample_item_id=first.sample_item_id,
        description=first.description or other.description,
        exam_description=first.exam_description or other.exam_description,
        exam_type_id=first.exam_type_id if first.sample_item_id else other.exam_type_id,
        last_seen=max(seen) if seen else None,
    )


def _sample_order(usage: CodeUsage) -> int:
    return usage.sample_item_id if usage.sample_item_id is not None else 2**63


def _int(value: object) -> int:
    return _opt_int(value) or 0


def _opt_int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number: int = int(value)  # type: ignore[call-overload]  # int, Decimal, text
    except (TypeError, ValueError, OverflowError):
        return None
    return number


def _opt_dt(value: object) -> dt.datetime | None:
    return value if isinstance(value, dt.datetime) else None


# --- resolution ------------------------------------------------------------------------------


def describe_entry(entry: CatalogEntry) -> str:
    """'PLASMA (Plasma fluoretado)', or just the specimen id without a name."""
    return f"{entry.specimen_id} ({entry.specimen_name})" if entry.specimen_name else (
        entry.specimen_id)


def _variants_text(variants: Sequence[CatalogEntry]) -> str:
    shown = [describe_entry(v) for v in variants[:_MAX_VARIANTS_SHOWN]]
    more = len(variants) - len(shown)
    return ", ".join(shown) + (f" e mais {more}" if more > 0 else "")


def _file(path: Path | None, setting: str) -> str:
    if path is None:
        return f"um arquivo novo indicado em {setting} no .env"
    return f"{path} ({setting})"


def _sample_item(usage: CodeUsage) -> LisItem:
    # The resolver reads the code from conv_code or exam_code depending on
    # TEST_CODE_SOURCE; both carry the same code here.
    return LisItem(
        item_id=usage.sample_item_id or 0,
        requisition_id=0,
        exam_type_id=usage.exam_type_id,
        description=usage.description,
        conv_code=usage.code,
        exam_code=usage.code,
        exam_description=usage.exam_description,
    )


def check_codes(
    usages: Iterable[CodeUsage], resolver: Resolver, *, files: MapFiles | None = None
) -> list[CodeReport]:
    """Resolve every code as the monitor would; problems first, then by number of items."""
    files = files or MapFiles()
    reports = [_check_one(u, resolver, files) for u in usages]
    reports.sort(key=lambda r: (_STATUS_RANK.get(r.status, 9), -r.usage.items, r.usage.key))
    return reports


def _check_one(usage: CodeUsage, resolver: Resolver, files: MapFiles) -> CodeReport:
    resolution = resolver.resolve(_sample_item(usage))
    code = usage.code
    mapped = resolver.test_map.get(usage.key) if code else None
    support_id = (mapped or code.upper()) if code else None
    material = detail = fix = ""
    status = resolution.status
    if status == "ok":
        chosen = next((v for v in resolution.variants
                       if v.specimen_id == resolution.specimen_id), None)
        material = describe_entry(chosen) if chosen else (resolution.specimen_id or "")
        if len(resolution.variants) > 1:
            hint = resolver.material_hint(code or "", support_id or "")
            if hint and chosen is not None and _matches(hint, chosen):
                detail = (f'escolhida pelo material "{hint}" do mapa de materiais entre '
                          f"{len(resolution.variants)} variantes")
            else:
                detail = (f"primeira de {len(resolution.variants)} variantes "
                          f"(BEMSOFT_VARIANT_POLICY=first): "
                          f"{_variants_text(resolution.variants)}")
    elif status == "missing_code":
        detail = "itens sem código local de exame"
        if resolver.code_source == "codigoexame":
            fix = ("preencha o CodigoExame no cadastro de exames do LIS (texame) ou use "
                   "TEST_CODE_SOURCE=convexames")
        else:
            fix = ("preencha o código do exame (ItemSol.CodConvExames) no LIS ou use "
                   "TEST_CODE_SOURCE=codigoexame")
    elif status == "not_in_catalog":
        detail = _suggestions(usage, resolver)
        where = _file(files.test_map, "BEMSOFT_TEST_MAP_PATH")
        if mapped:
            fix = (f'o mapa aponta {code} para "{mapped}", que não existe no catálogo; corrija '
                   f'a linha "{code}": "<id na Bemsoft>" em {where}')
        else:
            fix = f'acrescente "{code}": "<id na Bemsoft>" em {where}'
        fix += "; se o exame é novo na Bemsoft, rode 'bemsoft-monitor catalog sync'"
    elif status == "ambiguous":
        detail = f"{len(resolution.variants)} variantes: {_variants_text(resolution.variants)}"
        hint = resolver.material_hint(code or "", support_id or "")
        where = _file(files.material_map, "BEMSOFT_MATERIAL_MAP_PATH")
        options = ", ".join(v.specimen_id for v in resolution.variants[:_MAX_VARIANTS_SHOWN])
        if hint:
            fix = (f'o material "{hint}" indicado para {code} em {where} não corresponde a uma '
                   f"única variante; use um destes: {options}")
        else:
            first = resolution.variants[0].specimen_id if resolution.variants else "<material>"
            path = files.material_map
            line = (f'"{code}": "{first}"' if path is not None and path.suffix.lower() == ".json"
                    else f"{code};{first}")
            fix = (f"acrescente {line} (com o material certo) em {where}; "
                   f"materiais possíveis: {options}")
    else:  # no_catalog
        detail = "catálogo /tests da Bemsoft não carregado"
        fix = ("rode 'bemsoft-monitor catalog sync' (confira BEMSOFT_TOKEN, BEMSOFT_BASE_URL e "
               "BEMSOFT_TESTS_ENDPOINT)")
    return CodeReport(usage=usage, support_id=support_id, from_map=bool(mapped),
                      resolution=resolution, material=material, detail=detail, fix=fix)


def _matches(hint: str, entry: CatalogEntry) -> bool:
    """The resolver's rule: the hint names the specimen by id or by name."""
    wanted_id, wanted_name = normalize_code(hint), normalize_material(hint)
    return (normalize_code(entry.specimen_id) == wanted_id
            or normalize_material(entry.specimen_id) == wanted_name
            or (bool(entry.specimen_name)
                and normalize_material(entry.specimen_name) == wanted_name))


def _suggestions(usage: CodeUsage, resolver: Resolver) -> str:
    catalog = resolver.catalog
    if catalog is None:
        return ""
    for text in (usage.description, usage.exam_description):
        if text:
            hints = catalog.search(text, limit=_MAX_HINTS)
            if hints:
                names = ", ".join(dict.fromkeys(f"{h.test_id} ({h.name})" for h in hints))
                return f"parecidos no catálogo: {names}"
    return ""


def explain_code(code: str, resolver: Resolver) -> tuple[str, Resolution]:
    """How a local code would be sent: the one-line explanation and the resolution itself."""
    shown = code.strip()
    resolution = resolver.resolve(LisItem(item_id=0, requisition_id=0, conv_code=shown,
                                          exam_code=shown))
    if not shown:
        return f"código local vazio → recusado: {resolution.refusal}", resolution
    mapped = resolver.test_map.get(normalize_code(shown))
    support = mapped or shown.upper()
    origin = " (pelo mapa BEMSOFT_TEST_MAP_PATH)" if mapped else ""
    head = f"código local {shown} → supportTestId {support}{origin}"
    if resolution.ok:
        chosen = next((v for v in resolution.variants
                       if v.specimen_id == resolution.specimen_id), None)
        material = describe_entry(chosen) if chosen else resolution.specimen_id
        return f"{head} → material {material}", resolution
    return f"{head} → recusado: {resolution.refusal}", resolution


def explain_local_code(code: str, resolver: Resolver) -> str:
    """One line: 'código local X → supportTestId Y → material Z', or the refusal reason."""
    return explain_code(code, resolver)[0]


# --- summary and export ----------------------------------------------------------------------


def count_by_status(reports: Iterable[CodeReport]) -> dict[str, int]:
    """Number of codes per status, every status present (in STATUS_LABELS order)."""
    counts = dict.fromkeys(STATUS_LABELS, 0)
    for report in reports:
        counts[report.status] = counts.get(report.status, 0) + 1
    return counts


def has_problems(reports: Iterable[CodeReport]) -> bool:
    """True when some code would not be sent as it is."""
    return any(not r.ok for r in reports)


def summary_line(reports: Sequence[CodeReport]) -> str:
    """'6 códigos, 9 itens — ok: 2, ambíguo: 1, ...' (statuses with zero codes omitted)."""
    counts = count_by_status(reports)
    items = sum(r.usage.items for r in reports)
    parts = [f"{STATUS_LABELS[s]}: {n}" for s, n in counts.items() if n or s == "ok"]
    return (f"{len(reports)} código(s), {items} item(ns) — " + ", ".join(parts))


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%d/%m/%Y %H:%M") if value else ""


def csv_row(report: CodeReport) -> list[str]:
    """One report line in :data:`CSV_COLUMNS` order."""
    u = report.usage
    origin = "" if report.support_id is None else (
        "mapa de exames" if report.from_map else "o próprio código local")
    return [excel_safe(v) for v in (
        u.code or "(sem código)",
        u.description or u.exam_description or "",
        u.items,
        u.requisitions,
        u.sample_item_id if u.sample_item_id is not None else "",
        _when(u.last_seen),
        report.support_id or "",
        origin,
        STATUS_LABELS.get(report.status, report.status),
        report.material,
        report.detail,
        report.fix,
    )]


def render_csv(reports: Iterable[CodeReport]) -> str:
    """The report as CSV text with ';' (Excel in pt-BR); the caller adds the UTF-8 BOM."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for report in reports:
        writer.writerow(csv_row(report))
    return buffer.getvalue()
