"""Wire formats of every dialect, and their normalisation into canonical events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.envelope import EnvelopeError, Part
from shared.formats import native

if TYPE_CHECKING:
    from collections.abc import Callable

    from shared.event import Event

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
