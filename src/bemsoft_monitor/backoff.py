"""Pure delay computation: exponential growth, full jitter, Retry-After, caps."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
from collections.abc import Callable


def backoff_delay_s(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1).

    Full jitter: uniform in [0, min(cap, base·2^(attempt-1))]. A server's Retry-After is a
    floor: we never come back earlier than asked, even above the cap.
    """
    exp = min(cap_s, base_s * float(2 ** max(0, min(attempt - 1, 62))))
    delay = exp * rand()
    if retry_after_s is not None and retry_after_s > delay:
        delay = retry_after_s
    return max(0.0, delay)


def parse_retry_after(value: str | None, *, now: dt.datetime) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP date); None when absent or invalid."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())
