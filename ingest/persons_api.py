"""`POST /v1/persons`: create a person directly, so the people dialect finds it at once.

The person is indexed in Redis before the answer; its profile rows follow through the
queue (a part of the `person` dialect, carrying no event) like an event's would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import redis.exceptions
import structlog
from aiohttp import web

from ingest.admission import check_backpressure
from ingest.body import read_body
from ingest.context import begin_request
from ingest.dialects.native import bearer
from ingest.event_checks import EventChecks
from ingest.problems import GatewayError, MalformedBodyError, ServiceUnavailableError
from ingest.validation import field_error, malformed_json
from shared.envelope import Part
from shared.formats.person import DIALECT, PERSON_DECODER, PersonIn
from shared.persons import PersonConflictError, PersonError, identifiers, index_person

if TYPE_CHECKING:
    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.persons")

ROUTE = "persons"
PATH = "/v1/persons"
ALLOWED_KEYS: frozenset[KeyKind] = frozenset({"private"})  # not an event: no browser keys


class InvalidPersonError(GatewayError):
    status, title, code = 422, "Invalid person", "invalid_person"


class PersonConflictHttpError(GatewayError):
    status, title, code = 409, "Identifier belongs to another person", "person_conflict"


class PersonOut(msgspec.Struct, frozen=True):
    id: str
    identifiers: dict[str, str]  # identifier type -> value, as the index compares them
    attributes: dict[str, Any]
    request_id: str


_ENCODER = msgspec.json.Encoder()


async def post_person(request: web.Request) -> web.Response:
    """Index a person under its id and identifiers; 201 if new, 200 if it existed.

    Steps: authenticate (private key); decode the person; index it in Redis, all
    identifiers or none; queue its profile rows; answer.
    """
    gateway, request_id, received_ns = begin_request(request)
    key = await gateway.keys.authenticate(bearer(request), allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    check_backpressure(request)  # it queues profile rows: 503 while the queues are full
    body = await read_body(request, gateway.body_limits)
    person = _decode(body)
    too_big = EventChecks.now(gateway.settings).properties(person.attributes, "attributes")
    if too_big is not None:
        raise InvalidPersonError(f"{too_big.field}: {too_big.message}")
    try:
        created = await index_person(gateway.redis, key.account, person.id, person.identity())
    except PersonConflictError as exc:
        raise PersonConflictHttpError(str(exc)) from None
    except PersonError as exc:
        raise InvalidPersonError(str(exc)) from None
    except (redis.exceptions.RedisError, OSError):
        raise ServiceUnavailableError(
            "cannot index the person: Redis is unreachable", headers={"Retry-After": "1"}
        ) from None
    part = Part(
        account=key.account,
        dialect=DIALECT,
        request_id=request_id,
        received_ns=received_ns,
        count=0,  # no event: only profile rows
        body=body,
    )
    await gateway.enqueuer.submit(part)
    log.info("person.indexed", created=created)
    reply = PersonOut(
        id=person.id.strip(),
        identifiers=dict(identifiers(person.identity())),
        attributes=person.attributes,
        request_id=request_id,
    )
    status = 201 if created else 200
    return web.Response(body=_ENCODER.encode(reply), status=status, content_type="application/json")


def _decode(body: bytes) -> PersonIn:
    """Raises:
    MalformedBodyError: empty or not JSON (line and column named).
    InvalidPersonError: not a person object; the field is named.
    """
    if not body.strip():
        raise MalformedBodyError('empty body; send {"id": ..., "email": ...}')
    try:
        return PERSON_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        found = field_error(exc)[1]
        where = f"{found.field}: " if found.field else ""
        raise InvalidPersonError(f"{where}{found.message}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, post_person, name=ROUTE)
