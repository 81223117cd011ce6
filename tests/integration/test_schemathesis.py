"""schemathesis against the live front door (a real process, on an embedded Redis of this
test's own), from its own `/openapi.json`: no 5xx, answers that match the document (status,
content type, headers, schema), requests that are refused when they break it, and no hang.
A fixed seed and a bounded number of examples per operation keep it deterministic and short.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared.errors import ConfigError
from shared.redis_server import find_server_binary, redis_url_for
from shared.settings import load_settings
from tests.dialects import ACCOUNT, Keys, make_account
from tests.processes import Processes

if TYPE_CHECKING:
    from collections.abc import Iterator

    from schemathesis import Case

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

try:
    find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary to embed: {exc}", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
EXAMPLES = 100  # per operation and mode: about 20 operations, two cores, well under 3 minutes
REQUEST_TIMEOUT_S = 10  # an answer slower than this is a hang
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# A request without the key is refused: with valid data only (negative cases carry a key
# made invalid on purpose, which `authenticate` replaces).
POSITIVE_CHECKS = [*CHECKS, ignored_auth]
RUN: Counter[str] = Counter()  # cases per operation, for the report
FAILED: dict[str, str] = {}


@pytest.fixture(scope="module")
def front_door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Processes, Keys]]:
    """The front door as `eventgate serve` runs it, and an account's keys."""
    data = tmp_path_factory.mktemp("schemathesis")
    with redis_url_for(load_settings({"EVENTGATE_DATA_DIR": str(data / "redis")})) as url:

        async def account() -> Keys:
            client = aioredis.Redis.from_url(url)
            try:
                return await make_account(client)
            finally:
                await client.aclose()

        keys = asyncio.run(account())
        # Rate limits off: a fuzzer is a very busy client, and 429 would be most of the run.
        procs = Processes(data, url, request_limits="false")
        procs.start_web()
        try:
            yield procs, keys
        finally:
            procs.close()
            _report()


@pytest.fixture(scope="module")
def api(front_door: tuple[Processes, Keys]) -> BaseSchema:
    procs, _ = front_door
    return schemathesis.openapi.from_url(f"{procs.url}/openapi.json")


# schemathesis's own pytest plugin (schema.parametrize) does not run on pytest 9: each
# operation's cases are drawn here from its strategy, by hypothesis, the way it would.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_front_door_keeps_its_contract(
    api: BaseSchema, front_door: tuple[Processes, Keys], mode: GenerationMode
) -> None:
    """Any request the document allows (positive) or breaks (negative) is answered as the
    document says, for every operation it lists."""
    _, keys = front_door
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        label = f"{mode.value} {operation.method.upper()} {operation.path}"
        try:
            fuzz(operation, mode, keys, label)
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing in it to break: no parameter, no body
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every one is tried
            FAILED[label] = failures[label] = str(exc)[:2000]
    assert failures == {}


def fuzz(operation: APIOperation, mode: GenerationMode, keys: Keys, label: str) -> None:
    """EXAMPLES cases of `operation`, each sent with a valid key and checked."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the fixed seed: the same cases on every run
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # report the first failure, unshrunk
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        authenticate(case, keys)
        RUN[label] += 1
        checks = POSITIVE_CHECKS if mode is GenerationMode.POSITIVE else CHECKS
        case.call_and_validate(checks=checks, timeout=REQUEST_TIMEOUT_S)

    run()


def authenticate(case: Case, keys: Keys) -> None:
    """A valid key, where each route looks for one; and the import dialect's own account.
    Not where a negative case broke the headers or the query on purpose: that is its test."""
    if not _broken(case, ParameterLocation.HEADER):
        case.headers = {
            "Authorization": f"Bearer {keys.private}",
            "access_token": keys.private,
            **(case.headers or {}),
        }
    if case.query is None or _broken(case, ParameterLocation.QUERY):
        return
    if "company_id" in case.query:
        case.query["company_id"] = keys.public
    if case.query.get("service_id") and RUN.total() % 4:
        case.query["service_id"] = ACCOUNT  # mostly its own: the rest tries another's


def _broken(case: Case, location: ParameterLocation) -> bool:
    return case.meta is not None and case.meta.is_negative_at(location)


def _report() -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    report = {
        "cases": RUN.total(),
        "failures": FAILED,
        "operations": dict(sorted(RUN.items())),
    }
    (ARTIFACTS / "schemathesis.json").write_text(json.dumps(report, indent=2) + "\n")
