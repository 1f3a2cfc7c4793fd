"""Pure planning of one LIS read: which ids to fetch, the new checkpoint, the holes left.

A poll first asks the LIS which ``CodItemSol`` values are visible (all support labs, in id
order, at most one window), and only then reads the items inside what that answer covered.
An id that commits between the two statements is therefore either read or left as a hole;
an id that commits after the first statement was a hole in it. Every hole below the
checkpoint is kept (with the time it was first seen) and re-read until it fills or the
out-of-order grace window ends, so a late commit is never skipped (invariant 4).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

MAX_GAPS = 100  # ranges re-read per poll; more are merged (re-read items are deduplicated)


@dataclass(frozen=True)
class Gap:
    """Ids ``lo..hi`` (inclusive) not visible when last read, first seen at ``first_seen``."""

    lo: int
    hi: int
    first_seen: dt.datetime


@dataclass(frozen=True)
class ScanPlan:
    """What one window of visible ids means for the ledger."""

    fetch: tuple[tuple[int, int], ...]  # id ranges (inclusive) whose items are read
    checkpoint: int | None  # the new checkpoint, None when it does not move
    gaps: tuple[Gap, ...]  # the whole new set of open gaps
    gaps_changed: bool


def holes(lo: int, hi: int, visible: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal ranges inside ``lo..hi`` holding none of the sorted ``visible`` ids."""
    out: list[tuple[int, int]] = []
    start = lo
    for value in visible:
        if value > start:
            out.append((start, value - 1))
        start = max(start, value + 1)
    if start <= hi:
        out.append((start, hi))
    return out


def plan_scan(
    *,
    checkpoint: int,
    gaps: Sequence[Gap],
    ids: Sequence[int],
    window: int,
    now: dt.datetime,
    keep_holes: bool,
) -> ScanPlan:
    """Plan the read of one window of visible ids.

    ``ids`` are the ascending visible ids of the open gaps and of the range above
    ``checkpoint``, at most ``window`` of them. A full window covers the regions only up to
    its last id: the rest of a gap stays open unchanged and the checkpoint stops there.
    ``keep_holes`` is False when OUT_OF_ORDER_GRACE_SECONDS is 0 (holes are not re-read).
    """
    ids = sorted(ids)
    bound = ids[-1] if ids and len(ids) >= window else None
    fetch: list[tuple[int, int]] = []
    new_gaps: list[Gap] = []
    for gap in sorted(gaps, key=lambda g: g.lo):
        if bound is not None and gap.lo > bound:
            new_gaps.append(gap)
            continue
        hi = gap.hi if bound is None else min(gap.hi, bound)
        inside = ids[bisect.bisect_left(ids, gap.lo):bisect.bisect_right(ids, hi)]
        if inside:
            fetch.append((inside[0], inside[-1]))
        new_gaps.extend(Gap(lo, h, gap.first_seen) for lo, h in holes(gap.lo, hi, inside))
        if hi < gap.hi:
            new_gaps.append(Gap(hi + 1, gap.hi, gap.first_seen))
    above = ids[bisect.bisect_right(ids, checkpoint):]
    new_checkpoint: int | None = None
    if above:
        fetch.append((above[0], above[-1]))
        new_checkpoint = above[-1]
        if keep_holes:
            new_gaps.extend(Gap(lo, hi, now) for lo, hi in holes(checkpoint + 1, above[-1], above))
    merged = merge_gaps(new_gaps, MAX_GAPS)
    before = sorted((g.lo, g.hi, g.first_seen) for g in gaps)
    after = sorted((g.lo, g.hi, g.first_seen) for g in merged)
    return ScanPlan(fetch=tuple(fetch), checkpoint=new_checkpoint, gaps=tuple(merged),
                    gaps_changed=before != after)


def merge_gaps(gaps: Sequence[Gap], limit: int) -> list[Gap]:
    """At most ``limit`` gaps: the closest neighbours are merged (keeping the older time).

    A merged gap also covers visible ids between its parts; they are read again and
    recognised as known, which costs a little reading and loses nothing.
    """
    out = sorted(gaps, key=lambda g: g.lo)
    while len(out) > max(1, limit):
        k = min(range(len(out) - 1), key=lambda j: out[j + 1].lo - out[j].hi)
        a, b = out[k], out[k + 1]
        out[k:k + 2] = [Gap(a.lo, max(a.hi, b.hi), min(a.first_seen, b.first_seen))]
    return out
