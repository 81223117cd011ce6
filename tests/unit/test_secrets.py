"""No key, email, phone number or raw identity in logs, metrics or error bodies: a run through
every dialect, with identities made of them and with bad keys, scanned for each."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from structlog.testing import capture_logs

from shared import accounts
from shared.logging import redact
from shared.persons import index_person
from tests.dialects import ACCOUNT, DEFINITION, Keys, make_account

EMAIL = "ann.secret@example.com"
PHONE = "+41 79 302 67 27"
PHONE_DIGITS = "41793026727"
EXTERNAL = "ext-secret-7"
PERSON = "person-secret-9"
CUSTOMER = "cust-secret-5"
IDENTITIES = [EMAIL, PHONE, PHONE_DIGITS, EXTERNAL, PERSON, CUSTOMER]
QUIET = {"request_limits": False}


def secrets_of(keys: Keys, *more: str) -> list[str]:
    """Each key's secret part, and the identity values."""
    return [key.split(".", 1)[1] for key in (keys.private, keys.public, *more)] + IDENTITIES


def requests(keys: Keys) -> list[tuple[str, str, dict[str, str], Any]]:
    """(method, path, headers, JSON body) through every dialect, the admin API and wrong turns."""
    bearer = {"Authorization": f"Bearer {keys.private}"}
    identity = {"email": EMAIL, "phone": PHONE, "external_id": EXTERNAL}
    people = "/peopleevents/2/persons/{}/definitions/" + DEFINITION + "/events?identifierType={}"
    bulk_profile = {"email": EMAIL, "phone_number": PHONE, "external_id": EXTERNAL}
    bulk_event = {
        "type": "event",
        "attributes": {"metric": {"data": {"type": "metric", "attributes": {"name": "V"}}}},
    }

    def bulk(profile: dict[str, Any], events: list[Any]) -> dict[str, Any]:
        return {
            "data": {
                "type": "event-bulk-create",
                "attributes": {
                    "profile": {"data": {"type": "profile", "attributes": profile}},
                    "events": {"data": events},
                },
            }
        }

    return [
        ("POST", "/v1/persons", bearer, {"id": PERSON, "email": EMAIL, "phone": PHONE}),
        ("POST", "/v1/events", bearer, [{"name": "e", "identity": identity}]),
        ("POST", "/v1/events", bearer, [{"name": 5, "identity": identity}]),
        ("POST", "/v1/events", bearer, {"name": "e", "identity": {EMAIL: PHONE}, "x": 1}),
        ("POST", "/events", bearer, [{"type": "EventLogin", "customerCode": CUSTOMER}]),
        ("POST", "/events", bearer, [{"type": "EventSale", "customerCode": CUSTOMER}]),
        (
            "POST",
            f"/api/v1/events?service_id={ACCOUNT}",
            {"access_token": keys.private},
            {
                "common": {"identity": {"email": EMAIL, "phone_no": PHONE}},
                "events": [
                    {
                        "event_log_id": "b0c9cf18-f3c0-4879-bb2e-92c65858dabc",
                        "event_name": "df_login",
                        "event_datetime": "2024-06-24T06:01:48.501Z",
                    },
                    {"event_log_id": EXTERNAL, "event_name": EMAIL},
                    {
                        "event_log_id": "c0c9cf18-f3c0-4879-bb2e-92c65858dabc",
                        "event_name": EMAIL,  # unregistered: its error quotes it
                        "event_datetime": "2024-06-24T06:01:48.501Z",
                    },
                ],
            },
        ),
        ("POST", people.format(quote(EMAIL), "EMAIL"), bearer, {"properties": {}}),
        ("POST", people.format(quote(PHONE), "PHONE"), bearer, {"properties": {}}),
        ("POST", people.format(PERSON, "ID"), bearer, {"properties": {}}),
        ("POST", people.format(EXTERNAL, "EXTERNAL_ID"), bearer, {"properties": {}}),
        ("GET", people.format(quote(EMAIL), "EMAIL"), bearer, None),  # 405
        ("POST", people.format(quote(EMAIL), EMAIL), bearer, {}),  # bad identifierType
        (
            "POST",
            f"/client/event-bulk-create/?company_id={keys.public}",
            {"revision": "2024-10-15"},
            bulk(bulk_profile, [bulk_event]),
        ),
        (
            "POST",
            f"/client/event-bulk-create/?company_id={keys.public}",
            {"revision": "2024-10-15"},
            bulk({**bulk_profile, "title": 5}, [{"type": EMAIL}]),
        ),
        ("POST", f"/client/event-bulk-create/?company_id={keys.private}", {"revision": "x"}, {}),
        ("GET", f"/v1/definitions/{quote(EMAIL)}", bearer, None),
        ("GET", f"/nowhere/{quote(EMAIL)}", bearer, None),
    ]


def bad_keys(keys: Keys) -> list[dict[str, str]]:
    """A right key id with a wrong secret, a malformed key, a key of another scheme."""
    key_id, secret = keys.private.split(".", 1)
    return [
        {"Authorization": f"Bearer {key_id}.{secret[::-1]}"},
        {"Authorization": f"Bearer {keys.private}x"},
        {"Authorization": f"Basic {keys.private}"},
        {"Authorization": f"Bearer {keys.public}"},
        {"access_token": f"{key_id}.{secret[::-1]}"},
    ]


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [secret for secret in secrets if secret in text]


@pytest.fixture
async def keys(fake_redis) -> Keys:
    made = await make_account(fake_redis)
    await index_person(fake_redis, ACCOUNT, PERSON, {"email": EMAIL, "phone": PHONE})
    return made


async def test_logs_metrics_and_error_bodies_hold_no_secret(gateway, fake_redis, keys, run_worker):
    client = await gateway(**QUIET)
    revoked = await accounts.create_key(fake_redis, ACCOUNT, "private")
    await accounts.revoke_key(fake_redis, revoked)
    secrets = secrets_of(keys, revoked)
    answers: list[str] = []
    # What is written: the pipeline's own redaction (configure_logging) included.
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, redact]) as logs:
        for method, path, headers, body in requests(keys):
            data = None if body is None else json.dumps(body)
            response = await client.request(method, path, data=data, headers=headers)
            assert response.status < 500, (path, await response.text())
            if response.status >= 400:
                answers.append(await response.text())
        for headers in [*bad_keys(keys), {"Authorization": f"Bearer {revoked}"}]:
            for path in ("/v1/events", f"/api/v1/events?service_id={ACCOUNT}", "/v1/persons"):
                response = await client.post(path, data=b"{}", headers=headers)
                assert 400 <= response.status < 500  # a public key may write events
                answers.append(await response.text())
        run_worker()  # the workers' lines too: the events above are written to the sink
    assert logs, "nothing was logged: the capture is broken"
    assert leaks(repr(logs), secrets) == []
    assert [a for a in answers if leaks(a, secrets)] == []
    metrics = await (await client.get("/metrics")).text()
    assert leaks(metrics, secrets) == []
    own = await client.get("/v1/stats", headers={"Authorization": f"Bearer {keys.private}"})
    assert leaks(await own.text(), secrets) == []


async def test_the_people_405_logs_the_route_not_the_person(gateway, keys):
    """The 405 handler once bound the raw path (a phone number) to the request's log lines."""
    client = await gateway(**QUIET)
    path = f"/peopleevents/2/persons/{quote(PHONE)}/definitions/d/events"
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        response = await client.get(path, headers={"Authorization": f"App {keys.private}"})
    assert response.status == 405
    assert logs
    assert leaks(repr(logs), [PHONE, PHONE_DIGITS, quote(PHONE)]) == []
