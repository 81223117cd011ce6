"""rq's crash-safety holes, each provoked against real front door and worker processes and a
Redis of the test's own: whatever happens to a worker, every accepted event lands in the sink
exactly once, within seconds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
import uuid
from contextlib import closing, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Self, TypeVar

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from shared import accounts, jobs, keys
from shared.errors import ConfigError
from shared.redis_server import find_server_binary, redis_url_for
from shared.settings import Settings, load_settings
from tests.processes import Processes
from workers.main import check_eviction_policy
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

try:
    find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary: {exc}", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
HEARTBEAT_S = 2
QUEUE = Settings().queue
QUEUE_KEY = jobs.queue_key(QUEUE)
INTERMEDIATE_KEY = IntermediateQueue.get_intermediate_queue_key(QUEUE_KEY)
ACCOUNT = "shop"
RECOVERY_BOUND_S = 15.0  # stock rq 3.0: 808 s for a killed worker, > 60 s for a stranded job

T = TypeVar("T")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own (embedded), so killing things never touches shared ones."""
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})
    with redis_url_for(settings) as url:
        yield url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def processes(tmp_path: Path, redis_url: str, db: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path, redis_url, sink=f"sqlite:///{db}", job_heartbeat_s=str(HEARTBEAT_S))
    yield procs
    # SIGKILL reaches stopped workers too; nothing is left behind.
    procs.close()


@pytest.fixture
async def key(redis_url: str) -> str:
    client = aioredis.Redis.from_url(redis_url)
    await accounts.create_account(client, ACCOUNT)
    key = await accounts.create_key(client, ACCOUNT, "private")
    await client.aclose()
    return key


# --- helpers -----------------------------------------------------------------------------------


async def until(check: Callable[[], T], what: str, timeout_s: float = 15.0) -> T:
    """Poll `check` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)
    return value


def named_events(prefix: str, count: int = 20) -> list[dict[str, Any]]:
    return [{"name": "sale", "id": f"{prefix}-{i}", "properties": {"n": i}} for i in range(count)]


async def post_events(processes: Processes, key: str, events: list[dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{processes.url}/v1/events", json=events, headers=headers) as resp,
    ):
        assert resp.status == 202, f"{await resp.text()}\n{processes.log('web')}"


def stored_ids(db: Path) -> list[str]:
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            return [row[0] for row in conn.execute("SELECT event_id FROM events")]
        except sqlite3.OperationalError as exc:  # a worker creating the file has no table yet
            if "no such table" in str(exc):
                return []
            raise


def counters(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.counters(ACCOUNT)).items()}


async def registered(client: redis.Redis, process: subprocess.Popen[bytes]) -> str:
    """Wait until `process` is an rq worker on the queue (its sink is open by then); its name."""

    def name() -> str | None:
        assert process.poll() is None, f"worker {process.pid} exited with {process.returncode}"
        for worker_key in client.smembers(f"rq:workers:{QUEUE}"):
            if client.hget(worker_key, "pid") == str(process.pid).encode():
                return worker_key.decode().removeprefix("rq:worker:")
        return None

    return await until(name, f"worker {process.pid} to register")


def started_entries(client: redis.Redis) -> list[tuple[str, str, float]]:
    """(job id, execution id, expiry) of every StartedJobRegistry entry, without rq's cleanup."""
    registry = StartedJobRegistry(QUEUE, connection=client)
    entries = []
    for member, score in client.zrange(registry.key, 0, -1, withscores=True):
        job_id, execution_id = member.decode().split(":", 1)
        entries.append((job_id, execution_id, score))
    return entries


def worker_pid_of(client: redis.Redis, job_id: str, execution_id: str) -> int:
    """The pid of the worker process running this execution."""
    execution = Execution.fetch(execution_id, job_id, connection=client)
    return int(client.hget(f"rq:worker:{execution.worker_name}", "pid"))


def records(log: Path) -> list[dict[str, Any]]:
    """The JSON records of a process's log (tracebacks and other lines left out)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        with suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                found.append(record)
    return found


def flushed_batches(log: Path) -> list[dict[str, Any]]:
    """The `batch.flushed` records (one per job run that reached the sink) of a worker's log."""
    return [r for r in records(log) if r.get("event") == "batch.flushed"]


def children_of(pid: int) -> list[int]:
    """Child processes of `pid`: /proc/<pid>/task/*/children, or where the kernel lacks those
    files (no CONFIG_PROC_CHILDREN), every process whose parent is `pid`."""
    files = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if files:
        return [int(child) for file in files for child in file.read_text().split()]
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def processes_holding(path: Path) -> list[int]:
    """Pids, other than this one, with the SQLite file (or its WAL/shm) open."""
    names = {str(path), f"{path}-wal", f"{path}-shm"}
    holders = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with suppress(OSError):
            if str(fd.readlink()) in names:
                holders.add(int(fd.parent.parent.name))
    holders.discard(os.getpid())
    return sorted(holders)


class SinkLock:
    """An exclusive write lock on the SQLite sink: a worker's write blocks until release."""

    def __init__(self, db: Path) -> None:
        self._conn = sqlite3.connect(db, isolation_level=None)
        self._conn.execute("BEGIN EXCLUSIVE")
        self._held = True

    def release(self) -> None:
        if self._held:
            self._conn.execute("ROLLBACK")
            self._held = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
        self._conn.close()


def record_seconds(**seconds: float) -> None:
    """Merge measured recovery times into test-artifacts/recovery.json."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "recovery.json"
    figures: dict[str, Any] = {}
    with suppress(OSError, ValueError):
        figures = json.loads(path.read_text())
    figures.update({name: round(value, 2) for name, value in seconds.items()})
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


async def all_stored(db: Path, ids: list[str], timeout_s: float = 30.0) -> None:
    await until(lambda: set(stored_ids(db)) >= set(ids), "every event in the sink", timeout_s)


def assert_once(db: Path, ids: list[str]) -> None:
    stored = stored_ids(db)
    assert sorted(stored) == sorted(ids), "events lost, duplicated or unexpected"


# --- 1. a worker SIGKILLed mid-job -------------------------------------------------------------


class Killed(NamedTuple):
    ids: list[str]  # of the events sent
    job_id: str
    at: float  # time.monotonic() of the kill


async def kill_worker_mid_batch(
    processes: Processes,
    client: redis.Redis,
    db: Path,
    key: str,
    prefix: str,
    before_kill: Callable[[subprocess.Popen[bytes]], None] = lambda _: None,
) -> Killed:
    """Start the front door and a worker, send a batch, SIGKILL the worker while its write
    waits on the locked sink (`before_kill` sees it running the batch), release the sink."""
    processes.start_web()
    victim = processes.start_worker()
    await registered(client, victim)
    sent = named_events(prefix)
    with SinkLock(db) as lock:
        await post_events(processes, key, sent)
        job_id, execution_id, _ = (await until(lambda: started_entries(client), "a start"))[0]
        assert worker_pid_of(client, job_id, execution_id) == victim.pid
        before_kill(victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        lock.release()
    assert stored_ids(db) == []
    return Killed([e["id"] for e in sent], job_id, killed_at)


@pytest.mark.timeout(60)
async def test_sigkilled_worker_batch_runs_again_within_seconds(processes, sync_redis, key, db):
    """A batch whose worker is SIGKILLed mid-write is run again by another worker within
    seconds, its events land once, and nothing is parked as failed."""
    killed = await kill_worker_mid_batch(processes, sync_redis, db, key, "kill")
    processes.start_worker()

    await all_stored(db, killed.ids)
    recovery_s = time.monotonic() - killed.at
    record_seconds(worker_sigkill_to_rows_s=recovery_s)
    assert recovery_s < RECOVERY_BOUND_S
    assert_once(db, killed.ids)
    assert FailedJobRegistry(QUEUE, connection=sync_redis).get_job_ids(cleanup=False) == []


@pytest.mark.timeout(60)
async def test_recovered_batch_is_done_after_its_first_successful_run(
    processes, sync_redis, key, db, tmp_path
):
    """A batch recovered from a SIGKILLed worker is finished by its first successful run: its
    job is gone and it is not run again (the dead run's leftovers fail no success step)."""
    killed = await kill_worker_mid_batch(processes, sync_redis, db, key, "done")
    processes.start_worker()
    await all_stored(db, killed.ids)
    await until(lambda: not sync_redis.exists(jobs.job_key(killed.job_id)), "the job to finish", 6)
    await asyncio.sleep(2)  # a rerun would be due 1 s after a failed success step
    assert len(flushed_batches(tmp_path / "worker-1.log")) == 1
    assert "not found in Redis" not in (tmp_path / "worker-1.log").read_text()
    assert counters(sync_redis) == {"accepted": 20, "persisted": 20, "duplicate": 0}


# --- 2. a long job is not mistaken for an abandoned one ----------------------------------------


@pytest.mark.timeout(60)
async def test_long_batch_keeps_its_claim_and_runs_once(processes, sync_redis, key, db, tmp_path):
    """A batch running for twice the heartbeat TTL keeps pushing its started-registry expiry
    forward, so the idle worker beside it never requeues it: one run, no duplicates."""
    processes.start_web()
    workers = [processes.start_worker(), processes.start_worker()]
    for worker in workers:
        await registered(sync_redis, worker)
    sent = named_events("long")
    wip_key = StartedJobRegistry(QUEUE, connection=sync_redis).key
    with SinkLock(db) as lock:
        await post_events(processes, key, sent)
        job_id, execution_id, score = (await until(lambda: started_entries(sync_redis), "a start"))[
            0
        ]
        job_key = jobs.job_key(job_id)
        retries_left = sync_redis.hget(job_key, "retries_left")
        running_since = time.monotonic()
        scores = [score]
        # Held below the sink's 5 s busy timeout: the first attempt blocks, then succeeds.
        while time.monotonic() - running_since < 2 * HEARTBEAT_S:
            await asyncio.sleep(0.2)
            score = sync_redis.zscore(wip_key, f"{job_id}:{execution_id}")
            assert score is not None, "the running batch was taken for abandoned"
            assert score > time.time(), "the running batch's claim expired"
            scores.append(score)
        assert sync_redis.hget(job_key, "status") == b"started"
        assert sync_redis.hget(job_key, "retries_left") == retries_left
        lock.release()

    await all_stored(db, [e["id"] for e in sent])
    assert scores == sorted(scores)
    assert scores[-1] >= scores[0] + HEARTBEAT_S
    assert_once(db, [e["id"] for e in sent])
    await until(lambda: not started_entries(sync_redis), "the run to finish")
    runs = [r for i in range(2) for r in flushed_batches(tmp_path / f"worker-{i}.log")]
    assert len(runs) == 1
    assert counters(sync_redis) == {"accepted": 20, "persisted": 20, "duplicate": 0}
    assert ScheduledJobRegistry(QUEUE, connection=sync_redis).get_job_ids(cleanup=False) == []
    assert FailedJobRegistry(QUEUE, connection=sync_redis).get_job_ids(cleanup=False) == []


# --- 3. a job popped but never started ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_batch_stranded_between_pop_and_start_runs_within_seconds(
    processes, sync_redis, key, db
):
    """A batch left in rq's intermediate list by a worker that died right after popping it is
    put back and run by the next worker within seconds, once."""
    processes.start_web()
    sent = named_events("stranded")
    await post_events(processes, key, sent)
    # What BLMOVE leaves when its worker dies before prepare_job_execution.
    job_id = sync_redis.lmove(QUEUE_KEY, INTERMEDIATE_KEY, "LEFT", "RIGHT")
    assert job_id is not None
    assert sync_redis.llen(QUEUE_KEY) == 0
    assert sync_redis.lrange(INTERMEDIATE_KEY, 0, -1) == [job_id]

    started_at = time.monotonic()
    processes.start_worker()
    await all_stored(db, [e["id"] for e in sent])
    recovery_s = time.monotonic() - started_at
    record_seconds(stranded_worker_start_to_rows_s=recovery_s)
    assert recovery_s < RECOVERY_BOUND_S
    assert_once(db, [e["id"] for e in sent])
    assert sync_redis.llen(INTERMEDIATE_KEY) == 0
    assert counters(sync_redis) == {"accepted": 20, "persisted": 20, "duplicate": 0}


# --- 4. one queue, and the pop is a move -------------------------------------------------------


async def frozen_in_pop(client: redis.Redis, worker: subprocess.Popen[bytes]) -> None:
    """SIGSTOP `worker` while Redis holds its BLMOVE blocked with at least a second to go."""
    for _ in range(100):
        worker.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.05)  # a command already on its way lands first
        for conn in client.client_list():
            # idle is whole seconds since the command: 0 leaves > 1 s of the 2 s block.
            if conn["cmd"] == "blmove" and "b" in conn["flags"] and conn["idle"] == "0":
                return
        worker.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.15)
    raise AssertionError("never caught the worker blocked in its pop")


@pytest.mark.timeout(60)
async def test_worker_pops_one_queue_by_moving_so_a_crash_after_the_pop_loses_nothing(
    processes, sync_redis, key, db
):
    """The worker listens on one queue and pops with BLMOVE, so a batch popped by a worker that
    dies before starting it waits in the intermediate list and still lands, once."""
    processes.start_web()
    victim = processes.start_worker()
    name = await registered(sync_redis, victim)
    assert sync_redis.hget(f"rq:worker:{name}", "queues") == QUEUE.encode()

    sent = named_events("popped")
    await frozen_in_pop(sync_redis, victim)
    await post_events(processes, key, sent)
    # Redis served the blocked pop although the worker is frozen: the id moved, not vanished.
    [job_id] = await until(lambda: sync_redis.lrange(INTERMEDIATE_KEY, 0, -1), "the pop")
    assert sync_redis.llen(QUEUE_KEY) == 0
    assert started_entries(sync_redis) == []
    assert sync_redis.exists(jobs.job_key(job_id.decode()))
    victim.send_signal(signal.SIGKILL)  # a crash right after the pop
    victim.wait()

    processes.start_worker()
    await all_stored(db, [e["id"] for e in sent])
    assert_once(db, [e["id"] for e in sent])
    assert sync_redis.llen(INTERMEDIATE_KEY) == 0


@pytest.mark.timeout(30)
def test_worker_on_several_shard_queues_still_pops_by_moving(sync_redis):
    """A GatewayWorker on several shard queues takes them in turn, and each pop is an atomic
    move to that queue's intermediate list (rq's own multi-queue path pops with BLPOP)."""
    names = [f"shards-{uuid.uuid4().hex[:8]}", ""]
    names[1] = f"{names[0]}.1"
    template = jobs.job_template(Settings())
    for name in names:
        job_id = f"{name.replace('.', '_')}-job"
        sync_redis.hset(jobs.job_key(job_id), mapping=jobs.job_fields(template, b"x", 1))
        sync_redis.rpush(jobs.queue_key(name), job_id)
    worker = GatewayWorker(names, connection=sync_redis, heartbeat_s=HEARTBEAT_S)
    popped = []
    for _ in names:
        found = worker.queue_class.dequeue_any(
            worker.queues, None, connection=sync_redis, serializer=worker.serializer
        )
        assert found is not None
        job, queue = found
        intermediate = IntermediateQueue.get_intermediate_queue_key(queue.key)
        assert sync_redis.lrange(intermediate, 0, -1) == [job.id.encode()]
        assert sync_redis.llen(queue.key) == 0
        popped.append(queue.name)
        worker.queues.reverse()  # the worker rotates its queues after each job
    assert sorted(popped) == sorted(names)
    sync_redis.delete(
        *(k for n in names for k in (jobs.queue_key(n), f"{jobs.queue_key(n)}:intermediate"))
    )
    sync_redis.delete(*(jobs.job_key(f"{n.replace('.', '_')}-job") for n in names))


# --- 5. no work horse to orphan ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_worker_runs_batches_in_process_so_killing_it_leaves_no_copy_running(
    processes, sync_redis, key, db, tmp_path
):
    """A worker running a batch has no child process, so SIGKILLing it leaves nothing holding
    the sink and the recovered run is the first and only copy that writes."""

    def no_work_horse(worker: subprocess.Popen[bytes]) -> None:
        horses = children_of(worker.pid)
        for pid in horses:  # had a regression forked one, it must not outlive the test
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert horses == []
        assert worker.pid in processes_holding(db)

    killed = await kill_worker_mid_batch(processes, sync_redis, db, key, "horse", no_work_horse)
    assert processes_holding(db) == []
    processes.start_worker()
    await all_stored(db, killed.ids)
    assert_once(db, killed.ids)
    log = tmp_path / "worker-1.log"
    first_run = (await until(lambda: flushed_batches(log), "the run's log record"))[0]
    assert (first_run["persisted"], first_run["duplicate"]) == (20, 0)


# --- 6. job hashes never expire, and no Redis that evicts --------------------------------------


@pytest.mark.timeout(60)
async def test_queued_batches_never_expire_and_an_evicting_redis_is_refused(
    processes, sync_redis, key, db
):
    """A queued batch has no TTL, the embedded Redis never evicts, and a worker refuses to
    run against a Redis whose maxmemory-policy could evict queued batches."""
    assert sync_redis.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    check_eviction_policy(sync_redis)
    processes.start_web()
    sent = named_events("ttl")
    await post_events(processes, key, sent)
    [job_id] = sync_redis.lrange(QUEUE_KEY, 0, -1)
    assert sync_redis.ttl(jobs.job_key(job_id.decode())) == -1
    assert sync_redis.ttl(QUEUE_KEY) == -1

    sync_redis.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(ConfigError, match="allkeys-lru"):
        check_eviction_policy(sync_redis)
    refused = processes.start_worker()
    assert refused.wait(timeout=20) != 0
    assert "maxmemory-policy" in processes.log("worker-0")
    assert sync_redis.lrange(QUEUE_KEY, 0, -1) == [job_id]

    sync_redis.config_set("maxmemory-policy", "noeviction")
    check_eviction_policy(sync_redis)
    processes.start_worker()
    await all_stored(db, [e["id"] for e in sent])
    assert_once(db, [e["id"] for e in sent])


# --- 7. every job carries Retry ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_abandoned_batch_is_retried_not_parked_as_failed(processes, sync_redis, key, db):
    """Every queued batch carries rq retries, so one abandoned by a dead worker runs again
    instead of sitting in the failed registry for a year."""
    settings = Settings()
    processes.start_web()
    sent = named_events("abandoned")
    await post_events(processes, key, sent)
    [raw_id] = sync_redis.lrange(QUEUE_KEY, 0, -1)
    job_id = raw_id.decode()
    fields = sync_redis.hgetall(jobs.job_key(job_id))
    assert int(fields[b"retries_left"]) == settings.job_retries
    assert json.loads(fields[b"retry_intervals"]) == jobs.retry_intervals(settings.job_retries)

    # What a worker that died mid-run leaves: status started, its claim expired, in no list.
    wip_key = StartedJobRegistry(QUEUE, connection=sync_redis).key
    sync_redis.lrem(QUEUE_KEY, 1, job_id)
    sync_redis.hset(jobs.job_key(job_id), mapping={"status": "started", "worker_name": "gone"})
    sync_redis.zadd(wip_key, {f"{job_id}:{uuid.uuid4().hex}": int(time.time()) - 1})

    processes.start_worker()
    await all_stored(db, [e["id"] for e in sent])
    assert_once(db, [e["id"] for e in sent])
    assert FailedJobRegistry(QUEUE, connection=sync_redis).get_job_ids(cleanup=False) == []


# --- 8. two workers on the same batch ----------------------------------------------------------


class TwoRuns(NamedTuple):
    job_id: str
    logs: list[Path]  # of the paused holder and of the other worker


async def two_workers_on_one_batch(
    processes: Processes, client: redis.Redis, db: Path, key: str, events: int
) -> TwoRuns:
    """Two workers; the one running a batch (its write waiting on the locked sink) is paused
    with SIGSTOP and its claim expired, until the other's maintenance requeued the batch and
    the other started it too; the sink is freed, the other finishes the job, then the paused
    one goes on with its run."""
    processes.start_web()
    workers = [processes.start_worker(), processes.start_worker()]
    for worker in workers:
        await registered(client, worker)
    sent = [{"name": "sale", "properties": {"n": i}} for i in range(events)]  # ids minted upstream
    wip_key = StartedJobRegistry(QUEUE, connection=client).key
    with SinkLock(db) as lock:
        await post_events(processes, key, sent)
        job_id, execution_id, _ = (await until(lambda: started_entries(client), "a start"))[0]
        job_key = jobs.job_key(job_id)
        await until(lambda: client.hget(job_key, "status") == b"started", "status started")
        holder_pid = worker_pid_of(client, job_id, execution_id)
        holder = next(w for w in workers if w.pid == holder_pid)
        other = next(w for w in workers if w is not holder)
        # A paused worker (GC, swap, a frozen VM) sends no heartbeat but still holds the batch.
        holder.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.2)  # a heartbeat already on its way lands first
        assert client.zadd(wip_key, {f"{job_id}:{execution_id}": 1}, xx=True, ch=True) == 1

        def second_run() -> bool:
            return any(
                j == job_id and e != execution_id and worker_pid_of(client, j, e) == other.pid
                for j, e, _ in started_entries(client)
            )

        await until(second_run, "the other worker to start the requeued batch")
        lock.release()
    logs = [processes.data_dir / f"worker-{workers.index(w)}.log" for w in (holder, other)]
    await until(lambda: not client.exists(job_key), "the other worker's run to finish the job")
    holder.send_signal(signal.SIGCONT)
    return TwoRuns(job_id, logs)


@pytest.mark.timeout(60)
async def test_batch_requeued_while_its_worker_still_holds_it_lands_once(
    processes, sync_redis, key, db
):
    """A batch whose claim expires while its (paused) worker still holds it is run by a second
    worker too; both write it and the sink stores each event, ids minted upstream, once."""
    two = await two_workers_on_one_batch(processes, sync_redis, db, key, 30)
    await until(lambda: all(flushed_batches(log) for log in two.logs), "both runs to write")
    ids = stored_ids(db)
    assert len(ids) == len(set(ids)) == 30
    # Each worker's run wrote the whole batch: one stored it, the other found it stored.
    first_runs = [flushed_batches(log)[0] for log in two.logs]
    assert sorted((r["persisted"], r["duplicate"]) for r in first_runs) == [(0, 30), (30, 0)]
    assert counters(sync_redis)["persisted"] == 30
    assert FailedJobRegistry(QUEUE, connection=sync_redis).get_job_ids(cleanup=False) == []


@pytest.mark.timeout(60)
async def test_batch_run_by_two_workers_is_not_run_a_third_time(processes, sync_redis, key, db):
    """When two workers ran the same batch, both runs finish it: no error, no third run."""
    two = await two_workers_on_one_batch(processes, sync_redis, db, key, 30)
    await until(lambda: all(flushed_batches(log) for log in two.logs), "both runs to write")
    await asyncio.sleep(1)  # the paused worker's success step, and a retry it may schedule
    errors = [r for log in two.logs for r in records(log) if r.get("level") == "error"]
    assert errors == []
    await until(lambda: not sync_redis.exists(jobs.job_key(two.job_id)), "the job to finish")
    assert [len(flushed_batches(log)) for log in two.logs] == [1, 1]
    assert counters(sync_redis) == {"accepted": 30, "persisted": 30, "duplicate": 30}
