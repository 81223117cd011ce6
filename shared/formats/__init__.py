"""Wire formats of every dialect, and their normalisation into canonical events."""

from __future__ import annotations

from collections.abc import Callable

from shared.envelope import EnvelopeError, Part
from shared.event import Event
from shared.formats import native

NORMALISERS: dict[str, Callable[[Part], list[Event]]] = {
    native.DIALECT: native.normalise,
}


def normalise(part: Part) -> list[Event]:
    """Raises:
    EnvelopeError: a dialect this version does not know.
    """
    try:
        normaliser = NORMALISERS[part.dialect]
    except KeyError:
        raise EnvelopeError(f"unknown dialect {part.dialect!r}") from None
    return normaliser(part)
