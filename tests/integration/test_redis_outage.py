"""Redis going away under a running front door and worker: 503 at once, never a hang, and
recovery by itself once Redis is back, with every accepted event kept (AOF) and stored once.

Each test runs a Redis server of its own on a fixed port (so it can come back on the same
address); the machine's shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
import redis.asyncio as aioredis

from shared import accounts, jobs, keys
from shared.envelope import decode_batch
from shared.errors import ConfigError
from shared.redis_server import find_server_binary
from shared.settings import Settings
from tests.processes import Processes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

try:
    SERVER_BINARY = find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary: {exc}", allow_module_level=True)

ACCOUNT = "shop"
QUEUE = Settings().queue
# EVENTGATE_REDIS_TIMEOUT_S defaults to 2 s; a 503 may take that long, plus the HTTP round trip.
SLOWEST_503_S = 2.5
RECOVERY_BOUND_S = 10.0


def port_outside_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range.

    While our Redis is down, clients keep connecting to its port; a port inside the ephemeral
    range may then be picked as a client's own local port (a TCP self-connect), which would
    keep the port busy and make the restart on the same port fail.
    """
    low = 32768
    with suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class OwnRedis:
    """A Redis (Valkey) server of the test's own on a fixed port, with an AOF in `directory`:
    killed, stopped and started again on the same port and data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port_outside_ephemeral_range()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_path = directory / "redis.log"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and return once it answers PING (its AOF loaded)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        args = [
            str(SERVER_BINARY),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        with self._log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = self._log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"own Redis on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with redis.Redis(
                host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5
            ) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, no final AOF rewrite."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: Valkey's orderly shutdown (fsync the AOF, close client connections)."""
        self._signal(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing is answered (too slow)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        assert self.process is not None
        assert self.process.poll() is None, "own Redis died before the test stopped it"
        self.process.send_signal(signum)
        self.process.wait(15)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    yield server
    server.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def processes(tmp_path: Path, own_redis: OwnRedis, db: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path, own_redis.url, sink=f"sqlite:///{db}", job_heartbeat_s="2")
    yield procs
    procs.close()


@pytest.fixture
def key(own_redis: OwnRedis) -> str:
    """A private key of ACCOUNT, made before the front door starts."""

    async def make() -> str:
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            await accounts.create_account(client, ACCOUNT)
            return await accounts.create_key(client, ACCOUNT, "private")
        finally:
            await client.aclose()

    return asyncio.run(make())


# --- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    elapsed_s: float

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    procs: Processes, method: str, path: str, body: bytes | None = None, key: str | None = None
) -> Answer:
    """One request on a fresh connection; how long it took to the last byte of the answer."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", procs.port, timeout=30)
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return Answer(response.status, response.headers, data, time.monotonic() - started)


class Producer:
    """Posts batches of uniquely identified events and remembers what was answered 202."""

    def __init__(self, procs: Processes, key: str, batch: int = 10) -> None:
        self.procs = procs
        self.key = key
        self.batch = batch
        self.accepted: dict[str, int] = {}  # request id -> events, for every 202
        self.accepted_ids: set[str] = set()
        self.refused: set[str] = set()  # request ids answered 503

    def post(self) -> Answer:
        prefix = uuid.uuid4().hex[:12]
        ids = [f"{prefix}-{i}" for i in range(self.batch)]
        events = [{"name": "sale", "id": i, "properties": {"n": n}} for n, i in enumerate(ids)]
        answer = request(self.procs, "POST", "/v1/events", json.dumps(events).encode(), self.key)
        if answer.status == 202:
            reply = answer.json()
            assert reply["accepted"] == self.batch
            self.accepted[reply["request_id"]] = self.batch
            self.accepted_ids.update(ids)
        elif answer.status == 503:
            self.refused.add(answer.json()["request_id"])
        return answer


def assert_unavailable(answer: Answer) -> None:
    """A 503 the way a producer needs it: retry later, in problem+json, nothing internal."""
    text = answer.body.decode(errors="replace")
    assert answer.status == 503, text
    retry_after = answer.headers.get("Retry-After", "")
    assert re.fullmatch(r"[0-9]+", retry_after), f"Retry-After {retry_after!r}"
    content_type = answer.headers.get("Content-Type", "")
    assert content_type.split(";")[0].strip() == "application/problem+json", content_type
    problem = answer.json()
    assert problem["status"] == 503
    assert problem["type"].endswith("/unavailable")
    assert problem["request_id"]
    assert "Traceback" not in text
    assert 'File "' not in text


def queued_requests(url: str) -> dict[str, int]:
    """Request id -> events of every part in the jobs waiting in the queue."""
    with redis.Redis.from_url(url) as client:
        parts: dict[str, int] = {}
        for job_id in client.lrange(jobs.queue_key(QUEUE), 0, -1):
            data = client.hget(jobs.job_key(job_id.decode()), "data")
            assert data is not None, f"job {job_id!r} is queued but its hash is gone"
            for part in decode_batch(data).parts:
                assert part.request_id not in parts
                parts[part.request_id] = part.count
        return parts


def stored_ids(db: Path) -> list[str]:
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            return [row[0] for row in conn.execute("SELECT event_id FROM events")]
        except sqlite3.OperationalError:  # the worker has not created the table yet
            return []


def until(check: Callable[[], bool], what: str, timeout_s: float) -> float:
    """Poll `check` until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def outage(producer: Producer, requests: int = 6, spacing_s: float = 0.5) -> list[Answer]:
    """Requests while Redis is down, spread over more than the key cache's 2 s, so both the
    enqueue (key still cached) and the key lookup meet the outage."""
    answers = []
    for _ in range(requests):
        answers.append(producer.post())
        time.sleep(spacing_s)
    return answers


def recover(own_redis: OwnRedis, producer: Producer, how: str = "sigkill") -> tuple[float, float]:
    """Bring Redis back (started again on the same port and dir, or resumed after SIGSTOP);
    (s until it answers PING, s until the front door's first 202)."""
    restarted = time.monotonic()
    if how == "sigstop":
        own_redis.resume()
        until(own_redis.answers, "Redis to answer after SIGCONT", RECOVERY_BOUND_S)
    else:
        own_redis.start()
    answering = time.monotonic() - restarted
    until(
        lambda: producer.post().status == 202,
        "a 202 after Redis came back",
        RECOVERY_BOUND_S,
    )
    return answering, time.monotonic() - restarted


def log_events(log: Path) -> list[str]:
    """The `event` of every JSON log line of a process."""
    names = []
    for line in log.read_text(errors="replace").splitlines():
        with suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                names.append(str(record.get("event")))
    return names


# --- the front door ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "how",
    [
        "sigkill",
        "sigterm",
        "sigstop",
    ],
)
def test_redis_down_answers_503_at_once_then_recovers_by_itself(
    how, own_redis, processes, key, tmp_path
):
    """With its Redis killed, stopped or stalled, the front door answers every POST 503 with
    a whole Retry-After in problem+json within ~2.5 s while /healthz stays 200; once Redis is
    back it answers 202 again by itself, and the queue holds exactly what was answered 202."""
    processes.start_web()
    producer = Producer(processes, key)
    for _ in range(3):
        assert producer.post().status == 202

    {"sigkill": own_redis.kill, "sigterm": own_redis.stop, "sigstop": own_redis.pause}[how]()
    answers = outage(producer)
    health = request(processes, "GET", "/healthz")

    for answer in answers:
        assert_unavailable(answer)
    slowest = max(answer.elapsed_s for answer in answers)
    assert slowest < SLOWEST_503_S, [round(a.elapsed_s, 3) for a in answers]
    assert health.status == 200
    assert health.json() == {"status": "ok"}
    assert health.elapsed_s < 1.0

    answering_s, first_202_s = recover(own_redis, producer, how)
    for _ in range(3):
        assert producer.post().status == 202
    assert processes.web is not None
    assert processes.web.poll() is None, "the front door was restarted or died"

    assert "request.crashed" not in log_events(tmp_path / "web.log")
    print(  # noqa: T201 - the figures the report quotes (pytest -s)
        f"\n[{how}] 503 latency: slowest {slowest:.3f} s, all "
        f"{[round(a.elapsed_s, 3) for a in answers]}; /healthz {health.elapsed_s:.3f} s; "
        f"back to PING {answering_s:.2f} s, to first 202 {first_202_s:.2f} s"
    )
    # The AOF kept every acknowledged job across the kill. A dead Redis queued nothing that
    # was answered 503; a stalled one may run a transaction it received before the 503 went
    # out (README: resend with the same ids), but never anything beyond what was sent.
    queued = queued_requests(own_redis.url)
    assert set(producer.accepted) <= set(queued)
    if how == "sigstop":
        assert set(queued) <= set(producer.accepted) | producer.refused
    else:
        assert queued == producer.accepted


# --- the worker --------------------------------------------------------------------------------


class SinkLock:
    """An exclusive write lock on the SQLite sink: a worker's write waits (up to its 5 s busy
    timeout) until release, so the worker is surely in the middle of a job."""

    def __init__(self, db: Path) -> None:
        self._conn = sqlite3.connect(db, isolation_level=None)
        self._conn.execute("BEGIN EXCLUSIVE")
        self._held = True

    def release(self) -> None:
        if self._held:
            self._conn.execute("ROLLBACK")
            self._held = False

    def close(self) -> None:
        self.release()
        self._conn.close()


def counters(url: str) -> dict[str, int]:
    with redis.Redis.from_url(url) as client:
        return {k.decode(): int(v) for k, v in client.hgetall(keys.counters(ACCOUNT)).items()}


def settled(url: str) -> bool:
    """No job left to run (queue, intermediate list, started and scheduled registries empty,
    read in one MULTI so a job moving between them is not missed), and every accepted event
    counted as persisted or duplicate."""
    with redis.Redis.from_url(url) as client, client.pipeline(transaction=True) as pipe:
        pipe.llen(jobs.queue_key(QUEUE))
        pipe.llen(f"{jobs.queue_key(QUEUE)}:intermediate")
        pipe.zcard(f"rq:wip:{QUEUE}")
        pipe.zcard(f"rq:scheduled:{QUEUE}")
        pipe.hgetall(keys.counters(ACCOUNT))
        *pending, raw = pipe.execute()
    counts = {k.decode(): int(v) for k, v in raw.items()}
    done = counts.get("persisted", 0) + counts.get("duplicate", 0)
    return sum(pending) == 0 and done >= counts.get("accepted", 0)


def jobs_started(url: str) -> int:
    """Entries of the queue's StartedJobRegistry (rq's `wip` sorted set)."""
    with redis.Redis.from_url(url) as client:
        return int(client.zcard(f"rq:wip:{QUEUE}"))


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "moment",
    [
        "idle",
        "mid-job",
    ],
)
def test_worker_rides_out_redis_outage_and_drains_exactly_once(
    moment, own_redis, processes, key, db, tmp_path
):
    """A worker running while Redis is killed (idle, or in the middle of a job) and restarted
    stays alive without a crash loop, then drains the queue: every accepted event is in the
    sink exactly once."""
    processes.start_web()
    worker = processes.start_worker()
    producer = Producer(processes, key, batch=20)
    for _ in range(3):
        assert producer.post().status == 202
    until(lambda: set(stored_ids(db)) == producer.accepted_ids, "the worker to store", 30)

    if moment == "idle":
        # Rows are visible before rq's bookkeeping of the job ends: wait until it has, and the
        # worker is back waiting on the queue (BLMOVE), where rq retries connection errors.
        until(lambda: settled(own_redis.url), "the worker to finish its jobs", 10)
        time.sleep(0.5)
        own_redis.kill()
    else:
        lock = SinkLock(db)
        try:
            assert producer.post().status == 202
            until(lambda: jobs_started(own_redis.url) > 0, "the worker to start the job", 10)
            own_redis.kill()
        finally:
            lock.close()  # the write goes through; the job's bookkeeping meets the outage
    killed_at = time.monotonic()
    for answer in outage(producer, requests=12):  # ~6 s down
        assert_unavailable(answer)
    assert worker.poll() is None, (
        f"the worker exited during the outage: {processes.log('worker-0')}"
    )

    down_s = time.monotonic() - killed_at
    _, first_202_s = recover(own_redis, producer)
    for _ in range(3):
        assert producer.post().status == 202

    drain_s = until(
        lambda: set(stored_ids(db)) >= producer.accepted_ids,
        "every accepted event in the sink after the outage",
        30,
    )
    # Every job done for good, not still being rerun: README promises recovery in seconds.
    settle_s = until(lambda: settled(own_redis.url), "every job finished and counted", 30)
    stored = stored_ids(db)
    assert sorted(stored) == sorted(producer.accepted_ids), "lost, duplicated or unexpected rows"
    assert worker.poll() is None, f"the worker exited: {processes.log('worker-0')}"
    assert len(processes.workers) == 1

    events = log_events(tmp_path / "worker-0.log")
    restarts = events.count("worker.restarting")
    assert restarts <= 5, f"rq's loop restarted {restarts} times: a crash loop"
    counts = counters(own_redis.url)
    # A job cut off by the kill between its sink write and its count runs again and counts
    # its events as duplicates: persisted + duplicate covers every accepted event.
    assert counts["accepted"] == len(producer.accepted_ids)
    assert counts["persisted"] <= len(producer.accepted_ids)
    assert counts["persisted"] + counts.get("duplicate", 0) >= counts["accepted"]
    print(  # noqa: T201 - the figures the report quotes (pytest -s)
        f"\n[worker {moment}] down {down_s:.1f} s, first 202 {first_202_s:.2f} s after "
        f"restart; rows {drain_s:.2f} s after the last POST, settled {settle_s:.2f} s later; "
        f"rq loop restarts {restarts}; "
        f"counters {counts}"
    )
