"""Reading the LIS: late commits are never skipped, whatever the window size or timing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from bemsoft_monitor.scan import Gap, holes, merge_gaps, plan_scan
from bemsoft_monitor.simulator import Simulator

from .conftest import FakeClock, Lis, drive, make_monitor, make_settings

T = dt.datetime(2026, 7, 1, 11, 0)


def test_holes_are_the_ranges_without_visible_ids() -> None:
    assert holes(1, 10, [3, 4, 8]) == [(1, 2), (5, 7), (9, 10)]
    assert holes(5, 7, []) == [(5, 7)]
    assert holes(5, 7, [5, 6, 7]) == []


def test_a_full_window_stops_the_checkpoint_at_its_last_id_and_keeps_the_rest_of_a_gap() -> None:
    gap = Gap(3, 20, T)
    plan = plan_scan(checkpoint=30, gaps=[gap], ids=[4, 5, 9], window=3, now=T, keep_holes=True)
    assert plan.checkpoint is None  # the window ended inside the gap
    assert plan.fetch == ((4, 9),)
    assert [(g.lo, g.hi) for g in plan.gaps] == [(3, 3), (6, 8), (10, 20)]
    assert all(g.first_seen == T for g in plan.gaps)  # grace counts from first sight


def test_new_holes_above_the_checkpoint_are_kept_with_the_time_they_were_seen() -> None:
    later = T + dt.timedelta(minutes=5)
    plan = plan_scan(checkpoint=10, gaps=[Gap(2, 2, T)], ids=[2, 11, 14], window=500, now=later,
                     keep_holes=True)
    assert plan.checkpoint == 14
    assert plan.fetch == ((2, 2), (11, 14))
    assert [(g.lo, g.hi, g.first_seen) for g in plan.gaps] == [(12, 13, later)]
    quiet = plan_scan(checkpoint=10, gaps=[], ids=[11, 14], window=500, now=later,
                      keep_holes=False)
    assert quiet.gaps == () and quiet.checkpoint == 14


def test_too_many_gaps_are_merged_keeping_the_oldest_time() -> None:
    gaps = [Gap(i * 10, i * 10 + 1, T + dt.timedelta(seconds=i)) for i in range(6)]
    merged = merge_gaps(gaps, 3)
    assert len(merged) == 3
    covered = {x for g in merged for x in range(g.lo, g.hi + 1)}
    assert all(x in covered for g in gaps for x in range(g.lo, g.hi + 1))
    assert merged[0].first_seen == T


@st.composite
def _lis_history(draw: Any) -> tuple[list[int | None], list[int], int]:
    """Commit step of each id (None: rolled back), poll steps, window size."""
    n = draw(st.integers(min_value=1, max_value=40))
    commits = draw(st.lists(st.one_of(st.none(), st.integers(0, 30)), min_size=n, max_size=n))
    polls = sorted(draw(st.lists(st.integers(0, 31), min_size=1, max_size=25)))
    window = draw(st.integers(min_value=1, max_value=8))
    return commits, polls, window


@settings(max_examples=400, deadline=None)
@given(_lis_history(), st.integers(0, 3), st.booleans())
def test_every_committed_id_is_read_whatever_the_commit_order(
        history: tuple[list[int | None], list[int], int], between: int, lab_only: bool) -> None:
    """Model of the LIS: ids commit at arbitrary steps, also between a poll's two reads."""
    commits, polls, window = history
    ids = range(1, len(commits) + 1)
    # Items of another lab occupy ids too; they are never read but must not block anything.
    ours = {i for i in ids if not lab_only or i % 3}

    def visible(step: float) -> list[int]:
        return [i for i in ids if commits[i - 1] is not None and commits[i - 1] <= step]

    checkpoint, gaps, read = 0, [], set()
    for step in [*polls, 1000]:  # the last poll comes after every commit
        for _batch in range(100):
            seen = visible(step)
            region = [i for i in seen
                      if i > checkpoint or any(g.lo <= i <= g.hi for g in gaps)][:window]
            plan = plan_scan(checkpoint=checkpoint, gaps=gaps, ids=region, window=window,
                             now=T, keep_holes=True)
            # Commits may land between the two statements (``between`` steps later).
            fetched = {i for i in visible(step + between / 4) if i in ours
                       and any(lo <= i <= hi for lo, hi in plan.fetch)}
            read |= fetched
            checkpoint = plan.checkpoint if plan.checkpoint is not None else checkpoint
            gaps = list(plan.gaps)
            if len(region) < window:
                break
    committed = {i for i in ids if commits[i - 1] is not None and i in ours}
    assert read == committed
    assert checkpoint == max(visible(1000), default=0)


def _late_commit_between_the_reads(engine: sa.Engine, tx_conn: sa.Connection,
                                   tx: sa.RootTransaction) -> list[str]:
    """Commit ``tx`` right after the monitor's id query, before its items query."""
    done: list[str] = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        flat = " ".join(statement.split())
        if not done and flat.startswith('SELECT "ItemSol"."CodItemSol" FROM "ItemSol"'):
            tx.commit()
            tx_conn.close()
            done.append(statement)

    return done


def test_a_commit_between_the_two_reads_of_a_poll_is_delivered_on_postgres(
        pg_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis = Lis(pg_url)
    lis.patient()
    lis.requisition(1)
    lis.requisition(2)
    lis.item(1, "FE", item_id=100)
    monitor, parts = make_monitor(make_settings(pg_url, tmp_path, sim), clock)
    drive(monitor, clock)
    # Id 101 is taken by a transaction still open; 102 commits; 101 commits between the
    # monitor's "which ids exist" and "read the items" statements.
    slow = lis.engine.connect()
    tx = slow.begin()
    lis.item(2, "TSH", item_id=101, conn=slow)
    lis.item(1, "T4L", item_id=102)
    fired = _late_commit_between_the_reads(parts.lis_engine, slow, tx)
    try:
        drive(monitor, clock)
    finally:
        if not fired:
            tx.rollback()
            slow.close()
    assert fired, "the commit happened between the two reads"
    clock.advance(1)
    drive(monitor, clock)
    saved = sorted(t["test_external_id"] for t in sim.saved_tests())
    print(f"\nsalvos: {saved}; checkpoint {parts.store.checkpoint()}")
    assert saved == ["item-100", "item-101", "item-102"]
    monitor.close()
    lis.dispose()


def test_a_late_transaction_larger_than_a_batch_is_read_whole_on_postgres(
        pg_url: str, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis = Lis(pg_url)
    lis.patient()
    for req in range(1, 15):
        lis.requisition(req)
    lis.item(1, "FE", item_id=1)
    monitor, parts = make_monitor(make_settings(pg_url, tmp_path, sim, batch_size=5), clock)
    drive(monitor, clock)
    # An import of 12 requisitions (item ids 2..13) commits after item 14 was already read;
    # one item each, so re-reading a requisition cannot bring the others along.
    slow = lis.engine.connect()
    tx = slow.begin()
    for item_id in range(2, 14):
        lis.item(item_id, "FE", item_id=item_id, conn=slow)
    lis.item(1, "TSH", item_id=14)
    try:
        drive(monitor, clock)
        assert parts.store.checkpoint() == 14
    finally:
        tx.commit()
        slow.close()
    clock.advance(1)
    drive(monitor, clock)
    saved = sorted(int(t["test_external_id"].split("-")[1]) for t in sim.saved_tests())
    print(f"\nsalvos: {saved}")
    assert saved == list(range(1, 15))
    assert parts.store.open_gaps(now=clock.now(), grace_s=600) == []
    monitor.close()
    lis.dispose()
