"""Hypothesis strategies and settings the parser tests share."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# The front-door fixtures are made once per test, not per example: that is intended here.
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)
# Any bytes, or any JSON value (json.dumps writes infinities as `Infinity`: not JSON either).
BODIES = st.binary(max_size=2000) | JSON_VALUES.map(lambda value: json.dumps(value).encode())
# Naive on purpose (no offset means UTC), and in the past but within EVENTGATE_MAX_PAST_S
# (10 years), so that they are valid timestamps.
_NOW = datetime.now(UTC).replace(tzinfo=None)
PAST_DATETIMES = st.datetimes(
    min_value=_NOW - timedelta(days=9 * 365), max_value=_NOW - timedelta(days=1)
).map(datetime.isoformat)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:  # type: ignore[type-arg]
    """Mostly `good`, sometimes `bad`: bodies near the valid ones, so that hypothesis gets
    past the first check."""
    return st.integers(0, 9).flatmap(lambda n: bad if n == 5 else good)
