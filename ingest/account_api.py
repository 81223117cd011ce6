"""Admin API: the key's own account's settings, `GET|PATCH /v1/account`.

A private key, and always the key's own account. Anyone holding one may read the settings
and choose whether unregistered events are accepted; the limits and the shard are the
operator's (an operator key, or `eventgate accounts set`): a tenant must not lift its own
rate. Every process uses a change within EVENTGATE_KEY_CACHE_S. Errors are problem+json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec
import redis.exceptions
import structlog
from aiohttp import web

from ingest.admin import ALLOWED_KEYS
from ingest.body import read_body
from ingest.context import begin_request
from ingest.dialects.native import bearer
from ingest.problems import ForbiddenError, GatewayError, ServiceUnavailableError
from ingest.validation import field_error, malformed_json
from shared.accounts import Account, AccountError, get_account, update_account
from shared.limits import VENDOR_LIMITS, Limit, process_limit, request_limit

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from shared.settings import Settings

T = TypeVar("T")

log = structlog.get_logger("ingest.account_api")

# The APIs whose request limit an account has (people and bulk have vendor defaults).
_APIS = ("native", "catalog", "import", *VENDOR_LIMITS)
_OPERATORS_ONLY = frozenset({"rate", "burst", "process_rate", "shard"})


class InvalidSettingsError(GatewayError):
    status, title, code = 422, "Invalid account settings", "invalid_settings"


class Patch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """PATCH's body: the settings to change; null puts one back to its default."""

    accept_unregistered: bool | msgspec.UnsetType = msgspec.UNSET
    rate: float | msgspec.UnsetType | None = msgspec.UNSET
    burst: int | msgspec.UnsetType | None = msgspec.UNSET
    process_rate: float | msgspec.UnsetType | None = msgspec.UNSET
    shard: int | msgspec.UnsetType | None = msgspec.UNSET


class Bucket(msgspec.Struct, frozen=True):
    rate: float  # per second
    burst: int


class Effective(msgspec.Struct, frozen=True):
    """The limits in force: an API's request bucket (None: unlimited), events/s written."""

    requests: dict[str, Bucket | None]
    process: Bucket | None


class AccountReply(msgspec.Struct, frozen=True):
    account: Account
    effective: Effective


_DECODER = msgspec.json.Decoder(Patch)
_ENCODER = msgspec.json.Encoder()


async def get_settings(request: web.Request) -> web.Response:
    """The key's account: its settings, and the limits they put in force."""
    gateway, _, _ = begin_request(request)
    key = await gateway.keys.authenticate(bearer(request), allow=ALLOWED_KEYS)
    account = await _redis(get_account(gateway.redis, key.account))
    if account is None:
        raise ForbiddenError("the key's account no longer exists")
    return _reply(account, gateway.settings)


async def patch_settings(request: web.Request) -> web.Response:
    """Change some of the key's account's settings.

    Raises:
        MalformedBodyError: not JSON.
        InvalidSettingsError: unknown setting, wrong type, negative rate ...
        ForbiddenError: a limit or the shard, without an operator key.
    """
    gateway, _, _ = begin_request(request)
    key = await gateway.keys.authenticate(bearer(request), allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    body = await read_body(request, gateway.body_limits)
    try:
        patch = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidSettingsError(field_error(exc)[1].message) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None
    changes = {
        f: v for f in Patch.__struct_fields__ if (v := getattr(patch, f)) is not msgspec.UNSET
    }
    if set(changes) & _OPERATORS_ONLY and not key.operator:
        raise ForbiddenError("rate limits and the shard are set by an operator key")
    try:
        updated = await _redis(update_account(gateway.redis, key.account, changes=changes))
    except AccountError as exc:
        raise InvalidSettingsError(str(exc)) from None
    log.info("account.updated", changed=sorted(changes))
    return _reply(updated, gateway.settings)


async def _redis(call: Awaitable[T]) -> T:
    """Raises:
    ServiceUnavailableError: Redis unreachable (503, retry), never a 500.
    """
    try:
        return await call
    except (redis.exceptions.RedisError, OSError):
        raise ServiceUnavailableError(
            "account settings are unavailable: Redis is unreachable", headers={"Retry-After": "1"}
        ) from None


def _reply(account: Account, settings: Settings) -> web.Response:
    def bucket(limit: Limit | None) -> Bucket | None:
        return None if limit is None else Bucket(rate=limit.rate, burst=limit.burst)

    effective = Effective(
        requests={api: bucket(request_limit(account, api, settings)) for api in _APIS},
        process=bucket(process_limit(account, settings)),
    )
    reply = AccountReply(account=account, effective=effective)
    return web.Response(body=_ENCODER.encode(reply), content_type="application/json")


def add_routes(app: web.Application) -> None:
    resource = app.router.add_resource("/v1/account", name="account")
    resource.add_route("GET", get_settings)
    resource.add_route("PATCH", patch_settings)
