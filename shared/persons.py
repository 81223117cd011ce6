"""Persons: an account's people, found by any of their identifiers through a Redis index.

A person has an id and identifiers (identifier type -> value: EMAIL, PHONE, EXTERNAL_ID,
the people API's channel ids, customer codes, anonymous ids ...). The index, a hash per
account (`shared.keys.persons`), maps "<TYPE>:<value>" to the person id. Front doors read
it (the people dialect's lookups); `persons create` and workers write it (every event's
identity), so a person first seen through any dialect is found by all of them.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import msgspec

from shared import keys
from shared.accounts import get_account
from shared.errors import EventgateError
from shared.scripts import lua

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import redis.asyncio as aioredis

# The people API's identifierType enum (seed 002), in the order its documentation lists.
PEOPLE_TYPES = (
    "ID",
    "EXTERNAL_ID",
    "PHONE",
    "EMAIL",
    "LINE",
    "FACEBOOK",
    "TELEGRAM",
    "PUSH",
    "WEB_PUSH",
    "LIVE_CHAT",
    "VIBER_BOTS",
    "INSTAGRAM",
    "INSTAGRAM_DM",
    "TWITTER",
    "APPLE_BUSINESS_CHAT",
    "KAKAO_SANGDAM",
    "GOOGLE_BUSINESS_MESSAGES",
)
ID = "ID"

# Identity keys the dialects send, by identifier type. Any other key is its own type,
# upper-cased (`facebook` -> FACEBOOK, `web_push` -> WEB_PUSH): the people enum needs no entry.
_TYPE_OF_KEY = {
    "person_id": ID,
    "phone": "PHONE",
    "phone_number": "PHONE",  # bulk
    "phone_no": "PHONE",  # import, as sent
    "customer_code": "CUSTOMER_CODE",  # catalog
    "kakao_user_id": "KAKAO",  # import
    "kakao_id": "KAKAO",
    "line_user_id": "LINE",  # import
    "line_id": "LINE",
    "_kx": "KX",  # bulk: the vendor's tracking token
}
# The identity key an event of the people dialect carries for its identifierType.
_KEY_OF_TYPE = {ID: "person_id", "PHONE": "phone"}
# When one sighting's identifiers name different known persons, the first wins.
_PRIORITY = {t: i for i, t in enumerate((ID, "EXTERNAL_ID", "CUSTOMER_CODE", "EMAIL", "PHONE"))}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NOT_WORD = re.compile(r"\W+")
# Phones are compared by their digits: "+41 (79) 302-67-27" is "41793026727".
_PHONE_NOISE = re.compile(r"[\s().\-/]+")


class PersonError(EventgateError):
    """A person operation that cannot be done; the message says why."""


class PersonConflictError(PersonError):
    """An identifier given for a person already belongs to another one."""

    def __init__(self, identifier_type: str, owner: str) -> None:
        super().__init__(f"the {identifier_type} identifier already belongs to person {owner!r}")
        self.identifier_type = identifier_type
        self.owner = owner


Identifier = tuple[str, str]  # (identifier type, normalised value)


# Workers ask for every event's keys, which are few and repeat: keep the recent answers.
@lru_cache(maxsize=1024)
def identifier_type(identity_key: str) -> str:
    """The identifier type an event's identity key names (`phone_no` -> PHONE)."""
    snake = _CAMEL.sub("_", identity_key).lower()
    return _TYPE_OF_KEY.get(snake) or _NOT_WORD.sub("_", snake).strip("_").upper()


def identity_key(kind: str) -> str:
    """The identity key that stands for an identifier type in canonical events."""
    return _KEY_OF_TYPE.get(kind, kind.lower())


def normalise_value(kind: str, value: str) -> str:
    """The form identifiers are compared in: emails case-insensitive, phones by digits."""
    value = value.strip()
    if kind == "EMAIL":
        return value.lower()
    if kind == "PHONE":
        return _PHONE_NOISE.sub("", value).removeprefix("+")
    return value


def index_field(kind: str, value: str) -> str:
    """The person index's field for an identifier (already normalised)."""
    return f"{kind}:{value}"


def identifiers(identity: Mapping[str, object]) -> tuple[Identifier, ...]:
    """An identity's identifiers, normalised, deduplicated, the strongest first.

    Values that are not strings, or empty once normalised, identify nobody and are left out.
    """
    found: dict[Identifier, None] = {}
    for key, raw in identity.items():
        if not isinstance(raw, str):
            continue
        kind = identifier_type(key)
        value = normalise_value(kind, raw)
        if kind and value:
            found[kind, value] = None
    return tuple(sorted(found, key=lambda i: _PRIORITY.get(i[0], len(_PRIORITY))))


def strip_nulls(value: Any) -> Any:  # noqa: ANN401 - any JSON value
    """`value` without the null members of its objects, at any depth.

    Profile attributes are stored this way: a null at the top level of an update means
    "unset this attribute", and nowhere else, so that both SQL sinks merge alike.
    """
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def attribute_update(attributes: Mapping[str, Any], unset: Iterable[str] = ()) -> dict[str, Any]:
    """A profile update: the attributes to set (nulls inside them dropped), and None for
    each attribute to unset."""
    update = {k: strip_nulls(v) for k, v in attributes.items() if v is not None}
    update.update(dict.fromkeys((k for k in unset if k not in update), None))
    return update


class Sighting(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """A person seen by the workers: the identifiers sent together, when, and attributes."""

    account: str
    identifiers: tuple[Identifier, ...]  # the strongest first, as `identifiers` sorts them
    first_seen: datetime
    last_seen: datetime
    attributes: dict[str, Any] = {}  # a profile update, as `attribute_update` makes it


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the sink's `profiles` table: one identifier of one person."""

    account: str
    identifier_type: str
    identifier: str
    person_id: str
    attributes: dict[str, Any]  # a profile update: merged into the stored attributes
    first_seen: datetime
    last_seen: datetime


def merge_profiles(profiles: Iterable[Profile]) -> list[Profile]:
    """One profile per (account, identifier type, identifier), in key order: later
    attributes win, seen times widen, the first person id stays.

    A SQL upsert may touch a row once per statement, and rows in key order lock in one order.
    """
    merged: dict[tuple[str, str, str], Profile] = {}
    for profile in profiles:
        key = (profile.account, profile.identifier_type, profile.identifier)
        known = merged.get(key)
        if known is None:
            merged[key] = profile
            continue
        merged[key] = msgspec.structs.replace(
            known,
            attributes={**known.attributes, **profile.attributes},
            first_seen=min(known.first_seen, profile.first_seen),
            last_seen=max(known.last_seen, profile.last_seen),
        )
    return [merged[key] for key in sorted(merged)]


async def find_person(client: aioredis.Redis, account: str, kind: str, value: str) -> str | None:
    """The id of the account's person with this identifier (normalised here), or None."""
    found = await client.hget(
        keys.persons(account), index_field(kind, normalise_value(kind, value))
    )
    return None if found is None else _text(found)


async def index_person(
    client: aioredis.Redis, account: str, person_id: str, identity: Mapping[str, str]
) -> bool:
    """Index a person under its id and identifiers, at once, all or nothing. True if it
    is new; False if it existed (identifiers it did not have yet are added).

    Raises:
        PersonError: no such account, or an empty person id.
        PersonConflictError: an identifier already belongs to another person.
    """
    if await get_account(client, account) is None:
        raise PersonError(f"no account {account!r}")
    person_id = normalise_value(ID, person_id)
    if not person_id:
        raise PersonError("a person id must not be empty")
    fields = [index_field(ID, person_id)]
    fields += [index_field(k, v) for k, v in identifiers(identity) if k != ID]
    script = client.register_script(lua("index_person"))
    status, detail = await script(keys=[keys.persons(account)], args=[person_id, *fields])
    if int(status) == _CONFLICT:
        owner, _, field = _text(detail).partition("\n")
        raise PersonConflictError(field.partition(":")[0], owner)
    return int(status) == _CREATED


def _text(reply: bytes | str) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


# index_person.lua's answers.
_CREATED, _EXISTED, _CONFLICT = 0, 1, 2
