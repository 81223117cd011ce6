"""Accounts and API keys, kept in Redis where every front door and worker sees them."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from shared import keys
from shared.errors import EventgateError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import redis.asyncio as aioredis

KeyKind = Literal["private", "public"]
_KIND_TAG: dict[KeyKind, str] = {"private": "sk", "public": "pk"}
# eg_sk_<key id>.<secret>: the id finds the record, the secret is checked against its hash.
_KEY_FORMAT = re.compile(r"eg_(sk|pk)_([0-9a-f]{12})\.([A-Za-z0-9_-]{20,64})")
_KEY_PREFIX = re.compile(r"^eg_(sk|pk)_")
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class AccountError(EventgateError):
    """An account or key operation that cannot be done; the message says why."""


class Account(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    created_at: datetime
    # Whether events whose name has no registered definition are accepted.
    accept_unregistered: bool = True
    # The shard queue of its events; None: by a hash of the name.
    shard: int | None = None
    # Request rate limit (requests/s, 0: none) and burst of each API it uses; None: the API's
    # default (see shared/limits.py). Events/s the workers write for it; None: the setting's.
    rate: NonNegative | None = None
    burst: Annotated[int, msgspec.Meta(ge=1)] | None = None
    process_rate: NonNegative | None = None


# What update_account may change: everything but the identity.
_SETTABLE = frozenset(Account.__struct_fields__) - {"name", "created_at"}


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    account: str
    kind: KeyKind
    secret_sha256: str  # never the secret itself
    created_at: datetime
    # An operator key (always private) also reads every account's figures (/v1/stats).
    operator: bool = False
    # A lower request limit of this key's own, besides its account's (see shared/limits.py).
    rate: NonNegative | None = None
    burst: Annotated[int, msgspec.Meta(ge=1)] | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    match = _KEY_FORMAT.fullmatch(presented)
    return (match.group(2), match.group(3)) if match else None


def secret_matches(record: ApiKey, secret: str) -> bool:
    """Constant-time check of a presented secret against the stored hash."""
    return hmac.compare_digest(record.secret_sha256, _digest(secret))


async def create_account(client: aioredis.Redis, name: str) -> Account:
    """Raises:
    AccountError: bad name, or the account exists.
    """
    if not _ACCOUNT_NAME.fullmatch(name):
        raise AccountError(
            f"invalid account name {name!r}: use 1-64 letters, digits, '_', '.' or '-'"
        )
    account = Account(name=name, created_at=datetime.now(UTC))
    if not await client.hsetnx(keys.ACCOUNTS, name, msgspec.json.encode(account)):
        raise AccountError(f"account {name!r} already exists")
    return account


async def get_account(client: aioredis.Redis, name: str) -> Account | None:
    raw = await client.hget(keys.ACCOUNTS, name)
    return None if raw is None else msgspec.json.decode(raw, type=Account)


async def update_account(
    client: aioredis.Redis,
    name: str,
    *,
    accept_unregistered: bool | None = None,
    changes: Mapping[str, object] | None = None,
) -> Account:
    """Change an account's settings; every process sees them within its cache time.
    `changes` sets other settings by name (`rate`, `burst`, `process_rate`, `shard`); a None
    there puts one back to its default.

    Raises:
        AccountError: no such account, or a change that is not a valid setting.
    """
    account = await get_account(client, name)
    if account is None:
        raise AccountError(f"no account {name!r}")
    fields = {**msgspec.structs.asdict(account), **(changes or {})}
    if accept_unregistered is not None:
        fields["accept_unregistered"] = accept_unregistered
    unknown = sorted(set(changes or {}) - _SETTABLE)
    if unknown:
        raise AccountError(f"unknown account setting(s): {', '.join(unknown)}")
    try:  # the same checks as reading it back: a negative rate never reaches Redis
        updated = msgspec.convert(fields, Account)
    except msgspec.ValidationError as exc:
        raise AccountError(f"invalid account setting: {exc}") from None
    await client.hset(keys.ACCOUNTS, name, msgspec.json.encode(updated))
    return updated


async def list_accounts(client: aioredis.Redis) -> list[Account]:
    raw = await client.hgetall(keys.ACCOUNTS)
    return sorted(
        (msgspec.json.decode(v, type=Account) for v in raw.values()), key=lambda a: a.name
    )


async def create_key(
    client: aioredis.Redis, account: str, kind: KeyKind, *, operator: bool = False
) -> str:
    """Make a key for `account` and return it; only its hash is stored, so this is the
    one time anybody sees it. An `operator` key is a private key that also sees every
    account's figures.

    Raises:
        AccountError: the account does not exist, or a public key asked to be an operator's.
    """
    if operator and kind != "private":
        raise AccountError("an operator key is a private key; it cannot be public")
    if await get_account(client, account) is None:
        raise AccountError(
            f"no account {account!r}; create it first: eventgate accounts create {account}"
        )
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiKey(
        key_id=key_id,
        account=account,
        kind=kind,
        secret_sha256=_digest(secret),
        created_at=datetime.now(UTC),
        operator=operator,
    )
    async with client.pipeline(transaction=True) as pipe:
        # Pipeline methods only queue commands (redis-py types them as awaitables).
        _ = pipe.hset(keys.API_KEYS, key_id, msgspec.json.encode(record))
        _ = pipe.sadd(keys.account_keys(account), key_id)
        await pipe.execute()
    return f"eg_{_KIND_TAG[kind]}_{key_id}.{secret}"


async def lookup_key(client: aioredis.Redis, key_id: str) -> ApiKey | None:
    raw = await client.hget(keys.API_KEYS, key_id)
    return None if raw is None else msgspec.json.decode(raw, type=ApiKey)


async def find_key(client: aioredis.Redis, key: str) -> ApiKey:
    """The record of a key given in full, by its visible part (eg_sk_<id>), or by its id.

    Raises:
        AccountError: no such key.
    """
    parsed = parse_key(key)
    key_id = parsed[0] if parsed else _KEY_PREFIX.sub("", key)
    record = await lookup_key(client, key_id)
    if record is None:
        raise AccountError(f"no key with id {key_id!r}")
    return record


async def revoke_key(client: aioredis.Redis, key: str) -> ApiKey:
    """Revoke by key id or by the full key. Front doors stop accepting it once their
    cache entry expires (`EVENTGATE_KEY_CACHE_S`).

    Raises:
        AccountError: no such key.
    """
    record = await find_key(client, key)
    key_id = record.key_id
    async with client.pipeline(transaction=True) as pipe:
        _ = pipe.hdel(keys.API_KEYS, key_id)
        _ = pipe.srem(keys.account_keys(record.account), key_id)
        await pipe.execute()
    return record
