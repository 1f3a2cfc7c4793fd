"""Backoff is a pure function: exponential growth, full jitter, caps, Retry-After as a floor."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from bemsoft_monitor.backoff import backoff_delay_s, parse_retry_after

NOW = dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.timezone.utc)


def test_the_ceiling_doubles_per_attempt_until_the_cap() -> None:
    ceilings = [backoff_delay_s(n, base_s=2, cap_s=600, rand=lambda: 1.0) for n in range(1, 12)]
    assert ceilings == [2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    assert backoff_delay_s(3, base_s=2, cap_s=600, rand=lambda: 0.0) == 0.0
    assert backoff_delay_s(3, base_s=2, cap_s=600, rand=lambda: 0.5) == 4.0


def test_retry_after_is_a_floor_even_above_the_cap() -> None:
    assert backoff_delay_s(1, base_s=2, cap_s=10, retry_after_s=120, rand=lambda: 1.0) == 120
    assert backoff_delay_s(5, base_s=2, cap_s=600, retry_after_s=3, rand=lambda: 1.0) == 32


@given(attempt=st.integers(min_value=-5, max_value=10_000),
       base=st.floats(min_value=0.001, max_value=3600),
       cap=st.floats(min_value=0.001, max_value=86_400),
       retry_after=st.one_of(st.none(), st.floats(min_value=0, max_value=86_400)),
       r=st.floats(min_value=0, max_value=1))
def test_delay_is_never_negative_never_above_the_cap_and_honours_retry_after(
        attempt: int, base: float, cap: float, retry_after: float | None, r: float) -> None:
    delay = backoff_delay_s(attempt, base_s=base, cap_s=cap, retry_after_s=retry_after,
                            rand=lambda: r)
    assert delay >= 0
    assert delay <= max(cap, retry_after or 0)
    if retry_after is not None:
        assert delay >= retry_after


def test_retry_after_as_seconds_or_http_date() -> None:
    assert parse_retry_after("7", now=NOW) == 7.0
    assert parse_retry_after(" 120 ", now=NOW) == 120.0
    assert parse_retry_after("Wed, 01 Jul 2026 12:00:30 GMT", now=NOW) == 30.0
    assert parse_retry_after("Wed, 01 Jul 2026 11:59:00 GMT", now=NOW) == 0.0  # in the past
    assert parse_retry_after("amanhã", now=NOW) is None
    assert parse_retry_after("-5", now=NOW) is None
    assert parse_retry_after(None, now=NOW) is None
    assert parse_retry_after("", now=NOW) is None
