"""The body shape checks against plain reference implementations, on any JSON hypothesis makes:
the fast C passes agree with a walk of the decoded value and a split of the text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.problems import MalformedBodyError
from ingest.shape import ShapeLimits, check_shape

MAX_DEPTH = 4
MAX_STRING = 12
LIMITS = ShapeLimits(MAX_DEPTH, MAX_STRING)
TEXT = st.text(alphabet=st.sampled_from('ab"\\/\n\x00é[]{},:'), max_size=20)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=25,
)


def depth(value: Any) -> int:
    """Arrays and objects around the deepest value inside `value`."""
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


def has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(map(has_nul, value))
    if isinstance(value, dict):
        return any(map(has_nul, value)) or any(map(has_nul, value.values()))
    return False


def longest_string(body: bytes) -> int:
    """The longest string token as sent: a plain split, escape by escape."""
    clean = body.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    return max(map(len, clean.split(b'"')[1::2]), default=0)


def verdict(body: bytes) -> str | None:
    try:
        check_shape(body, LIMITS)
    except MalformedBodyError as exc:
        return exc.detail
    return None


@settings(max_examples=500, deadline=None)
@given(value=VALUES, ascii_only=st.booleans(), pad=st.integers(0, 40))
def test_the_checks_agree_with_the_references(value, ascii_only, pad):
    body = (" " * pad).encode() + json.dumps(value, ensure_ascii=ascii_only).encode()
    found = verdict(body)
    too_deep = depth(value) > MAX_DEPTH
    nul = has_nul(value)
    too_long = len(body) > MAX_STRING + 2 and longest_string(body) > MAX_STRING
    if nul:
        assert found is not None
        assert "NUL" in found
    elif too_deep:
        assert found is not None
        assert "too deeply" in found
    elif too_long:
        assert found is not None
        assert f"at most {MAX_STRING}" in found
    else:
        assert found is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'["' + b"a" * 13 + b'"]', "13 bytes"),
        (b'["' + b"a" * 12 + b'"]', None),
        (b'[1, "x", ' + b"1," * 40 + b'1, "' + b"\\u00e9" * 3 + b'"]', "18 bytes"),
        (b'{"' + b"k" * 20 + b'": 1}', "20 bytes"),
        (b"[" + b"0," * 50 + b"0]", None),  # long structural text is no string
        (b'["\\\\"' + b", 1" * 20 + b"]", None),  # an escaped backslash ends the string
        (b'["\\u0000"]', "NUL"),
        (b'["\\\\u0000"]', None),
        (b"[[[[[0]]]]]", "too deeply"),
        (b"[[[[0]]]]", None),
        (b'["caf\xc3\xa9"]', None),
        (b'["caf\xe9"]', "UTF-8"),
        (b"[[[[[[", None),  # not JSON: the decoder names the spot
    ],
)
def test_edges(body, reason):
    found = verdict(body)
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert reason in found
