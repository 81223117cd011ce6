"""Helpers tests share: reading back what the front door queued and the sink stored."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any

from shared import jobs
from shared.envelope import Batch, decode_batch

if TYPE_CHECKING:
    from pathlib import Path

    import fakeredis


async def queued_batches(client: fakeredis.FakeAsyncRedis, queue: str = "unit") -> list[Batch]:
    """Every batch envelope waiting in the rq queue, in order."""
    job_ids = await client.lrange(jobs.queue_key(queue), 0, -1)
    batches = []
    for job_id in job_ids:
        data = await client.hget(jobs.job_key(job_id.decode()), "data")
        batches.append(decode_batch(data))
    return batches


_JSON_COLUMNS = ("identity", "properties", "items")


def sink_rows(sink_path: Path) -> list[dict[str, Any]]:
    """Every row of the SQLite sink's `events` table, JSON columns decoded, by event_id."""
    with sqlite3.connect(sink_path) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM events ORDER BY event_id").fetchall()
    return [
        {k: json.loads(row[k]) if k in _JSON_COLUMNS else row[k] for k in row.keys()}  # noqa: SIM118 - a Row, not a dict
        for row in rows
    ]


def profile_rows(sink_path: Path) -> list[dict[str, Any]]:
    """Every row of the SQLite sink's `profiles` table, attributes decoded, in key order."""
    with sqlite3.connect(sink_path) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT * FROM profiles ORDER BY account, identifier_type, identifier"
        ).fetchall()
    return [{**dict(row), "attributes": json.loads(row["attributes"])} for row in rows]
