"""The shape of a JSON body, checked before any dialect decodes it: every route, one place.

A body is refused whole (400, the dialect's "malformed" answer) when it is not UTF-8, holds
a `\\u0000` escape, nests a value inside more than `max_depth` arrays or objects, or holds a
string (a key too) longer than `max_string` bytes as sent. Each check costs a few passes of C
code over the bytes (no Python per value) and is skipped when the body is too small to fail.
Bodies that are not JSON at all pass through: the dialect's decoder names the line and column.
"""

from __future__ import annotations

import msgspec

from ingest.problems import MalformedBodyError
from ingest.validation import line_column


class ShapeLimits:
    __slots__ = ("max_depth", "max_string")

    def __init__(self, max_depth: int, max_string: int) -> None:
        self.max_depth = max_depth
        self.max_string = max_string


def check_shape(body: bytes, limits: ShapeLimits) -> None:
    """Raises:
    MalformedBodyError: invalid UTF-8, a NUL, too deep, or a string too long; where it is.
    """
    _check_utf8(body)
    escapes = b"\\" in body  # most bodies hold no escape at all: one memchr
    # Escaped backslashes blanked to the same length: then what is left of `\u0000` or `\"`
    # really is that escape.
    clean = body.replace(b"\\\\", b"__") if escapes else body
    if escapes:
        _check_nul(body, clean)
    _check_depth(body, limits.max_depth)
    if len(body) > limits.max_string + 2:  # a smaller body cannot hold a longer string
        quotes_only = clean.replace(b'\\"', b"__") if escapes else body
        _check_strings(body, quotes_only, limits.max_string)


def _check_utf8(body: bytes) -> None:
    # msgspec raises UnicodeDecodeError (not a DecodeError) for a bad byte inside a string,
    # and skips undecoded parts (msgspec.Raw) entirely, which the workers decode later.
    if body.isascii():
        return
    try:
        body.decode()
    except UnicodeDecodeError as exc:
        raise MalformedBodyError(
            f"invalid JSON: not UTF-8 at {line_column(body, exc.start)}"
        ) from None


def _check_nul(body: bytes, clean: bytes) -> None:
    # PostgreSQL stores no NUL character in text or jsonb: a job holding one would fail at the
    # sink with every other request's events grouped into it.
    pos = clean.find(b"\\u0000")
    if pos >= 0:
        raise MalformedBodyError(
            f"a string holds \\u0000 (NUL) at {line_column(body, pos)}; it cannot be stored"
        )


def _check_depth(body: bytes, max_depth: int) -> None:
    if body.count(b"[") + body.count(b"{") <= max_depth:  # too few brackets to nest deeper
        return
    try:
        # msgspec's own formatter knows strings and escapes; with indent=1 a value inside n
        # arrays or objects starts a line with exactly n spaces.
        formatted = msgspec.json.format(body, indent=1)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except msgspec.DecodeError:
        return  # not JSON: the dialect's decoder says where
    if b"\n" + b" " * (max_depth + 1) in formatted:
        raise _too_deep(max_depth)


def _too_deep(max_depth: int) -> MalformedBodyError:
    return MalformedBodyError(f"JSON nested too deeply: more than {max_depth} levels")


def _check_strings(body: bytes, clean: bytes, max_string: int) -> None:
    """`clean` is `body` with every escaped quote and backslash blanked: each `"` left opens
    or closes a string. A string longer than max_string leaves a run without any quote that
    covers a whole cell of max_string // 2 bytes: counting quotes cell by cell (in C) finds
    such runs, and the parity of the quotes before one says if it is inside a string."""
    cell = max(max_string // 2, 1)
    quotes = 0  # in clean[:pos]
    pos, size = 0, len(clean)
    while pos < size:
        end = min(pos + cell, size)
        found = clean.count(b'"', pos, end)
        if found or end - pos < cell:
            quotes, pos = quotes + found, end
            continue
        start = clean.rfind(b'"', 0, pos)  # opens the run (or -1: the body's start)
        close = clean.find(b'"', end)
        if close < 0:
            return  # never closed: not JSON, the dialect's decoder says where
        if quotes % 2 and close - start - 1 > max_string:
            raise MalformedBodyError(
                f"a string of {close - start - 1} bytes at {line_column(body, start)}; "
                f"at most {max_string}"
            )
        pos = close  # no quote up to there: `quotes` still counts clean[:pos]
