"""Per-item refusals: never block the requisition, reported, sent once the cause is fixed."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import pytest

from bemsoft_monitor.simulator import Simulator, load_catalog_sample

from .conftest import FakeClock, Lis, drive, make_monitor, make_settings


def _saved_codes(sim: Simulator) -> list[str]:
    return sorted(t["support_test_id"] for t in sim.saved_tests())


def test_refused_item_does_not_block_the_rest_and_is_reported(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    refused = lis.item(1, "NOVO")
    lis.item(1, "TSH")
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    assert _saved_codes(sim) == ["FE", "TSH"]
    rows = parts.store.items_by_state("refused")
    assert [r.item_id for r in rows] == [refused]
    assert "NOVO" in (rows[0].reason or "") and "BEMSOFT_TEST_MAP_PATH" in (rows[0].reason or "")
    report = (tmp_path / "recusados.csv").read_text(encoding="utf-8-sig")
    assert str(refused) in report and "NOVO" in report
    assert parts.store.counts()["items"]["refused"] == 1
    monitor.close()


def test_a_catalogue_refresh_that_resolves_a_refused_item_sends_it_once(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    novo = lis.item(1, "NOVO")
    # A TTL of one millisecond: every cycle refreshes the catalogue from the simulator.
    settings = make_settings(db_url, tmp_path, sim, bemsoft_tests_ttl=0.001)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    assert _saved_codes(sim) == ["FE"]
    assert [r.item_id for r in parts.store.items_by_state("refused")] == [novo]

    sim.set_catalog([*load_catalog_sample(),
                     {"id": "NOVO", "name": "EXAME NOVO", "specimen": {"id": "SORO",
                                                                       "name": "Soro"}}])
    drive(monitor, clock)
    drive(monitor, clock)
    assert _saved_codes(sim) == ["FE", "NOVO"]
    assert parts.store.items_by_state("refused") == []
    orders = parts.store.orders_of_requisition(1)
    assert [o.state for o in orders] == ["delivered", "delivered"]
    assert orders[1].item_ids == (novo,)  # the late order holds only the resolved item
    monitor.close()


def test_a_catalogue_refresh_that_resolves_nothing_keeps_refusals(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "NOVO")
    settings = make_settings(db_url, tmp_path, sim, bemsoft_tests_ttl=0.001)
    monitor, parts = make_monitor(settings, clock)
    for _ in range(3):
        drive(monitor, clock)
    assert sim.saved_tests() == []
    assert len(parts.store.items_by_state("refused")) == 1
    monitor.close()


def test_refused_report_cells_cannot_start_an_excel_formula(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "=HYPERLINK(1)", DescExames="=cmd|' /C calc'!A0")
    monitor, _parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    report = (tmp_path / "recusados.csv").read_text(encoding="utf-8-sig")
    cells = [c for line in report.splitlines()[1:] for c in line.split(";")]
    assert cells
    assert not any(c.lstrip('"').startswith(("=", "+", "-", "@")) for c in cells), report
    monitor.close()


def test_refused_report_keeps_one_header_across_runs_and_opens_in_excel(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    first = lis.item(1, "NOVO", DescExames="ÁCIDO ÚRICO NOVO")
    monitor, _parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    monitor.close()
    lis.requisition(2)
    second = lis.item(2, "GLI")  # two variants, no material map
    monitor, _parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)  # a restart
    drive(monitor, clock)
    monitor.close()
    raw = (tmp_path / "recusados.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and raw.count(b"\xef\xbb\xbf") == 1
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig")), delimiter=";"))
    assert [r["item"] for r in rows] == [str(first), str(second)]
    assert rows[0]["descricao"] == "ÁCIDO ÚRICO NOVO"
    assert "BEMSOFT_TEST_MAP_PATH" in rows[0]["motivo"]
    assert "BEMSOFT_MATERIAL_MAP_PATH" in rows[1]["motivo"] and "URINA" in rows[1]["motivo"]


def test_an_unwritable_refused_report_loses_nothing(  # noqa: PLR0917 - pytest fixtures
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "recusados.csv").mkdir()  # as good as a file locked by Excel
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    novo = lis.item(1, "NOVO")
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    with caplog.at_level(logging.ERROR):
        drive(monitor, clock)
    assert _saved_codes(sim) == ["FE"]
    assert [r.item_id for r in parts.store.items_by_state("refused")] == [novo]
    assert "relatório de itens recusados" in caplog.text
    monitor.close()


def test_a_map_fixed_while_running_sends_the_refused_item_once_without_a_restart(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    test_map = tmp_path / "tests_map.json"
    test_map.write_text('{"HEMOGRAMA": "HMG"}', encoding="utf-8")
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    ferro = lis.item(1, "FERRO")  # local code the support lab calls FE
    settings = make_settings(db_url, tmp_path, sim, bemsoft_test_map_path=test_map)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    assert _saved_codes(sim) == ["FE"]
    assert [r.item_id for r in parts.store.items_by_state("refused")] == [ferro]

    # The lab fixes the map; the file's time moves forward (coarse file-system clocks).
    before = test_map.stat().st_mtime_ns
    test_map.write_text('{"HEMOGRAMA": "HMG", "FERRO": "FE"}', encoding="utf-8")
    os.utime(test_map, ns=(before + 2_000_000_000, before + 2_000_000_000))
    drive(monitor, clock)
    drive(monitor, clock)
    saved = sim.saved_tests()
    print(f"\nexames salvos: {[(t['test_external_id'], t['support_test_id']) for t in saved]}")
    assert sorted(t["test_external_id"] for t in saved) == sorted(
        [f"item-{ferro}", f"item-{ferro - 1}"])
    assert parts.store.items_by_state("refused") == []
    assert len(parts.store.orders_of_requisition(1)) == 2  # the fix went in an order of its own
    monitor.close()


def test_an_item_refused_for_patient_data_stays_refused_when_the_map_changes(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    test_map = tmp_path / "tests_map.json"
    test_map.write_text('{"HEMOGRAMA": "HMG"}', encoding="utf-8")
    lis.patient(nome="   ")  # no name: every item of the requisition is refused
    lis.requisition(1)
    item = lis.item(1, "FE")
    settings = make_settings(db_url, tmp_path, sim, bemsoft_test_map_path=test_map)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    before = test_map.stat().st_mtime_ns
    test_map.write_text('{"HEMOGRAMA": "HMG", "X": "Y"}', encoding="utf-8")
    os.utime(test_map, ns=(before + 2_000_000_000, before + 2_000_000_000))
    drive(monitor, clock)
    assert sim.saved_tests() == []
    assert [r.item_id for r in parts.store.items_by_state("refused")] == [item]
    monitor.close()
