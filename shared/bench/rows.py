"""The benchmark's events three ways: native bodies, queued jobs, and the rows they become."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from shared import jobs
from shared.envelope import Batch, Part, encode_batch
from shared.event import new_event_id
from shared.load.bodies import EventSource

if TYPE_CHECKING:
    from collections.abc import Mapping

_JSON = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Workload:
    """`jobs` envelopes of `parts` requests of `batch` native events each, and the same
    events as sink rows (column -> value), for the plain insert to write."""

    account: str
    envelopes: list[bytes]
    rows: list[dict[str, Any]]

    @property
    def events(self) -> int:
        return len(self.rows)


def make_workload(account: str, *, jobs_count: int, parts: int, batch: int) -> Workload:
    """Jobs as the front door's group commit writes them: bodies as received, in envelopes."""
    source = EventSource(f"w-{account}")
    envelopes: list[bytes] = []
    rows: list[dict[str, Any]] = []
    received_ns = time.time_ns()
    received_at = _timestamp(datetime.fromtimestamp(received_ns / 1e9, tz=UTC))
    for _ in range(jobs_count):
        batch_parts = []
        for _ in range(parts):
            events, _ = source.events(batch)
            batch_parts.append(
                Part(
                    account=account,
                    dialect="native",
                    request_id=new_event_id(),
                    received_ns=received_ns,
                    count=batch,
                    body=_JSON.encode(events),
                )
            )
            rows.extend(_row(account, event, received_at) for event in events)
        envelopes.append(encode_batch(Batch(parts=batch_parts)))
    return Workload(account, envelopes, rows)


def _timestamp(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def _row(account: str, event: Mapping[str, Any], received_at: str) -> dict[str, Any]:
    """The row a sink stores for a native event (see workers.sinks.base.event_row)."""
    return {
        "account": account,
        "event_id": event["id"],
        "name": event["name"],
        "occurred_at": _timestamp(datetime.fromisoformat(event["timestamp"])),
        "received_at": received_at,
        "source": "native",
        "identity": _JSON.encode(event.get("identity", {})).decode(),
        "properties": _JSON.encode(event.get("properties", {})).decode(),
        "items": _JSON.encode(event.get("items", [])).decode(),
        "value": event.get("value"),
        "currency": event.get("currency"),
    }


def job_records(
    template: Mapping[str, str | bytes | int], envelopes: list[bytes], events_per_job: int
) -> list[tuple[str, dict[str, str | bytes | int]]]:
    """(job id, rq job hash) for each envelope, fresh ids each call."""
    return [
        (new_event_id(), jobs.job_fields(template, envelope, events_per_job))
        for envelope in envelopes
    ]
