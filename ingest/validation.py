"""Turning msgspec's decode errors into what a producer can act on."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Generic, TypeVar

import msgspec

from ingest.problems import EventErrors, FieldError, MalformedBodyError, TooManyEventsError

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

# msgspec reports a byte offset; people read lines and columns.
_BYTE = re.compile(r"\s*\(byte (\d+)\)$")
_PATH = re.compile(r" - at `\$(?:\[(\d+)\])?\.?(.*)`$")
_MISSING = re.compile(r"Object missing required field `(.*)`")
# msgspec stops at Python's recursion limit (about 1000 levels): a 4xx, never a 500.
_TOO_DEEP = "arrays or objects nested too deeply"
# A batch with thousands of bad events lists the first ones; the rest are counted.
MAX_LISTED = 100
# How many invalid events the one-line `detail` names; `errors` lists them all.
_IN_DETAIL = 3


def malformed_json(body: bytes, exc: msgspec.DecodeError | RecursionError) -> MalformedBodyError:
    """A 400 naming the line and column of the problem, and what was expected."""
    if isinstance(exc, RecursionError):
        return MalformedBodyError(f"invalid JSON: {_TOO_DEEP}")
    message = str(exc).removeprefix("JSON is malformed: ")
    match = _BYTE.search(message)
    if "truncated" in message:
        pos, message = len(body), 'the body ends early: a closing ] or } or " is missing'
    elif match:
        pos = min(int(match.group(1)), len(body))
    else:
        return MalformedBodyError(f"invalid JSON: {message}")
    reason = _BYTE.sub("", message)
    return MalformedBodyError(f"invalid JSON at {line_column(body, pos)}: {reason}")


def line_column(body: bytes, pos: int) -> str:
    """`line L, column C` of the byte at `pos`: what people read, not byte offsets."""
    line = body.count(b"\n", 0, pos) + 1
    column = pos - (body.rfind(b"\n", 0, pos) + 1) + 1
    return f"line {line}, column {column}"


def field_error(exc: msgspec.ValidationError) -> tuple[int | None, FieldError]:
    """(batch index if the path has one, the field and message) of one validation error."""
    message = str(exc)
    index, field = None, ""
    match = _PATH.search(message)
    if match:
        index = int(match.group(1)) if match.group(1) is not None else None
        field = re.sub(r"\[(\d+)\]", r".\1", match.group(2))
        message = message[: match.start()]
    missing = _MISSING.fullmatch(message)
    if missing:
        # Name the missing field itself, not the object it is missing from.
        field = f"{field}.{missing.group(1)}" if field else missing.group(1)
    return index, FieldError(field=field, message=message)


class Checked(Generic[T]):
    """A batch after validation: (index, item) of the valid items, errors of the others."""

    __slots__ = ("rejected", "valid")

    def __init__(self, valid: list[tuple[int, T]], rejected: list[EventErrors]) -> None:
        self.valid = valid
        self.rejected = rejected

    def check(self, check: Callable[[T], FieldError | None]) -> Checked[T]:
        """Move the valid items `check` finds fault with to `rejected`, in index order."""
        valid: list[tuple[int, T]] = []
        rejected: list[EventErrors] = []
        for index, item in self.valid:
            error = check(item)
            if error is None:
                valid.append((index, item))
            else:
                rejected.append(EventErrors(index=index, errors=[error]))
        if rejected:
            rejected = sorted(self.rejected + rejected, key=lambda e: e.index)
        return Checked(valid, rejected or self.rejected)


def decode_each(raws: list[msgspec.Raw], decoder: msgspec.json.Decoder[T]) -> Checked[T]:
    """Decode items one by one, so that every invalid one is listed, not just the first."""
    valid: list[tuple[int, T]] = []
    rejected: list[EventErrors] = []
    for index, raw in enumerate(raws):
        try:
            valid.append((index, decoder.decode(raw)))
        except msgspec.ValidationError as exc:
            rejected.append(EventErrors(index=index, errors=[field_error(exc)[1]]))
        except RecursionError:
            rejected.append(EventErrors(index=index, errors=[FieldError("", _TOO_DEEP)]))
    return Checked(valid, rejected)


def check_count(count: int, max_events: int) -> None:
    """Raises:
    TooManyEventsError: more than `max_events`.
    MalformedBodyError: none at all.
    """
    if count > max_events:
        raise TooManyEventsError(f"{count} events; at most {max_events} per request")
    if count == 0:
        raise MalformedBodyError("empty array; send at least one event")


def summarise(errors: list[EventErrors]) -> str:
    shown = ", ".join(
        f"#{e.index}: {e.errors[0].field or 'event'}: {e.errors[0].message}"
        for e in errors[:_IN_DETAIL]
    )
    more = f" and {len(errors) - _IN_DETAIL} more" if len(errors) > _IN_DETAIL else ""
    return f"{len(errors)} invalid event(s): {shown}{more}"
