"""``mapping check`` building blocks: merging LIS codes, resolution per code, the CSV report."""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path

import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from bemsoft_monitor.catalog import Catalog, Resolver
from bemsoft_monitor.mapping import (
    CSV_COLUMNS,
    CodeUsage,
    MapFiles,
    check_codes,
    count_by_status,
    has_problems,
    merge_code_rows,
    render_csv,
)
from bemsoft_monitor.models import CatalogEntry
from bemsoft_monitor.source import LisSource, install_sqlite_functions, lis_tables

from .conftest import LAB, Lis


def _catalog(n: int) -> Catalog:
    entries = []
    for i in range(n):
        entries.append(CatalogEntry(f"T{i:04d}", f"EXAME {i}", "SORO", "Soro"))
        if i % 4 == 0:
            entries.append(CatalogEntry(f"T{i:04d}", f"EXAME {i} URINA", "URINA", "Urina"))
    return Catalog(entries)


def _resolver(catalog: Catalog | None, **kw: object) -> Resolver:
    values: dict[str, object] = {"catalog": catalog, "test_map": {}, "material_map": {},
                                 "code_source": "convexames", "variant_policy": "refuse",
                                 "dry_run": False}
    values.update(kw)
    return Resolver(**values)  # type: ignore[arg-type]


def test_codes_differing_only_in_case_and_spaces_are_one_line() -> None:
    rows = [
        {"sample_code": " gli ", "code_key": "GLI", "items": 2, "requisitions": 2,
         "sample_item_id": 30, "description": "GLICOSE"},
        {"sample_code": "GLI", "code_key": "GLI", "items": 3, "requisitions": 1,
         "sample_item_id": 10, "description": "GLICOSE JEJUM"},
        {"sample_code": None, "code_key": None, "items": 1, "sample_item_id": 5},
        {"sample_code": "  ", "code_key": "", "items": 1, "sample_item_id": 7},
    ]
    merged = {u.key: u for u in merge_code_rows(rows)}
    assert set(merged) == {"gli", ""}
    assert merged["gli"].items == 5
    assert merged["gli"].sample_item_id == 10
    assert merged["gli"].description == "GLICOSE JEJUM"
    assert merged[""].code is None and merged[""].items == 2


def test_every_status_of_a_large_catalogue_is_reported_with_a_fix(tmp_path: Path) -> None:
    catalog = _catalog(4000)
    resolver = _resolver(catalog, test_map={"local7": "T0007"},
                         material_map={"t0008": "urina"})
    usages = [CodeUsage(code=f"T{i:04d}", items=1, sample_item_id=i) for i in range(1, 4000, 3)]
    usages += [CodeUsage(code="LOCAL7", items=2, sample_item_id=9001),
               CodeUsage(code="NAOEXISTE", items=1, sample_item_id=9002),
               CodeUsage(code=None, items=1, sample_item_id=9003)]
    files = MapFiles(test_map=tmp_path / "map.json", material_map=tmp_path / "mat.csv")
    reports = {r.usage.code: r for r in check_codes(usages, resolver, files=files)}
    assert len(reports) == len(usages)
    assert reports["LOCAL7"].ok and reports["LOCAL7"].from_map
    assert reports["LOCAL7"].support_id == "T0007"
    assert reports["T0004"].status == "ambiguous"
    assert "URINA" in reports["T0004"].detail + reports["T0004"].fix
    assert "mat.csv" in reports["T0004"].fix
    assert reports["NAOEXISTE"].status == "not_in_catalog"
    assert "map.json" in reports["NAOEXISTE"].fix
    assert reports[None].status == "missing_code"
    counts = count_by_status(reports.values())
    ambiguous = sum(1 for i in range(1, 4000, 3) if i % 4 == 0)
    assert counts["ambiguous"] == ambiguous
    assert counts["ok"] == len(usages) - ambiguous - 2
    assert has_problems(reports.values())


def test_without_catalogue_every_code_is_reported_as_such() -> None:
    reports = check_codes([CodeUsage(code="FE", items=1)], _resolver(None), files=MapFiles())
    assert reports[0].status == "no_catalog"
    assert reports[0].fix


@given(st.text(min_size=1, max_size=30))
def test_csv_cells_never_start_a_formula_and_round_trip(description: str) -> None:
    usage = CodeUsage(code="FE", items=1, sample_item_id=1, description=description)
    reports = check_codes([usage], _resolver(Catalog([CatalogEntry("FE", "FERRO", "SORO",
                                                                   "Soro")])),
                          files=MapFiles())
    rows = list(csv.reader(io.StringIO(render_csv(reports)), delimiter=";"))
    assert tuple(rows[0]) == CSV_COLUMNS
    cell = rows[1][1]
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    expected = ("'" + description) if description.startswith(
        ("=", "+", "-", "@", "\t", "\r")) else description
    assert cell == expected


def test_distinct_codes_query_reads_only_configured_labs_and_the_period(tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    lis.item(1, " fe ")
    lis.item(1, "TSH", lab="OUTRO LAB")
    lis.item(1, "OLD", DataEntrada=dt.datetime(2020, 1, 1))
    engine = sa.create_engine(url)
    install_sqlite_functions(engine)
    source = LisSource(tables=lis_tables(None), support_labs=[LAB])
    with engine.connect() as conn:
        recent = merge_code_rows(source.fetch_distinct_codes(
            conn, dt.datetime(2026, 6, 1), code_source="convexames"))
        every = merge_code_rows(source.fetch_distinct_codes(conn, None,
                                                            code_source="convexames"))
    assert {u.key: u.items for u in recent} == {"fe": 2}
    assert {u.key for u in every} == {"fe", "old"}
    engine.dispose()
    lis.dispose()


def test_a_hint_matching_no_variant_is_a_problem_even_with_policy_first(tmp_path: Path) -> None:
    materials = tmp_path / "materiais.csv"
    resolver = _resolver(_catalog(8), variant_policy="first", material_map={"T0004": "Sangue"},
                         material_map_path=materials)
    reports = check_codes([CodeUsage(code="T0004", items=3), CodeUsage(code="T0000", items=1)],
                          resolver, files=MapFiles(material_map=materials))
    by_code = {r.usage.code: r for r in reports}
    assert by_code["T0004"].status == "ambiguous" and not by_code["T0004"].ok
    assert '"Sangue"' in by_code["T0004"].fix and str(materials) in by_code["T0004"].fix
    assert "SORO" in by_code["T0004"].fix and "URINA" in by_code["T0004"].fix
    assert has_problems(reports)
    # Without a hint, policy first still sends the first variant (and says so).
    assert by_code["T0000"].status == "ok" and "BEMSOFT_VARIANT_POLICY=first" in \
        by_code["T0000"].detail
