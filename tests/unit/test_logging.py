"""shared.logging: one format for structlog and stdlib records, nothing sensitive in clear."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re

import pytest
import structlog
from structlog.testing import capture_logs

from shared.logging import configure_logging, get_logger, mask_identity, redact
from shared.settings import Settings

KEY_TAIL = "S3cr3tS3cr3tS3cr3tS3cr3t"
KEY = f"eg_sk_0123456789ab.{KEY_TAIL}"
KEY_MASKED = "eg_sk_0123456789ab.***"
EMAIL = "Alice.Smith@Example.com"
EMAIL_HASHED = "email:" + hashlib.sha256(EMAIL.lower().encode()).hexdigest()[:8]
PHONE = "+4915112345678"
PHONE_HASHED = "phone:" + hashlib.sha256(PHONE.encode()).hexdigest()[:8]
US_PHONE_HASHED = "phone:" + hashlib.sha256(b"5551234567").hexdigest()[:8]
PG_URL = "postgresql://eventgate:hunter2@db.internal:5432/events"
PG_URL_MASKED = "postgresql://eventgate:***@db.internal:5432/events"
# Everything that must never reach a log line as written.
SECRETS = (KEY_TAIL, EMAIL, EMAIL.lower(), "Alice.Smith", PHONE, "7946 0958", "hunter2")
ANSI = re.compile(r"\x1b\[")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    rq_worker = logging.getLogger("rq.worker")
    saved = (list(root.handlers), root.level, rq_worker.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    rq_worker.setLevel(saved[2])
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def configure(log_format: str = "json", log_level: str = "info") -> io.StringIO:
    out = io.StringIO()
    settings = Settings(log_format=log_format, log_level=log_level)  # type: ignore[arg-type]
    configure_logging(settings, stream=out)
    return out


def lines(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    for secret in SECRETS:
        assert secret not in text
    return [json.loads(line) for line in text.splitlines()]


def redacted(**fields: object) -> dict[str, object]:
    with capture_logs(processors=[redact]) as logs:
        structlog.get_logger().info("test", **fields)
    (entry,) = logs
    return entry


# --- the redact processor ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("api_key", KEY, KEY_MASKED),
        ("key", "not-an-eventgate-key", "***"),
        ("authorization", f"Bearer {KEY}", KEY_MASKED),
        ("Authorization", "Basic dXNlcjpodW50ZXIy", "***"),
        ("access_token", "abc", "***"),
        ("refresh_token", "abc", "***"),
        ("password", "hunter2", "***"),
        ("db_password", "hunter2", "***"),
        ("secret", 12345, "***"),
        ("token", None, None),
        ("password", "", ""),
        ("revision", "3f9a1c2b7e", "3f9a1c2b7e"),
        ("key_id", "0123456789ab", "0123456789ab"),
        ("redis_url", "redis://:s3cr3t@cache:6379/0", "redis://:***@cache:6379/0"),
        ("sink_url", PG_URL, PG_URL_MASKED),
        (
            "dsn",
            "host=db user=eg password=hunter2 dbname=x",
            "host=db user=eg password=*** dbname=x",
        ),
        (
            "url",
            "postgresql://eventgate@db.internal/events",
            "postgresql://eventgate@db.internal/events",
        ),
    ],
)
def test_fields_named_like_secrets_are_masked(field, value, expected):
    assert redacted(**{field: value})[field] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"welcome {EMAIL}!", f"welcome {EMAIL_HASHED}!"),
        (f"GET /v1/users/{EMAIL}?x=1", f"GET /v1/users/{EMAIL_HASHED}?x=1"),
        (f"call {PHONE} now", f"call {PHONE_HASHED} now"),
        # The same number however it is written: one hash.
        ("call +49 151 1234 5678 now", f"call {PHONE_HASHED} now"),
        ("(555) 123-4567 or 555-123-4567.", f"{US_PHONE_HASHED} or {US_PHONE_HASHED}."),
        (f"Authorization: Bearer {KEY}", f"Authorization: Bearer {KEY_MASKED}"),
        ("Authorization: Bearer abcdefghijklmnop", "Authorization: Bearer ***"),
        (f"using {KEY} for acme", f"using {KEY_MASKED} for acme"),
        ("eg_pk_0123456789ab.AbCdEfGhIjKlMnOpQrStUv", "eg_pk_0123456789ab.***"),
        (f"connect {PG_URL} failed", f"connect {PG_URL_MASKED} failed"),
        ("GET /cb?state=1&token=abc123 HTTP/1.1", "GET /cb?state=1&token=*** HTTP/1.1"),
        ("{'password': 'hunter2', 'n': 1}", "{'password': '***', 'n': 1}"),
    ],
)
def test_sensitive_text_inside_strings_is_replaced(text, expected):
    assert redacted(msg=text)["msg"] == expected


@pytest.mark.parametrize(
    "text",
    [
        "batch.flushed",
        "0190a6c2-1234-7abc-8def-0123456789ab",
        "12345678-1234-1234-1234-123456789012",
        "2024-05-01 12:30:00",
        "2024-05-01T12:30:00.123456+00:00",
        "took 1715000000 ms for 1000 events from 192.168.100.200, v1.2.3",
        "http://127.0.0.1:8080/v1/events?limit=100",
        "tokens=5 secretary: Bob",
        "ab",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert redacted(msg=text)["msg"] == text


def test_redaction_walks_nested_values_without_touching_the_callers_objects():
    headers = {"Authorization": f"Bearer {KEY}", "X-Trace": "t-1"}
    payload = {"headers": headers, "to": [EMAIL, {"phone": PHONE}], "n": 3}

    entry = redacted(payload=payload, pair=(EMAIL, 1), ids={EMAIL: 2})

    assert entry["payload"] == {
        "headers": {"Authorization": KEY_MASKED, "X-Trace": "t-1"},
        "to": [EMAIL_HASHED, {"phone": PHONE_HASHED}],
        "n": 3,
    }
    assert entry["pair"] == [EMAIL_HASHED, 1]
    assert entry["ids"] == {EMAIL_HASHED: 2}
    assert headers["Authorization"] == f"Bearer {KEY}"  # the caller's dict is unchanged
    assert payload["to"] == [EMAIL, {"phone": PHONE}]


def test_objects_are_expanded_then_redacted():
    @dataclasses.dataclass
    class Signup:
        email: str
        password: str

    class Opaque:
        def __repr__(self) -> str:
            return f"<Opaque {EMAIL}>"

    entry = redacted(signup=Signup(EMAIL, "hunter2"), obj=Opaque(), raw=EMAIL.encode())

    assert entry["signup"] == {"email": EMAIL_HASHED, "password": "***"}
    assert entry["obj"] == f"<Opaque {EMAIL_HASHED}>"
    assert entry["raw"] == EMAIL_HASHED


def test_mask_identity_hashes_every_field_stably():
    identity = {"email": EMAIL, "phone": "+49 151 1234 5678", "user_id": "u-42"}

    masked = mask_identity(identity)

    assert masked == mask_identity(dict(identity))
    assert masked["email"] == EMAIL_HASHED  # same hash as an address found in free text
    assert masked["phone"] == PHONE_HASHED
    assert re.fullmatch(r"user_id:[0-9a-f]{8}", masked["user_id"])
    assert mask_identity({"email": EMAIL.upper()})["email"] == EMAIL_HASHED
    assert mask_identity({"user_id": "u-43"})["user_id"] != masked["user_id"]


# --- configured end to end ---------------------------------------------------------------------


def test_json_lines_carry_nothing_sensitive_and_hash_stably():
    out = configure("json")
    log = get_logger("eventgate.test")
    structlog.contextvars.bind_contextvars(request_id="req-1")

    log.info("key.used", api_key=KEY)
    log.info("welcome %s", EMAIL)
    log.info("welcome %s", EMAIL)
    log.info("sms.sent", to=PHONE)
    log.info("request", headers={"Authorization": f"Bearer {KEY}"}, note=f"Authorization: {KEY}")
    log.info("sink.connect", sink=PG_URL, redis_url="redis://:s3cr3t@cache:6379/0")

    used, welcome, again, sms, request, sink = lines(out)
    assert used["api_key"] == KEY_MASKED
    assert used["event"] == "key.used"
    assert used["level"] == "info"
    assert used["logger"] == "eventgate.test"
    assert used["request_id"] == "req-1"
    assert str(used["timestamp"]).endswith("Z")
    assert welcome["event"] == again["event"] == f"welcome {EMAIL_HASHED}"
    assert sms["to"] == PHONE_HASHED
    assert request["headers"] == {"Authorization": KEY_MASKED}
    assert request["note"] == f"Authorization: {KEY_MASKED}"
    assert sink["sink"] == PG_URL_MASKED
    assert sink["redis_url"] == "redis://:***@cache:6379/0"


def test_stdlib_records_become_the_same_json_lines():
    out = configure("json")
    structlog.contextvars.bind_contextvars(request_id="req-2")

    logging.getLogger("aiohttp.access").info('%s "GET /v1/users/%s" 200', "10.0.0.1", EMAIL)
    logging.getLogger("eventgate.other").warning("Authorization: Bearer %s", KEY)

    access, other = lines(out)
    assert access["event"] == f'10.0.0.1 "GET /v1/users/{EMAIL_HASHED}" 200'
    assert access["logger"] == "aiohttp.access"
    assert access["level"] == "info"
    assert access["request_id"] == "req-2"
    assert "timestamp" in access
    assert "_record" not in access
    assert other["event"] == f"Authorization: Bearer {KEY_MASKED}"
    assert other["level"] == "warning"


def test_exceptions_are_a_redacted_traceback_field():
    out = configure("json")
    log = get_logger()

    def fail() -> None:
        raise ValueError(f"no account for {EMAIL}")

    try:
        fail()
    except ValueError:
        log.exception("lookup.failed")
        logging.getLogger("rq.job").exception("job failed")

    for entry in lines(out):
        assert entry["level"] == "error"
        exception = str(entry["exception"])
        assert exception.startswith("Traceback (most recent call last):")
        assert "in fail" in exception
        assert f"ValueError: no account for {EMAIL_HASHED}" in exception


def test_console_mode_is_readable_text():
    out = configure("console")
    get_logger("eventgate.test").info("batch.flushed", accepted=3, api_key=KEY, to=EMAIL)
    logging.getLogger("aiohttp.access").info("GET / 200")

    text = out.getvalue()
    first, second = text.splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    assert "batch.flushed" in first
    assert "accepted=3" in first
    assert KEY_MASKED in first
    assert EMAIL_HASHED in first
    assert "GET / 200" in second
    assert "aiohttp.access" in second
    assert not ANSI.search(text)  # not a terminal: no colour codes
    for secret in SECRETS:
        assert secret not in text


def test_console_mode_shows_a_redacted_traceback():
    out = configure("console")

    def fail() -> None:
        raise RuntimeError(PG_URL)

    try:
        fail()
    except RuntimeError:
        get_logger().exception("sink.down")

    text = out.getvalue()
    assert "Traceback (most recent call last):" in text
    assert f"RuntimeError: {PG_URL_MASKED}" in text
    assert "hunter2" not in text


def test_auto_is_json_into_a_pipe_and_coloured_console_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    piped = configure("auto")
    get_logger().info("hello")
    assert json.loads(piped.getvalue())["event"] == "hello"

    tty = FakeTTY()
    configure_logging(Settings(log_format="auto"), stream=tty)
    get_logger().info("hello")
    assert "hello" in tty.getvalue()
    assert ANSI.search(tty.getvalue())


def test_level_applies_to_structlog_and_stdlib():
    out = configure("json", log_level="warning")
    get_logger().info("dropped")
    logging.getLogger("aiohttp.access").info("dropped")
    get_logger().warning("kept")
    logging.getLogger("aiohttp.access").warning("kept")

    assert [entry["event"] for entry in lines(out)] == ["kept", "kept"]


def test_rq_worker_is_quiet_at_info_and_talks_at_debug():
    out = configure("json", log_level="info")
    logging.getLogger("rq.worker").info("default: Job OK (abc)")
    logging.getLogger("rq.worker").warning("moved to failed")
    assert [entry["event"] for entry in lines(out)] == ["moved to failed"]

    out = configure("json", log_level="debug")
    logging.getLogger("rq.worker").info("default: Job OK (abc)")
    assert [entry["event"] for entry in lines(out)] == ["default: Job OK (abc)"]


def test_configuring_again_replaces_rather_than_duplicates():
    first = configure("json")
    second = configure("json")
    logging.getLogger("aiohttp.access").info("once")

    assert first.getvalue() == ""
    assert [entry["event"] for entry in lines(second)] == ["once"]


def test_a_value_json_cannot_encode_still_gives_a_line():
    out = configure("json")
    get_logger().info("odd", counts={(1, 2): 3}, text="lone \udcff surrogate")

    (entry,) = lines(out)
    assert entry["event"] == "odd"
    assert "(1, 2)" in str(entry["counts"])
