"""TEST_CODE_SOURCE=codigoexame end to end: texame.CodigoExame, the JSON map first, mapping check.

Runs on a SQLite file and on the PostgreSQL server (``db_url``), the monitor against the
simulator on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from bemsoft_monitor.catalog import Catalog, Resolver, load_test_map, parse_catalog
from bemsoft_monitor.mapping import check_codes, merge_code_rows
from bemsoft_monitor.simulator import Simulator, load_catalog_sample
from bemsoft_monitor.source import LisSource, install_sqlite_functions, lis_tables

from .conftest import LAB, FakeClock, Lis, drive, make_monitor, make_settings


def _seed(lis: Lis) -> dict[str, int]:
    with lis.engine.begin() as conn:
        conn.execute(sa.insert(lis.t.exam), [
            {"CodTexame": 1, "CodigoExame": "fe ", "descricao": "FERRO SERICO"},
            {"CodTexame": 2, "CodigoExame": " Tsh", "descricao": "TSH"},
            {"CodTexame": 3, "CodigoExame": None, "descricao": "EXAME SEM CODIGO"},
        ])
    lis.patient()
    lis.requisition(1)
    # CodConvExames holds codes Bemsoft does not know: with codigoexame they must not matter.
    return {
        "fe": lis.item(1, "CONV-1", CodTExame=1),
        "tsh": lis.item(1, "CONV-2", CodTExame=2),
        "blank": lis.item(1, "FE", CodTExame=3),
        "no_exam": lis.item(1, "FE", CodTExame=None),
    }


def test_codigoexame_resolves_through_the_map_first_and_refuses_blanks_alone(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    ids = _seed(lis)
    test_map = tmp_path / "tests_map.json"
    test_map.write_text(json.dumps({"TSH ": "T4L"}), encoding="utf-8")
    settings = make_settings(db_url, tmp_path, sim, test_code_source="codigoexame",
                             bemsoft_test_map_path=test_map)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    sent = sorted(t["support_test_id"] for t in sim.saved_tests())
    assert sent == ["FE", "T4L"]  # the map wins over the code itself
    refused = {r.item_id: r.reason or "" for r in parts.store.items_by_state("refused")}
    assert set(refused) == {ids["blank"], ids["no_exam"]}
    assert all("texame.CodigoExame vazia" in reason for reason in refused.values())
    assert "ItemSol.CodTExame também vazio" in refused[ids["no_exam"]]
    assert "ItemSol.CodTExame também vazio" not in refused[ids["blank"]]
    monitor.close()


def test_mapping_check_lists_codigoexame_codes_with_their_resolution(
        lis: Lis, db_url: str, tmp_path: Path) -> None:
    _seed(lis)
    lis.requisition(2)
    lis.item(2, "CONV-3", CodTExame=1)  # FE again, another requisition
    lis.item(2, "CONV-4", CodTExame=2, lab="OUTRO LAB")  # not a configured lab
    test_map = tmp_path / "tests_map.json"
    test_map.write_text('{"tsh": "T4L"}', encoding="utf-8")
    catalog = Catalog(parse_catalog({"tests": load_catalog_sample()}, source="amostra"))
    resolver = Resolver(catalog=catalog, test_map=load_test_map(test_map), material_map={},
                        code_source="codigoexame", variant_policy="refuse", dry_run=False)
    engine = sa.create_engine(db_url)
    install_sqlite_functions(engine)
    source = LisSource(tables=lis_tables(None), support_labs=[LAB])
    with engine.connect() as conn:
        rows = source.fetch_distinct_codes(conn, None, code_source="codigoexame")
    engine.dispose()
    reports = {r.usage.key: r for r in check_codes(merge_code_rows(rows), resolver)}
    assert set(reports) == {"fe", "tsh", ""}
    assert reports["fe"].ok and reports["fe"].usage.items == 2
    assert reports["fe"].usage.requisitions == 2
    assert reports["fe"].material.startswith("SORO")
    assert reports["tsh"].ok and reports["tsh"].from_map and reports["tsh"].support_id == "T4L"
    assert reports["tsh"].usage.items == 1  # the other lab's item is not counted
    blank = reports[""]
    assert blank.status == "missing_code" and blank.usage.items == 2
    assert "CodigoExame" in blank.fix
