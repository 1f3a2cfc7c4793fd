"""Delivery without loss or duplicates: settle, late items, out-of-order commits, lease, limits."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bemsoft_monitor.bemsoft import BemsoftClient
from bemsoft_monitor.simulator import Simulator, load_catalog_sample

from .conftest import FakeClock, Lis, drive, make_monitor, make_settings


def saved_ids(sim: Simulator) -> list[str]:
    return [t["test_external_id"] for t in sim.saved_tests()]


def report(name: str, lis_items: int, sim: Simulator) -> tuple[int, int]:
    ids = saved_ids(sim)
    counts = Counter(ids)
    lost = lis_items - len(counts)
    dup = sum(n - 1 for n in counts.values())
    print(f"\n[{name}] itens={lis_items} salvos={len(counts)} perdidos={lost} "
          f"duplicados={dup} chamadas={len(sim.calls())}")
    return lost, dup


def test_settle_rereads_the_requisition_removed_items_cancelled_added_included(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    a = lis.item(1, "FE")
    b = lis.item(1, "TSH")
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim, debounce_seconds=60),
                                  clock)
    monitor.cycle()
    lis.delete_item(b)
    with lis.engine.begin() as conn:  # moved to another support lab
        conn.execute(sa.update(lis.t.item).where(lis.t.item.c.CodItemSol == a)
                     .values(NomeTerceirizado="OUTRO LAB"))
    c = lis.item(1, "T4L")
    clock.advance(61)
    drive(monitor, clock)
    assert saved_ids(sim) == [f"item-{c}"]
    states = {r.item_id: r.state for r in parts.store.requisition_items(1)}
    assert states == {a: "cancelled", b: "cancelled", c: "delivered"}
    monitor.close()


def test_late_item_is_delivered_once_in_an_order_of_its_own(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(9)
    first = [lis.item(9, "FE"), lis.item(9, "TSH")]
    monitor, parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    late = lis.item(9, "T4L")
    drive(monitor, clock)
    drive(monitor, clock)
    assert sorted(saved_ids(sim)) == sorted(f"item-{i}" for i in [*first, late])
    orders = parts.store.orders_of_requisition(9)
    assert [o.item_ids for o in orders] == [tuple(first), (late,)]
    assert orders[0].key != orders[1].key
    assert orders[1].payload["batch"]["externalId"] == "sol-9-2"
    assert all(o.state == "delivered" for o in orders)
    lost, dup = report("itens tardios", 3, sim)
    assert (lost, dup) == (0, 0)
    monitor.close()


def test_next_day_collection_is_never_in_an_earlier_batch(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(5, dtaentrada=dt.datetime(2026, 7, 1), Hora="23:40")
    lis.item(5, "FE", DataEntrada=dt.datetime(2026, 7, 1, 23, 45))
    lis.item(5, "TSH", DataEntrada=dt.datetime(2026, 7, 2, 0, 15))
    monitor, _parts = make_monitor(make_settings(db_url, tmp_path, sim), clock)
    drive(monitor, clock)
    saved = sim.saved_tests()
    assert len(saved) == 2  # the simulator drops tests collected after the batch date
    assert all(t["collection_date"] <= t["batch_date"] for t in saved)
    lost, dup = report("coleta no dia seguinte", 2, sim)
    assert (lost, dup) == (0, 0)
    monitor.close()


def test_out_of_order_commit_on_postgres_is_still_delivered(
        pg_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis = Lis(pg_url)
    lis.patient()
    lis.requisition(1)
    lis.requisition(2)
    lis.item(1, "FE", item_id=100)
    monitor, parts = make_monitor(
        make_settings(pg_url, tmp_path, sim, out_of_order_grace_seconds=600), clock)
    drive(monitor, clock)
    # Connection A takes id 101 and keeps its transaction open; B commits 102 first.
    slow = lis.engine.connect()
    tx = slow.begin()
    lis.item(2, "TSH", item_id=101, conn=slow)
    lis.item(1, "T4L", item_id=102)
    drive(monitor, clock)
    assert parts.store.checkpoint() == 102
    assert "item-101" not in saved_ids(sim)
    tx.commit()
    slow.close()
    clock.advance(5)
    drive(monitor, clock)
    assert sorted(saved_ids(sim)) == ["item-100", "item-101", "item-102"]
    lost, dup = report("commits fora de ordem", 3, sim)
    assert (lost, dup) == (0, 0)
    lis.dispose()
    monitor.close()


def test_identity_jump_of_1000_never_stalls(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=10)
    lis.item(1, "TSH", item_id=1011)  # SQL Server restarted: IDENTITY jumped by 1000
    monitor, parts = make_monitor(
        make_settings(db_url, tmp_path, sim, out_of_order_grace_seconds=60), clock)
    drive(monitor, clock)
    assert sorted(saved_ids(sim)) == ["item-10", "item-1011"]
    assert [(g.lo, g.hi) for g in parts.store.open_gaps(now=clock.now(), grace_s=60)] == [
        (1, 9), (11, 1010)]
    clock.advance(61)
    lis.item(1, "T4L", item_id=1012)
    drive(monitor, clock)
    assert parts.store.open_gaps(now=clock.now(), grace_s=60) == []
    assert "item-1012" in saved_ids(sim)
    monitor.close()


def test_fault_suite_simulator_faults_zero_lost_zero_duplicated(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    n_items = 0
    for req in range(1, 21):
        lis.requisition(req)
        for code in ("FE", "TSH", "T4L")[: 1 + req % 3]:
            lis.item(req, code)
            n_items += 1
    sim.set_faults([
        {"kind": "status", "status": 500}, {"kind": "status", "status": 503},
        {"kind": "status", "status": 502}, {"kind": "429", "retry_after": 3},
        {"kind": "error201"}, {"kind": "delay", "seconds": 0.3},
        {"kind": "reset"}, {"kind": "reset", "after_save": True},
        {"kind": "html", "status": 502}, {"kind": "empty", "status": 504},
        {"kind": "error201"}, {"kind": "delay", "seconds": 0.2},
    ])
    settings = make_settings(db_url, tmp_path, sim, bemsoft_breaker_seconds=2)
    monitor, parts = make_monitor(settings, clock)
    monitor.cycle()
    real = sim.token
    sim.set_token("token-revogado")  # a 401 window in the middle of the run
    monitor.cycle()
    clock.advance(3)
    monitor.cycle()
    sim.set_token(real)
    drive(monitor, clock, cycles=200, step_s=3)
    lost, dup = report("falhas do simulador", n_items, sim)
    assert (lost, dup) == (0, 0)
    assert parts.store.counts()["orders"] == {"delivered": 20}
    monitor.close()


def test_concurrency_is_bounded_and_orders_of_a_requisition_stay_in_sequence(
        tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    for req in range(1, 13):
        lis.requisition(req)
        lis.item(req, "FE")
    with Simulator(latency_s=0.15) as sim:
        settings = make_settings(url, tmp_path, sim, bemsoft_concurrency=4)
        monitor, parts = make_monitor(settings, clock)
        client = parts.client
        assert client is not None
        lock = threading.Lock()
        state = {"now": 0, "max": 0}
        original = BemsoftClient.post_order

        def counting(self: BemsoftClient, payload: dict, *, key: str):  # type: ignore[no-untyped-def]
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            try:
                return original(self, payload, key=key)
            finally:
                with lock:
                    state["now"] -= 1

        client.post_order = counting.__get__(client)  # type: ignore[method-assign]
        started = time.monotonic()
        drive(monitor, clock)
        elapsed = time.monotonic() - started
        assert state["max"] == 4
        assert len(sim.saved_tests()) == 12
        assert elapsed < 12 * 0.15  # really parallel
        # Sequence: the second order of a requisition waits for the first one's answer.
        sim.set_faults([{"kind": "status", "status": 503}])
        lis.item(1, "TSH", item_id=5000)
        monitor.cycle(drain=False)  # order 2 of requisition 1 is on the wire (gets 503)
        lis.item(1, "T4L", item_id=5001)
        for _ in range(30):
            monitor.cycle()
            clock.advance(2)
        batches = [c["batch"] for c in sim.calls() if c["batch"].startswith("sol-1-")]
        assert batches[:3] == ["sol-1-2", "sol-1-2", "sol-1-3"], batches
        monitor.close()


def test_circuit_breaker_sends_one_probe_per_interval_during_an_outage(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    for req in range(1, 31):
        lis.requisition(req)
        lis.item(req, "FE")
    sim.set_faults([{"kind": "status", "status": 503}] * 1000)
    settings = make_settings(url, tmp_path, sim, bemsoft_breaker_seconds=10,
                             bemsoft_concurrency=1)
    monitor, _parts = make_monitor(settings, clock)
    for _ in range(60):  # 60 s of outage
        monitor.cycle()
        clock.advance(1)
    calls = len(sim.calls())
    # 3 failures open the breaker, then one probe every 10 s: about 3 + 6.
    assert calls <= 3 + 7, calls
    sim.set_faults([])
    clock.advance(11)
    drive(monitor, clock, cycles=100, step_s=5)
    lost, dup = report("queda da Bemsoft", 30, sim)
    assert (lost, dup) == (0, 0)
    monitor.close()


def test_second_monitor_waits_and_takes_over_after_the_lease_expires(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    settings = make_settings(db_url, tmp_path, sim, lease_seconds=30)
    first, _ = make_monitor(settings, clock)
    second, _ = make_monitor(settings, clock)
    second.host = "outro-servidor"  # a different machine: its holder cannot be checked
    assert first.cycle().lease_held
    assert not second.cycle().lease_held
    lis.requisition(2)
    lis.item(2, "TSH")
    clock.advance(20)
    assert not second.cycle().lease_held  # the first is still within its lease
    # The first monitor dies silently; the second takes over once the lease is over.
    clock.advance(11)
    stats = second.cycle()
    assert stats.lease_held
    drive(second, clock)
    lost, dup = report("dois monitores", 2, sim)
    assert (lost, dup) == (0, 0)
    second.close()


def test_a_monitor_that_lost_its_lease_cannot_overwrite_the_successor(
        tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    with Simulator(latency_s=0.3) as sim:
        settings = make_settings(url, tmp_path, sim, lease_seconds=30)
        first, parts = make_monitor(settings, clock)
        first.cycle(drain=False)  # the order is on the wire
        assert [o.state for o in parts.store.orders_of_requisition(1)] == ["sending"]
        # The first monitor freezes; its lease runs out and a successor takes over, puts the
        # interrupted order back with the same key and sends it.
        clock.advance(31)
        second, _ = make_monitor(settings, clock)
        second.host = "outro-servidor"
        assert second.cycle().lease_held
        drive(second, clock)
        # The frozen monitor wakes up with its (late) answer: it is not written over the
        # successor's record, and nothing new is claimed.
        deadline = time.monotonic() + 10
        while first._answers.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        with caplog.at_level(logging.WARNING, logger="bemsoft_monitor"):
            first.pump()
        assert "retomado por outro monitor" in caplog.text
        orders = parts.store.orders_of_requisition(1)
        assert [o.state for o in orders] == ["delivered"]
        lost, dup = report("monitor congelado e sucessor", 1, sim)
        assert (lost, dup) == (0, 0)
        second.close()
        first.close(grace_s=0)


def test_the_lease_is_renewed_between_polls_and_claims_need_it(
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    """POLL_SECONDS longer than LEASE_SECONDS: the lease is kept while sending between polls."""
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    settings = make_settings(db_url, tmp_path, sim, lease_seconds=30, poll_seconds=60)
    first, parts = make_monitor(settings, clock)
    second, _ = make_monitor(settings, clock)
    second.host = "outro-servidor"
    assert first.cycle().lease_held
    clock.advance(20)
    first.pump()  # between two polls: renews the lease (due after a third of it)
    clock.advance(20)  # 40 s after it was taken: only a renewal keeps it
    assert not second.cycle().lease_held
    # The first monitor stops pumping; the second takes the expired lease over.
    clock.advance(31)
    assert second.cycle().lease_held
    lis.requisition(2)
    lis.item(2, "TSH")
    token = sim.token
    sim.set_token("revogado")  # the second's send is refused: the order stays pending
    second.cycle()
    pending = [o.order_id for o in parts.store.orders_by_state("pending")]
    assert len(pending) == 1
    # The first monitor has not noticed; the state store refuses it the claim all the same.
    assert first.lease_held
    assert parts.store.claim_many(pending, holder=first.holder, now=clock.now()) == []
    first.pump()
    assert not first.lease_held
    sim.set_token(token)
    clock.advance(settings.bemsoft_breaker_seconds + 1)
    drive(second, clock)
    lost, dup = report("trava renovada entre leituras", 2, sim)
    assert (lost, dup) == (0, 0)
    first.close()
    second.close()


@pytest.mark.parametrize("limit", [20, 12])
def test_no_external_id_exceeds_the_limit(
        tmp_path: Path, clock: FakeClock, limit: int) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient(123456789)
    lis.requisition(2147483600, patient=123456789)
    lis.item(2147483600, "FE", item_id=2147483000)
    with Simulator(extid_max=limit) as sim:
        monitor, _parts = make_monitor(
            make_settings(url, tmp_path, sim, bemsoft_extid_max=limit), clock)
        drive(monitor, clock)
        assert len(sim.saved_tests()) == 1
        saved = sim.saved_tests()[0]
        for key in ("batch_external_id", "order_external_id", "patient_external_id",
                    "test_external_id"):
            assert len(saved[key]) <= limit
        monitor.close()


def test_refused_items_requeued_by_another_process_during_a_settle_are_sent_once(  # noqa: PLR0917
        lis: Lis, db_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """``retry --refused`` (another process) writes while the monitor settles a requisition."""
    lis.patient()
    lis.requisition(1)
    fe = lis.item(1, "FE")
    novo = lis.item(1, "NOVO")  # not in the catalogue yet: refused
    settings = make_settings(db_url, tmp_path, sim, bemsoft_tests_min_refresh=0)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    assert [r.item_id for r in parts.store.items_by_state("refused")] == [novo]
    sim.set_catalog([*load_catalog_sample(),
                     {"id": "NOVO", "name": "EXAME NOVO", "specimen": {"id": "SORO",
                                                                       "name": "Soro"}}])
    late = lis.item(1, "TSH")  # makes the requisition due again
    # Another process (its own engine) requeues the refused item exactly while the monitor
    # is between reading the requisition and writing its settle. The fake clock does not
    # move, so a timestamp could not tell the two writes apart.
    other, _ = make_monitor(settings, clock)
    fired: list[int] = []

    @sa.event.listens_for(parts.store.engine, "before_cursor_execute")
    def _meanwhile(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        in_settle = any(f.name == "_settle_chunk" for f in traceback.extract_stack())
        if not fired and in_settle and '"OrderSeq"' in statement:
            fired.append(other.store.requeue_refused(now=clock.now()))

    with caplog.at_level(logging.INFO, logger="bemsoft_monitor"):
        drive(monitor, clock)
        clock.advance(1)
        drive(monitor, clock)
    other.close()
    assert fired == [1], "the other process requeued the item during the settle"
    lost, dup = report("reenvio de recusados durante o assentamento", 3, sim)
    assert (lost, dup) == (0, 0)
    assert sorted(saved_ids(sim)) == sorted(f"item-{i}" for i in (fe, novo, late))
    assert [o.seq for o in parts.store.orders_of_requisition(1)] == [1, 2, 3]
    assert "indisponível" not in caplog.text
    monitor.close()


def test_reenviar_gives_a_dead_order_a_fresh_retry_budget(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    sim.set_faults([{"kind": "status", "status": 503}, {"kind": "status", "status": 503}])
    monitor, parts = make_monitor(make_settings(url, tmp_path, sim, bemsoft_retries=1,
                                                bemsoft_breaker_seconds=2), clock)
    drive(monitor, clock)
    [order] = parts.store.orders_of_requisition(1)
    assert order.state == "dead" and order.attempts == 2  # the first try and one retry
    # A person presses Reenviar; Bemsoft fails once more, then answers.
    sim.set_faults([{"kind": "status", "status": 503}])
    assert parts.store.requeue_order(order.order_id, now=clock.now(), new_generation=False)
    drive(monitor, clock)
    assert [o.state for o in parts.store.orders_of_requisition(1)] == ["delivered"]
    assert saved_ids(sim) == [f"item-{order.item_ids[0]}"]
    monitor.close()


def test_claimed_orders_not_yet_on_the_wire_go_back_untouched_on_a_graceful_stop(
        tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    for req in range(1, 7):
        lis.requisition(req)
        lis.item(req, "FE", item_id=req)
    with Simulator(latency_s=1.0) as sim:
        settings = make_settings(url, tmp_path, sim, bemsoft_concurrency=1)
        monitor, parts = make_monitor(settings, clock)
        monitor.cycle(drain=False)
        orders = parts.store.orders_by_state("sending")
        # One on the wire; the next ones claimed ahead so the sending thread never waits.
        assert monitor.sends_in_flight == 1 and len(orders) > 1
        monitor.close(grace_s=0)
        states = {o.order_id: o for o in parts.store.orders_of_requisition(1)
                  + [o for r in range(2, 7) for o in parts.store.orders_of_requisition(r)]}
        on_wire = [o for o in states.values() if o.key_uncertain]
        untouched = [o for o in states.values() if not o.key_uncertain]
        print(f"\nno fio: {len(on_wire)}; devolvidos intactos: {len(untouched)}")
        assert len(on_wire) == 1 and on_wire[0].state == "pending"
        assert all(o.state == "pending" and o.attempts == 0 and o.first_attempt_at is None
                   for o in untouched)
        with parts.store.engine.connect() as conn:
            open_attempts = conn.execute(sa.text(
                'SELECT count(*) FROM "_MonitorAttempt" WHERE "FinishedAt" IS NULL')).scalar()
        assert open_attempts == 0
        # A new monitor sends each exactly once (the interrupted one with the same key).
        second, _ = make_monitor(settings, clock)
        drive(second, clock)
        lost, dup = report("parada com pedidos reservados", 6, sim)
        assert (lost, dup) == (0, 0)
        second.close()


def test_a_backlog_is_read_in_consecutive_cycles_without_waiting_for_the_poll(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    for item_id in range(1, 151):
        lis.item(1, "FE", item_id=item_id)
    monitor, parts = make_monitor(make_settings(url, tmp_path, sim, batch_size=5,
                                                debounce_seconds=600), clock)
    first = monitor.cycle()
    assert first.more and first.read == 100  # 20 windows of 5: the per-cycle bound
    second = monitor.cycle()
    assert not second.more and second.read == 50
    assert parts.store.checkpoint() == 150
    monitor.close()
