"""Issue 2 details end to end: settings with the original meaning, DRY_RUN, LIS locks, fates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bemsoft_monitor.app import build_monitor, build_parts
from bemsoft_monitor.bemsoft import BemsoftClient
from bemsoft_monitor.simulator import Simulator

from .conftest import FakeClock, Lis, drive, make_monitor, make_settings


def test_items_deleted_or_moved_before_sending_are_recorded_with_a_reason(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    kept, deleted, moved = lis.item(1, "FE"), lis.item(1, "TSH"), lis.item(1, "T4L")
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim, debounce_seconds=60),
                                  clock)
    monitor.cycle()
    lis.delete_item(deleted)
    with lis.engine.begin() as conn:
        conn.execute(sa.update(lis.t.item).where(lis.t.item.c.CodItemSol == moved)
                     .values(NomeTerceirizado="OUTRO LAB"))
    clock.advance(61)
    drive(monitor, clock)
    rows = {r.item_id: r for r in parts.store.requisition_items(1)}
    assert rows[kept].state == "delivered"
    for item_id in (deleted, moved):
        assert rows[item_id].state == "cancelled"
        assert "removido do LIS ou transferido para outro laboratório" in (
            rows[item_id].reason or "")
    assert [t["test_external_id"] for t in sim.saved_tests()] == [f"item-{kept}"]
    monitor.close()


def test_null_cod_texame_with_codigoexame_source_is_refused_naming_the_column(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    with lis.engine.begin() as conn:
        conn.execute(sa.insert(lis.t.exam), [{"CodTexame": 7, "CodigoExame": "FE",
                                              "descricao": "FERRO"}])
    lis.patient()
    lis.requisition(1)
    good = lis.item(1, "local-1", CodTExame=7)
    orphan = lis.item(1, "local-2", CodTExame=None)
    monitor, parts = make_monitor(
        make_settings(db_url, tmp_path, sim, test_code_source="codigoexame"), clock)
    drive(monitor, clock)
    rows = {r.item_id: r for r in parts.store.requisition_items(1)}
    assert rows[good].state == "delivered"
    assert rows[orphan].state == "refused"
    assert "ItemSol.CodTExame também vazio" in (rows[orphan].reason or "")
    monitor.close()


def test_dry_run_uses_the_saved_catalogue_copy_and_makes_no_http_call(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    real, _ = make_monitor(make_settings(url, tmp_path, sim), clock)
    drive(real, clock)  # a real run fetched /tests and saved the copy
    real.close()
    assert (tmp_path / "catalogo.json").is_file()
    calls_before = len(sim.calls())
    lis.requisition(2)
    lis.item(2, "GLI")  # two variants in the catalogue: a refusal needs the real catalogue
    lis.item(2, "TSH")
    lis.dispose()

    settings = make_settings(url, tmp_path, sim, bemsoft_dry_run=True, bemsoft_token=None)
    parts = build_parts(settings)
    monitor = build_monitor(parts, clock=clock)
    shown: list[dict[str, Any]] = []
    monitor.show_payload = lambda order: shown.append(order.payload)
    drive(monitor, clock)
    monitor.close()
    assert len(sim.calls()) == calls_before  # not even GET /tests
    (payload,) = shown
    tests = payload["batch"]["order"]["tests"]
    assert [(t["supportTestId"], t["supportSpecimenId"]) for t in tests] == [("TSH", "SORO")]
    refused = parts.store.items_by_state("refused")
    assert [r.reason for r in refused if "variantes" in (r.reason or "")]


def test_state_kept_in_the_lis_database_holds_no_connection_during_http(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    # Default STATE_DB_URL: the monitor's tables live in the LIS database itself, so the
    # state engine must not sit in a transaction (locks on the LIS) while POST is in flight.
    lis.patient()
    for req in range(1, 4):
        lis.requisition(req)
        lis.item(req, "FE")
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim, bemsoft_concurrency=1),
                                  clock)
    assert parts.store.engine is not parts.lis_engine
    held: list[tuple[int, int]] = []
    client = parts.client
    assert client is not None
    original = BemsoftClient.post_order

    def checking_post(self: BemsoftClient, payload: dict[str, Any], *, key: str) -> Any:
        held.append((parts.lis_engine.pool.checkedout(),  # type: ignore[attr-defined]
                     parts.store.engine.pool.checkedout()))  # type: ignore[attr-defined]
        return original(self, payload, key=key)

    client.post_order = checking_post.__get__(client)  # type: ignore[method-assign]
    drive(monitor, clock)
    assert held == [(0, 0)] * 3
    monitor.close()


def test_bemsoft_retries_means_new_attempts_after_the_first_like_the_original(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    lis.dispose()
    sim.set_faults([{"kind": "status", "status": 503}] * 10)
    monitor, parts = make_monitor(make_settings(url, tmp_path, sim, bemsoft_retries=2), clock)
    drive(monitor, clock, cycles=60, step_s=10)
    monitor.close()
    order = parts.store.orders_of_requisition(1)[0]
    assert order.state == "dead"
    files = list((tmp_path / "failed").glob("*.json"))
    assert len(files) == 1
    reason = json.loads(files[0].read_text(encoding="utf-8"))["reason"]
    assert "BEMSOFT_RETRIES" in reason
    assert len(sim.calls()) == 3  # the first attempt + BEMSOFT_RETRIES=2 new ones
