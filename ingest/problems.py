"""Gateway errors and the middleware that answers them in the route's dialect."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

import msgspec
import structlog
from aiohttp import web

from shared.logging import redact_text

log = structlog.get_logger("ingest")


class FieldError(msgspec.Struct, frozen=True):
    field: str  # dotted path inside the event, e.g. "properties.quantity"
    message: str


class EventErrors(msgspec.Struct, frozen=True):
    """Why the event at `index` of the request was refused."""

    index: int
    errors: list[FieldError]


class GatewayError(Exception):
    """Base of every error the front door answers. Dialects map `code` to their vendor's."""

    status = 500
    title = "Internal error"
    code = "internal"
    # Whether the connection is closed after the answer: the client is misbehaving, or the
    # rest of its body is not read.
    closes_connection = False

    def __init__(
        self,
        detail: str = "",
        *,
        events: list[EventErrors] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.events = events or []
        self.headers = dict(headers or {})


class MalformedBodyError(GatewayError):
    status, title, code = 400, "Malformed request body", "malformed"


class InvalidEventsError(GatewayError):
    status, title, code = 422, "Events failed validation", "invalid"


class TooManyEventsError(GatewayError):
    status, title, code = 422, "Too many events in one request", "too_many_events"


class BodyTooLargeError(GatewayError):
    status, title, code = 413, "Request body too large", "too_large"


class UnsupportedEncodingError(GatewayError):
    status, title, code = 415, "Unsupported content encoding", "unsupported_encoding"


class UnauthorizedError(GatewayError):
    status, title, code = 401, "Missing or invalid API key", "unauthorized"


class ForbiddenError(GatewayError):
    status, title, code = 403, "API key not allowed here", "forbidden"


class BadParameterError(GatewayError):
    """A query parameter or header is missing or malformed; `parameter` names it."""

    status, title, code = 400, "Invalid request parameter", "bad_parameter"

    def __init__(self, detail: str, *, parameter: str) -> None:
        super().__init__(detail)
        self.parameter = parameter


class ServiceUnavailableError(GatewayError):
    status, title, code = 503, "Queue unavailable; retry later", "unavailable"


class RequestTimeoutError(GatewayError):
    """The body did not arrive in time: a slow client does not hold the front door."""

    status, title, code = 408, "Request body too slow", "timeout"
    closes_connection = True


class ClientGoneError(GatewayError):
    """The client went away mid-request: nothing to answer, and no crash either. 499 is
    the status proxies log for it (nginx's "client closed request")."""

    status, title, code = 499, "Client closed the connection", "client_gone"
    closes_connection = True


class TooManyConnectionsError(GatewayError):
    """This client address holds more connections than allowed (ingest.connections)."""

    status, title, code = 429, "Too many connections from this address", "too_many_connections"
    closes_connection = True


class RateLimitedError(GatewayError):
    """Over a request rate limit: nothing was read or queued; `Retry-After` says when."""

    status, title, code = 429, "Too many requests", "rate_limited"


class BacklogFullError(ServiceUnavailableError):
    """Backpressure: the queues or Redis memory are past their high-water mark."""

    title, code = "Queue backlog full; retry later", "unavailable"


# A dialect's way of writing an error: (error, request id) -> response.
ErrorRenderer = Callable[[GatewayError, str], web.Response]


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """RFC 9457 problem details, plus the per-event errors of a batch."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str
    errors: list[EventErrors] = []


_PROBLEM_ENCODER = msgspec.json.Encoder()


def render_problem(error: GatewayError, request_id: str) -> web.Response:
    """The native API's error shape: application/problem+json."""
    body = Problem(
        type=f"https://eventgate.dev/problems/{error.code}",
        title=error.title,
        status=error.status,
        detail=error.detail,
        request_id=request_id,
        errors=error.events,
    )
    return web.Response(
        body=_PROBLEM_ENCODER.encode(body),
        status=error.status,
        content_type="application/problem+json",
        headers=error.headers,
    )


ERROR_RENDERERS = web.AppKey("error_renderers", dict[str, ErrorRenderer])
REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a 4xx/5xx in the route's dialect; never a stack trace."""
    try:
        return await handler(request)
    except GatewayError as exc:
        error = exc
        log.info("request.refused", status=error.status, code=error.code, detail=error.detail)
    except web.HTTPException as exc:
        # aiohttp's own answers (404, 405): keep the status, in the dialect's shape.
        if exc.status < HTTPStatus.BAD_REQUEST:
            raise
        error = GatewayError(exc.reason)
        error.status, error.title, error.code = exc.status, exc.reason, "http"
    except Exception:
        log.exception("request.crashed")
        error = GatewayError("unexpected error; it has been logged")
    response = _render(request, error)
    if error.status in (413, 503) or error.closes_connection:
        # Whatever the client still sends is not read; don't reuse a connection mid-body.
        response.force_close()
    return response


def _render(request: web.Request, error: GatewayError) -> web.Response:
    # "catalog" and "catalog:slash" (the same path with a trailing slash) share a renderer.
    route = (request.match_info.route.name or "").partition(":")[0]
    renderer = request.app[ERROR_RENDERERS].get(route, render_problem)
    response = renderer(_without_secrets(error), _request_id(request))
    response.headers.update(error.headers)
    return response


def _without_secrets(error: GatewayError) -> GatewayError:
    """Errors quote what the client sent (a parameter, a name, msgspec's "Invalid enum value
    'x'"): mask keys and hash emails and phone numbers there, as in the logs, so that an
    answer cached or logged by a proxy carries none."""
    error.detail = redact_text(error.detail)
    error.events = [
        EventErrors(
            index=event.index,
            errors=[FieldError(redact_text(f.field), redact_text(f.message)) for f in event.errors],
        )
        for event in error.events
    ]
    return error


def _request_id(request: web.Request) -> str:
    return str(request.get(REQUEST_ID, ""))
