"""The front door's view of an account: its settings and compiled definitions, cached."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions

from ingest.problems import FieldError, ServiceUnavailableError
from ingest.validation import field_error
from shared import keys
from shared.accounts import Account, get_account
from shared.definitions import CompiledDefinition, compile_definitions, list_definitions

if TYPE_CHECKING:
    import redis.asyncio as aioredis


@dataclass(frozen=True, slots=True)
class AccountView:
    account: Account
    definitions: Mapping[str, CompiledDefinition]
    definitions_version: int

    def check_event(
        self,
        name: str,
        properties: Mapping[str, Any],
        *,
        builtins: Mapping[str, CompiledDefinition] | None = None,
        registered_only: bool = False,
    ) -> FieldError | None:
        """Why an event of this name and properties is refused, or None if it is fine.

        The account's own definition wins over the dialect's built-in one. Without either,
        the event passes unless the account (or the dialect) accepts registered events only.
        """
        definition = self.definitions.get(name) or (builtins or {}).get(name)
        if definition is None:
            if registered_only or not self.account.accept_unregistered:
                return FieldError(field="name", message=f"event {name!r} is not registered")
            return None
        error = definition.check(properties)
        if error is None:
            return None
        _, field = field_error(error)
        path = f"properties.{field.field}" if field.field else "properties"
        return FieldError(field=path, message=field.message)


class AccountCache:
    """Account settings and definitions, trusted for `ttl_s`; definitions are re-read and
    recompiled only when their version counter moved."""

    def __init__(self, client: aioredis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, AccountView | None]] = {}

    def cached_shard(self, name: str) -> int | None:
        """The account's own shard setting as last read (no I/O: the flusher calls it)."""
        cached = self._entries.get(name)
        view = cached[1] if cached else None
        return view.account.shard if view else None

    async def view(self, name: str) -> AccountView | None:
        """None if there is no such account.

        Raises:
            ServiceUnavailableError: Redis unreachable.
        """
        now = time.monotonic()
        cached = self._entries.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            view = await self._load(name, cached[1] if cached else None)
        except redis.exceptions.RedisError:
            raise ServiceUnavailableError(
                "cannot read the account: Redis is unreachable", headers={"Retry-After": "1"}
            ) from None
        self._entries[name] = (now + self._ttl_s, view)
        return view

    async def _load(self, name: str, previous: AccountView | None) -> AccountView | None:
        account = await get_account(self._client, name)
        if account is None:
            return None
        version = int(await self._client.get(keys.definitions_version(name)) or 0)
        if previous is not None and previous.definitions_version == version:
            return AccountView(account, previous.definitions, version)
        definitions = compile_definitions(await list_definitions(self._client, name))
        return AccountView(account, definitions, version)
