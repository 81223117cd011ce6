"""Hypothesis makes hostile bodies for every parser, from a valid one: nested too deep,
strings too long, too many properties, invalid UTF-8, NaN and friends, NUL. Each is refused
with a 4xx in the dialect's shape and queues nothing; arbitrary bytes never give a 5xx."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dialects import DIALECTS, Dialect, check_error, make_account
from tests.strategies import BODIES, FUZZ
from tests.support import queued_batches

# Each example is one request through the front door: fewer than FUZZ's, five dialects each.
HOSTILE = settings(FUZZ, max_examples=25)
QUIET = {"request_limits": False}
MARK = "HOSTILE_VALUE"  # where a hostile value goes in a valid body


def with_value(dialect: Dialect, raw: bytes, *, as_key: bool = False) -> bytes:
    """A valid body of `dialect` holding `raw` (JSON text) as a property's value, or key."""
    properties = {MARK: 1} if as_key else {"p": MARK}
    body = dialect.one(properties)
    return body.replace(f'"{MARK}"'.encode(), raw)


def nested(depth: int, kinds: list[bool]) -> bytes:
    """`depth` arrays and objects around a value, in the order `kinds` says (True: array)."""
    opening = b"".join(b"[" if kinds[i % len(kinds)] else b'{"k": ' for i in range(depth))
    closing = b"".join(b"]" if kinds[i % len(kinds)] else b"}" for i in reversed(range(depth)))
    return opening + b"0" + closing


DEEP = st.builds(nested, st.integers(33, 1500), st.lists(st.booleans(), min_size=1, max_size=8))
LONG = st.builds(
    lambda n, char: json.dumps(char * n).encode(),
    st.integers(65_537, 90_000),
    st.sampled_from(["x", "é", '"', "\\", "\n", "\u2028"]),
)
MANY = st.builds(
    lambda n, value: {f"k{i}": value for i in range(n)},
    st.integers(1001, 2500),
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
)
BAD_UTF8 = st.builds(
    lambda before, bad, after: b'"' + before.encode() + bad + after.encode() + b'"',
    st.text(max_size=20).filter(lambda t: '"' not in t and "\\" not in t),
    st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]),
    st.text(max_size=20).filter(lambda t: '"' not in t and "\\" not in t),
)
NOT_NUMBERS = st.sampled_from(
    [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e99999", b"nan", b"inf"]
)
NUL = st.builds(lambda s: json.dumps(s + "\x00" + s).encode(), st.text(max_size=10))


@pytest.fixture
async def setup(gateway, fake_redis):
    keys = await make_account(fake_redis)
    client = await gateway(**QUIET)
    return client, keys


async def refused(setup: Any, fake_redis: Any, dialect: Dialect, body: bytes) -> None:
    """`body` gets a 4xx in `dialect`'s shape, and nothing more is queued."""
    client, keys = setup
    path, headers = dialect.target(keys)
    before = await queued_batches(fake_redis)
    response = await client.post(path, data=io.BytesIO(body), headers=headers)
    assert 400 <= response.status < 500, await response.text()
    await check_error(dialect, response, response.status)
    assert await queued_batches(fake_redis) == before


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@HOSTILE
@given(value=DEEP)
async def test_deep_nesting_is_refused(setup, fake_redis, dialect, value):
    await refused(setup, fake_redis, dialect, with_value(dialect, value))


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@HOSTILE
@given(value=LONG, as_key=st.booleans())
async def test_huge_strings_are_refused(setup, fake_redis, dialect, value, as_key):
    await refused(setup, fake_redis, dialect, with_value(dialect, value, as_key=as_key))


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@HOSTILE
@given(value=MANY)
async def test_many_properties_are_refused(setup, fake_redis, dialect, value):
    await refused(setup, fake_redis, dialect, dialect.one(value))


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@HOSTILE
@given(value=BAD_UTF8, as_key=st.booleans())
async def test_invalid_utf8_is_refused(setup, fake_redis, dialect, value, as_key):
    await refused(setup, fake_redis, dialect, with_value(dialect, value, as_key=as_key))


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@HOSTILE
@given(value=NOT_NUMBERS | NUL)
async def test_nan_infinity_and_nul_are_refused(setup, fake_redis, dialect, value):
    await refused(setup, fake_redis, dialect, with_value(dialect, value))


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@HOSTILE
@given(body=BODIES, gzip=st.booleans())
async def test_arbitrary_bytes_never_give_a_5xx(setup, fake_redis, dialect, body, gzip):
    """Anything at all: answered below 500, and queued only when accepted."""
    client, keys = setup
    path, headers = dialect.target(keys)
    if gzip:
        headers = {**headers, "Content-Encoding": "gzip"}
    before = await queued_batches(fake_redis)
    response = await client.post(path, data=body, headers=headers)
    assert response.status < 500, await response.text()
    if response.status >= 400:
        await check_error(dialect, response, response.status)
        assert await queued_batches(fake_redis) == before
