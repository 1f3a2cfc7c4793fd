"""The whole pipeline SQL → Bemsoft on real SQLite files and the real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from bemsoft_monitor.app import build_monitor, build_parts
from bemsoft_monitor.bemsoft import BemsoftClient
from bemsoft_monitor.simulator import Simulator
from bemsoft_monitor.store import StateStore

from .conftest import POSTGRES_URL, FakeClock, Lis, drive, make_monitor, make_settings


def test_requisition_is_delivered_as_one_order_with_exact_payload(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient(3384, nome="MARIA  DA SILVA", sexo="feminino")
    lis.requisition(4497, patient=3384)
    lis.item(4497, "FE", item_id=17065, DescExames="FERRO SERICO")
    lis.item(4497, "TSH", item_id=17066)
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    saved = sim.saved_tests()
    assert sorted(t["test_external_id"] for t in saved) == ["item-17065", "item-17066"]
    assert {t["batch_external_id"] for t in saved} == {"sol-4497"}
    calls = sim.calls()
    assert len(calls) == 1 and calls[0]["status"] == 201
    order = parts.store.orders_of_requisition(4497)[0]
    assert order.state == "delivered"
    payload = order.payload["batch"]
    assert payload["externalId"] == "sol-4497"
    assert payload["order"]["patient"] == {"externalId": "pat-3384", "name": "MARIA DA SILVA",
                                          "birthDate": "1990-05-15", "gender": "F",
                                          "weight": 0, "height": 0}
    test = payload["order"]["tests"][0]
    assert test["supportTestId"] == "FE" and test["supportSpecimenId"] == "SORO"
    assert {"key": "descricao", "value": "FERRO SERICO"} in test["additionalInformations"]
    assert "physician" not in payload["order"]
    monitor.close()


def test_other_labs_and_configured_lab_in_other_case_are_filtered_like_sql_server(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(10)
    lis.item(10, "FE", item_id=1, lab="diagnóstico do brasil - db   ")
    lis.item(10, "TSH", item_id=2, lab="HERMES PARDINI")
    lis.item(10, "T4L", item_id=3, lab=None)
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    assert [t["test_external_id"] for t in sim.saved_tests()] == ["item-1"]
    # The checkpoint passes other labs' items too: they are never read again.
    assert parts.store.checkpoint() == 3
    monitor.close()


def _seed_state_row(lis: Lis, last_item_id: int | None) -> None:
    """The original monitor's table and row, created by the lab's previous installation."""
    with lis.engine.begin() as conn:
        conn.execute(sa.text('CREATE TABLE "_MonitorState" ("Name" VARCHAR(128) PRIMARY KEY, '
                             '"LastItemId" BIGINT NULL, "UpdatedAt" TIMESTAMP NOT NULL '
                             "DEFAULT CURRENT_TIMESTAMP)"))
        conn.execute(sa.text('INSERT INTO "_MonitorState" ("Name", "LastItemId") '
                             "VALUES ('ItemSolMonitor', :v)"), {"v": last_item_id})


def test_existing_seed_checkpoint_is_honoured_on_first_start(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.requisition(2)
    lis.item(1, "FE", item_id=100)
    lis.item(2, "TSH", item_id=200)
    _seed_state_row(lis, 150)
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    assert [t["test_external_id"] for t in sim.saved_tests()] == ["item-200"]
    assert parts.store.checkpoint() == 200
    monitor.close()


def test_a_seed_row_with_a_null_checkpoint_starts_where_initial_item_id_says(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=100)  # history: must not be sent with INITIAL_ITEM_ID=max
    _seed_state_row(lis, None)
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim, initial_item_id="max"),
                                  clock)
    drive(monitor, clock)
    assert sim.saved_tests() == []
    assert parts.store.checkpoint() == 100
    lis.requisition(2)
    lis.item(2, "TSH", item_id=101)
    drive(monitor, clock)
    assert [t["test_external_id"] for t in sim.saved_tests()] == ["item-101"]
    monitor.close()


def test_initial_item_id_max_skips_history(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=5)
    monitor, _ = make_monitor(
        make_settings(db_url, tmp_path, sim, initial_item_id="max"), clock)
    drive(monitor, clock)
    assert sim.saved_tests() == []
    lis.requisition(2)
    lis.item(2, "TSH", item_id=6)
    drive(monitor, clock)
    assert [t["test_external_id"] for t in sim.saved_tests()] == ["item-6"]
    monitor.close()


def test_debounce_is_kept_in_the_store_and_survives_a_restart(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(7)
    lis.item(7, "FE", item_id=1)
    settings = make_settings(db_url, tmp_path, sim, debounce_seconds=300)
    first, _ = make_monitor(settings, clock)
    first.cycle()
    clock.advance(200)
    first.cycle()
    assert sim.calls() == []
    first.close()
    # A new process 200 s later: the debounce still counts from first sight.
    lis.item(7, "TSH", item_id=2)
    second, _ = make_monitor(settings, clock)
    second.cycle()
    assert sim.calls() == []
    clock.advance(101)
    second.cycle()
    assert sorted(t["test_external_id"] for t in sim.saved_tests()) == ["item-1", "item-2"]
    assert len(sim.calls()) == 1
    second.close()


def test_no_lis_connection_is_held_while_http_is_in_flight(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    for req in range(1, 6):
        lis.requisition(req)
        lis.item(req, "FE")
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    held: list[int] = []
    client = parts.client
    assert client is not None
    original = BemsoftClient.post_order

    def checking_post(self: BemsoftClient, payload: dict, *, key: str):  # type: ignore[no-untyped-def]
        held.append(parts.lis_engine.pool.checkedout())  # type: ignore[attr-defined]
        return original(self, payload, key=key)

    client.post_order = checking_post.__get__(client)  # type: ignore[method-assign]
    drive(monitor, clock)
    assert len(held) == 5
    assert held == [0, 0, 0, 0, 0]
    monitor.close()


def test_item_read_and_checkpoint_are_recorded_together(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    ids = [lis.item(1, code) for code in ("FE", "TSH", "T4L")]
    settings = make_settings(db_url, tmp_path, sim, debounce_seconds=60)
    monitor, parts = make_monitor(settings, clock)
    monitor.cycle()
    rows = parts.store.requisition_items(1)
    assert [r.item_id for r in rows] == ids
    assert all(r.state == "pending" for r in rows)
    assert parts.store.checkpoint() == max(ids)
    monitor.close()


def test_dry_run_shows_payloads_and_makes_no_http_call_nor_state_change(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=1)
    shown: list[dict] = []
    settings = make_settings(db_url, tmp_path, sim, bemsoft_dry_run=True)
    parts = build_parts(settings)
    monitor = build_monitor(parts, clock=clock)
    monitor.show_payload = lambda order: shown.append(order.payload)
    drive(monitor, clock)
    assert sim.calls() == []
    assert len(shown) == 1
    test = shown[0]["batch"]["order"]["tests"][0]
    assert test["supportSpecimenId"] == "SPECIMEN-TEST"  # no catalogue, no HTTP
    real = StateStore(sa.create_engine(db_url))
    assert not sa.inspect(real.engine).has_table("_MonitorOrder")
    real.engine.dispose()
    monitor.close()


def test_every_lis_anomaly_ends_delivered_or_refused_with_a_reason(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    day = dt.datetime(2026, 7, 1)
    patients = [
        dict(sexo="Masculino"), dict(sexo="FEMININO"), dict(sexo=""), dict(sexo=None),
        dict(sexo="I"), dict(datanasc=None), dict(datanasc=dt.datetime(1900, 1, 1)),
        dict(datanasc=dt.datetime(2099, 1, 1)), dict(nome="JOÃO  D'ÁVILA"), dict(nome=None),
        dict(cpf="12345678909"), dict(cpf=None),
    ]
    reqs = [
        dict(Hora="8:00"), dict(Hora="08:00:00"), dict(Hora=""), dict(Hora=None),
        dict(Hora="manhã"), dict(dtaentrada=None), dict(dtaentrada=day, Hora="23:50"),
    ]
    req = 0
    for i, p in enumerate(patients, start=1):
        lis.patient(i, **p)
        req += 1
        lis.requisition(req, patient=i)
        lis.item(req, "FE")
    for r in reqs:
        req += 1
        lis.requisition(req, patient=1, **r)
        lis.item(req, "TSH", DataEntrada=None)
        lis.item(req, "T4L", DataEntrada=day + dt.timedelta(days=1, minutes=20))
    req += 1
    lis.requisition(req, patient=None)
    lis.item(req, "FE")
    req += 1
    lis.requisition(req, patient=1)
    for code in (None, "", "  fe  ", "tsh", "NAOEXISTE"):
        lis.item(req, code, CodTExame=None)
    monitor, parts = make_monitor(
        make_settings(db_url, tmp_path, sim, default_birthdate=None), clock)
    drive(monitor, clock)
    counts = parts.store.counts()["items"]
    total = sum(counts.values())
    assert total == len(patients) + 2 * len(reqs) + 1 + 5
    assert set(counts) <= {"delivered", "refused"}, counts
    for row in parts.store.items_by_state("refused"):
        assert row.reason and len(row.reason) > 20
    # Every delivered test was saved by the simulator: none silently dropped (quirk 1).
    assert len(sim.saved_tests()) == counts["delivered"]
    report = (tmp_path / "recusados.csv").read_text(encoding="utf-8-sig")
    assert report.count("\n") == counts["refused"] + 1
    monitor.close()


def test_invariant_checkpoint_never_passes_an_unrecorded_item(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    for _ in range(12):
        lis.item(1, "FE")
    settings = make_settings(db_url, tmp_path, sim, batch_size=5, debounce_seconds=60)
    monitor, parts = make_monitor(settings, clock)
    monitor.cycle()
    recorded = {r.item_id for r in parts.store.requisition_items(1)}
    cp = parts.store.checkpoint()
    assert cp is not None
    assert all(i in recorded for i in range(1001, cp + 1))
    assert len(recorded) == 12
    monitor.close()


def test_failed_event_file_keeps_the_original_format(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=1)
    sim.set_faults([{"kind": "status", "status": 400}])
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    files = list((tmp_path / "failed").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text(encoding="utf-8"))
    assert set(data) == {"reason", "event"}
    assert "HTTP 400" in data["reason"]
    assert data["event"]["CodSolicitacao"] == 1
    assert data["event"]["payload"]["batch"]["externalId"] == "sol-1"
    assert data["event"]["items"][0]["item_id"] == 1
    assert (files[0].stat().st_mode & 0o777) == 0o600
    assert parts.store.orders_of_requisition(1)[0].state == "dead"
    monitor.close()


def test_map_file_translates_local_codes(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"FERRO": "FE"}), encoding="utf-8")
    lis.patient()
    lis.requisition(1)
    lis.item(1, "ferro ", item_id=1)
    monitor, _ = make_monitor(
        make_settings(db_url, tmp_path, sim, bemsoft_test_map_path=mapping), clock)
    drive(monitor, clock)
    assert [t["support_test_id"] for t in sim.saved_tests()] == ["FE"]
    monitor.close()


def test_physician_is_sent_only_when_all_four_settings_are_filled(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=1)
    settings = make_settings(db_url, tmp_path, sim, physician_name="DR. JOSÉ",
                             physician_council="CRM", physician_number="1234",
                             physician_uf="se")
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    order = parts.store.orders_of_requisition(1)[0]
    assert order.payload["batch"]["order"]["physician"] == {
        "externalId": "1234", "name": "DR. JOSÉ", "councilAbbreviation": "CRM",
        "councilNumber": "1234", "councilUf": "SE"}
    monitor.close()


def test_state_store_can_live_in_another_database(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=1)
    state_url = f"sqlite:///{(tmp_path / 'state.db').as_posix()}"
    monitor, parts = make_monitor(
        make_settings(db_url, tmp_path, sim, state_db_url=state_url), clock)
    drive(monitor, clock)
    assert len(sim.saved_tests()) == 1
    assert not sa.inspect(lis.engine).has_table("_MonitorOrder")
    assert parts.store.engine.url.database.endswith("state.db")  # type: ignore[union-attr]
    monitor.close()


def test_a_state_store_from_an_older_version_gets_the_new_columns(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:  # _MonitorRequisition as the first release created it
        conn.execute(sa.text(
            'CREATE TABLE "_MonitorRequisition" ("RequisitionId" BIGINT PRIMARY KEY, '
            '"FirstSeenAt" TIMESTAMP NOT NULL, "DueAt" TIMESTAMP NULL, '
            '"OrderSeq" INTEGER NOT NULL, "UpdatedAt" TIMESTAMP NOT NULL)'))
        conn.execute(sa.text(
            'INSERT INTO "_MonitorRequisition" VALUES (7, :t, NULL, 1, :t)'),
            {"t": dt.datetime(2026, 6, 30)})
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=1)
    monitor, _parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    assert [t["test_external_id"] for t in sim.saved_tests()] == ["item-1"]
    with engine.connect() as conn:
        rows = conn.execute(sa.text('SELECT "RequisitionId", "Version" FROM '
                                    '"_MonitorRequisition" ORDER BY 1')).all()
    assert (7, 0) in [tuple(r) for r in rows]  # the old row got the column's default
    assert (1, 1) in [tuple(r) for r in rows] or (1, 0) in [tuple(r) for r in rows]
    monitor.close()
    engine.dispose()


def test_while_the_running_loop_sends_no_transaction_or_lock_is_held_on_postgres(
        pg_url: str, tmp_path: Path) -> None:
    """Invariant 2 in the real loop (background sends, real clock), seen by the server."""
    lis = Lis(pg_url)
    lis.patient()
    for req in range(1, 13):
        lis.requisition(req)
        lis.item(req, "FE")
    schema = pg_url.split("search_path%3D", 1)[1]
    observer = sa.create_engine(POSTGRES_URL)
    seen: list[int] = []

    lis_tables_sql = ("SELECT l.pid, a.xact_start FROM pg_locks l "
                      "JOIN pg_class c ON c.oid = l.relation "
                      "JOIN pg_namespace n ON n.oid = c.relnamespace "
                      "JOIN pg_stat_activity a ON a.pid = l.pid "
                      "LEFT JOIN pg_index i ON i.indexrelid = c.oid "
                      "LEFT JOIN pg_class t ON t.oid = i.indrelid "
                      "WHERE n.nspname = :s AND l.pid <> pg_backend_pid() "
                      "AND coalesce(t.relname, c.relname) IN "
                      "('ItemSol', 'solicitacao', 'paciente', 'texame')")

    def look() -> None:  # runs inside the simulator while a POST is in flight
        with observer.connect() as conn:
            posted_at = conn.execute(sa.text("SELECT clock_timestamp()")).scalar()
            time.sleep(0.3)  # the client is waiting for this answer meanwhile
            # A LIS transaction that was open before this POST and still is: it spans HTTP.
            spanning = [r for r in conn.execute(sa.text(lis_tables_sql), {"s": schema})
                        if r.xact_start is not None and r.xact_start <= posted_at]
        seen.append(len(spanning))

    with Simulator() as sim:
        sim.on_post = look
        settings = make_settings(pg_url, tmp_path, sim, bemsoft_concurrency=4)
        monitor, _parts = make_monitor(settings)  # real clock: the loop as in production
        stop = threading.Event()
        loop = threading.Thread(target=monitor.run, args=(stop,))
        loop.start()
        deadline = time.monotonic() + 30
        while len(sim.saved_tests()) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        loop.join(timeout=30)
    observer.dispose()
    lis.dispose()
    print(f"\ntransações do LIS abertas durante cada POST: {seen}")
    assert len(sim.saved_tests()) == 12
    assert seen == [0] * 12


def test_an_idle_poll_is_one_lis_query_and_the_state_store_is_seldom_touched(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=1)
    settings = make_settings(db_url, tmp_path, sim, poll_seconds=5, lease_seconds=30)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    lis_sql: list[str] = []
    state_sql: list[str] = []
    sa.event.listen(parts.lis_engine, "before_cursor_execute",
                    lambda _c, _k, stmt, *_a: lis_sql.append(stmt))
    sa.event.listen(parts.store.engine, "before_cursor_execute",
                    lambda _c, _k, stmt, *_a: state_sql.append(stmt))
    polls = 60  # five minutes of POLL_SECONDS=5 with nothing new
    stop = threading.Event()
    for _ in range(polls):
        clock.advance(5)
        monitor.cycle(drain=False)
        monitor.wait_for_sends(stop, 0.0)
    # SQLite's explicit BEGIN is issued in-process, not a round trip.
    lis_queries = [q for q in lis_sql if not q.strip().upper().startswith("BEGIN")]
    state_writes = [q for q in state_sql if not q.strip().upper().startswith("BEGIN")]
    print(f"\n{polls} leituras ociosas: LIS {len(lis_queries)} consultas; "
          f"banco de estado {len(state_writes)} comandos")
    assert len(lis_queries) == polls
    assert all("ItemSol" in q and "JOIN" not in q for q in lis_queries)
    # Lease renewed every 10 s (one UPDATE) + other processes' work rechecked every 30 s.
    assert len(state_writes) <= polls // 2 + 2 * polls * 5 // 30 + 2
    monitor.close()
