"""Wire formats of every dialect, and their normalisation into canonical events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.envelope import EnvelopeError, Part
from shared.formats import bulk, catalog, deferred, import_, native, people, person

if TYPE_CHECKING:
    from collections.abc import Callable

    from shared.event import Event
    from shared.persons import Sighting

NORMALISERS: dict[str, Callable[[Part], list[Event]]] = {
    native.DIALECT: native.normalise,
    catalog.DIALECT: catalog.normalise,
    import_.DIALECT: import_.normalise,
    people.DIALECT: people.normalise,
    bulk.DIALECT: bulk.normalise,
    person.DIALECT: person.normalise,
    deferred.DIALECT: deferred.normalise,
}

# Dialects whose parts update profiles beyond their events' identities (attributes, or a
# person created without an event). Workers upsert every event's identity anyway.
PROFILE_READERS: dict[str, Callable[[Part], list[Sighting]]] = {
    bulk.DIALECT: bulk.profiles,
    person.DIALECT: person.profiles,
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


def read_profiles(part: Part) -> list[Sighting]:
    """The profile updates a part holds besides its events' identities (often none)."""
    reader = PROFILE_READERS.get(part.dialect)
    return reader(part) if reader else []
