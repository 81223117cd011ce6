"""Running the benchmark: its processes, its five sections, the report."""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis
import redis.asyncio as aioredis
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared import accounts
from shared.bench.counters import discard_queue
from shared.bench.drive import drive, wrk_path
from shared.bench.e2e import EndToEnd
from shared.bench.report import Report
from shared.bench.sinks import PostgresBench, SqliteBench, pg_reachable
from shared.bench.stack import Loop, Stack
from shared.bench.worker import WorkerBench
from shared.jobs import job_template
from shared.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console

    from shared.bench.sinks import BenchSink


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """How much to measure; `quick()` is the seconds-long version CI runs."""

    repeats: int = 3
    duration_s: float = 5.0  # each front-door and end-to-end run
    concurrency: int = 32  # connections of the front-door runs
    worker_jobs: int = 20  # of 1000 events each, per worker run
    search_rounds: int = 5  # paced runs to find the sustained rate
    redis_url: str | None = None
    pg_dsn: str | None = None
    use_wrk: bool = True
    loop: Loop = "asyncio"
    appendfsync: str = "always"

    @classmethod
    def quick(cls, **overrides: object) -> BenchOptions:
        base = {"repeats": 1, "duration_s": 1.0, "worker_jobs": 5, "search_rounds": 2}
        return cls(**{**base, **overrides})  # type: ignore[arg-type]


def _new_key(url: str, prefix: str) -> str:
    async def make() -> str:
        client = aioredis.Redis.from_url(url)
        try:
            account = f"{prefix}-{secrets.token_hex(4)}"
            await accounts.create_account(client, account)
            return await accounts.create_key(client, account, "private")
        finally:
            await client.aclose()

    return asyncio.run(make())


class Bench:
    """One benchmark run; `run()` fills and returns the report."""

    def __init__(self, options: BenchOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.report = Report()
        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

    def run(self) -> Report:
        options = self.options
        use_wrk = options.use_wrk and wrk_path() is not None
        self.report.meta = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "generator": "wrk" if use_wrk else "eventgate load",
            "loop": options.loop,
            "repeats": options.repeats,
            "duration_s": options.duration_s,
            "redis_appendfsync": options.appendfsync,
            "load_average_before": list(os.getloadavg()),
        }
        if not use_wrk:
            self.report.notes.append("wrk not found: front door driven by `eventgate load`")
        with ExitStack() as exit_stack, self._progress:
            root = Path(exit_stack.enter_context(tempfile.TemporaryDirectory(prefix="eg-bench-")))
            stack = exit_stack.enter_context(
                Stack(
                    root,
                    redis_url=options.redis_url,
                    appendfsync=options.appendfsync,
                    queue=f"bench-{secrets.token_hex(3)}",
                    loop=options.loop,
                )
            )
            client = exit_stack.enter_context(redis.Redis.from_url(stack.redis_url))
            self._front_door(stack, client, root, use_wrk=use_wrk)
            insert_rate = self._workers(stack, client, root)
            self._end_to_end(stack, client, root, insert_rate)
        self.report.meta["load_average_after"] = list(os.getloadavg())
        return self.report

    # --- 1. front door ---------------------------------------------------------------------

    def _front_door(self, stack: Stack, client: redis.Redis, root: Path, *, use_wrk: bool) -> None:
        options, report = self.options, self.report
        for batch, unit in ((100, "events/s"), (1, "requests/s")):
            size = "100-event" if batch > 1 else "1-event"
            for target in ("front_door", "bare", "decode"):
                label = {"front_door": "front door", "bare": "(a) read + 202"}.get(
                    target, "(b) + msgspec decode"
                )
                report.add(f"{target}_{batch}", "1 front door", f"{label}, {size}", unit)
        report.add("front_door_ratio", "1 front door", "100-event: front door / (b)", "ratio")
        report.add("front_door_bare_ratio", "1 front door", "100-event: front door / (a)", "ratio")
        report.add("front_door_single_ratio", "1 front door", "1-event: front door / (b)", "ratio")
        report.add(
            "front_door_single_bare_ratio", "1 front door", "1-event: front door / (a)", "ratio"
        )
        task = self._progress.add_task("1 front door", total=options.repeats * 6)
        key = _new_key(stack.redis_url, "bench-fd")
        services = {
            "front_door": stack.start_front_door(f"sqlite:///{root / 'unused.db'}"),
            "bare": stack.start_baseline("bare"),
            "decode": stack.start_baseline("decode"),
        }
        order = list(services)
        failed = 0
        for repeat in range(options.repeats):
            for batch in (100, 1):
                rates: dict[str, float] = {}
                # Rotated every run: no target always runs first (or right after a flush).
                for target in order[repeat % 3 :] + order[: repeat % 3]:
                    result = drive(
                        services[target].url,
                        key,
                        batch=batch,
                        concurrency=options.concurrency,
                        duration_s=options.duration_s,
                        workdir=root,
                        use_wrk=use_wrk,
                    )
                    failed += result.failed
                    rates[target] = result.events_per_s if batch > 1 else result.requests_per_s
                    report.record(f"{target}_{batch}", rates[target])
                    if target == "front_door":
                        discard_queue(client, stack.queue)
                    self._progress.advance(task)
                suffix = "" if batch > 1 else "_single"
                report.record(f"front_door{suffix}_ratio", rates["front_door"] / rates["decode"])
                report.record(f"front_door{suffix}_bare_ratio", rates["front_door"] / rates["bare"])
        if failed:
            report.notes.append(f"front door runs: {failed} non-2xx answers or errors")
        for service in services.values():
            stack.stop(service)

    # --- 2. worker -------------------------------------------------------------------------

    def _workers(self, stack: Stack, client: redis.Redis, root: Path) -> float:
        """Section 2 for SQLite and, when reachable, PostgreSQL; the SQLite insert rate."""
        options = self.options
        sinks: list[tuple[str, BenchSink]] = [("", SqliteBench(root / "worker.db"))]
        with ExitStack() as exit_stack:
            dsn = options.pg_dsn
            why = pg_reachable(dsn) if dsn else "no --pg-dsn or EVENTGATE_TEST_PG_DSN"
            if dsn and why is None:
                try:
                    sinks.append(("_pg", exit_stack.enter_context(PostgresBench(dsn))))
                except Exception as exc:  # noqa: BLE001 - any refusal: report it, go on
                    why = str(exc).splitlines()[0]
            if why is not None:
                self.report.notes.append(f"PostgreSQL skipped: {why}")
            template = job_template(Settings(queue=stack.queue))
            task = self._progress.add_task("2 worker", total=options.repeats * len(sinks))
            for suffix, sink in sinks:
                name = "PostgreSQL" if suffix else "SQLite"
                self.report.add(
                    f"worker{suffix}_events_per_s", "2 worker", f"1 worker, {name}", "events/s"
                )
                self.report.add(
                    f"insert{suffix}_events_per_s", "2 worker", f"plain insert, {name}", "events/s"
                )
                self.report.add(
                    f"worker_ratio{suffix}", "2 worker", f"{name}: worker / insert", "ratio"
                )
                bench = WorkerBench(stack, client, sink, template, options.worker_jobs)
                bench.start()
                try:
                    for repeat in range(options.repeats):
                        run = bench.run_pair(first_worker=repeat % 2 == 0)
                        self.report.record(f"worker{suffix}_events_per_s", run.worker_events_per_s)
                        self.report.record(f"insert{suffix}_events_per_s", run.insert_events_per_s)
                        self.report.record(f"worker_ratio{suffix}", run.ratio)
                        self._progress.advance(task)
                finally:
                    bench.stop()
                    sink.close()
        return self.report.figures["insert_events_per_s"].median

    # --- 3, 4, 5. end to end, scaling, memory ------------------------------------------------

    def _end_to_end(
        self, stack: Stack, client: redis.Redis, root: Path, insert_rate: float
    ) -> None:
        options, report = self.options, self.report
        sink = SqliteBench(root / "e2e.db")
        front_door = stack.start_front_door(sink.url)
        workers = [stack.start_worker(sink.url, "e2e-worker-1")]
        stack.wait_workers(client, 1)
        e2e = EndToEnd(
            stack,
            client,
            sink,
            front_door,
            duration_s=max(options.duration_s, 1.5),
            concurrency=options.concurrency,
        )
        report.add(
            "e2e_events_per_s", "3 end to end", "sustained, queue flat, 1 worker", "events/s"
        )
        report.add("e2e_ratio", "3 end to end", "sustained / plain insert (SQLite)", "ratio")
        report.add("latency_p50_ms", "3 end to end", "accept->persisted p50 at half rate", "ms")
        report.add("latency_p99_ms", "3 end to end", "accept->persisted p99 at half rate", "ms")
        report.add("e2e_2_workers_events_per_s", "4 scaling", "sustained, 2 workers", "events/s")
        report.add("scaling_ratio", "4 scaling", "2 workers / 1 worker", "ratio")
        report.add("rss_front_door_mb", "5 memory", "front door peak RSS", "MiB")
        report.add("rss_worker_mb", "5 memory", "worker peak RSS", "MiB")
        rounds, repeats = options.search_rounds, options.repeats
        task = self._progress.add_task(
            "3-5 end to end, scaling", total=2 * (rounds + repeats) + repeats
        )
        guess = 0.5 * self.report.figures["worker_events_per_s"].median or 5000.0
        sustained: dict[int, list[float]] = {}
        for count in (1, 2):
            if count == 2:  # noqa: PLR2004
                workers.append(stack.start_worker(sink.url, "e2e-worker-2"))
                stack.wait_workers(client, 2)
                guess = 1.5 * statistics.median(sustained[1])
            rate = e2e.sustained(guess, rounds, lambda: self._progress.advance(task))
            sustained[count] = []
            for _ in range(repeats):
                sustained[count].append(e2e.run(rate).stored)
                self._progress.advance(task)
            report.meta[f"e2e_runs_{count}_workers"] = [
                {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(p).items()}
                for p in e2e.trace
            ]
            e2e.trace.clear()
            if count == 1:
                for _ in range(repeats):
                    p50, p99, drained = e2e.latency_ms(rate / 2)
                    report.record("latency_p50_ms", p50)
                    report.record("latency_p99_ms", p99)
                    if not drained:
                        report.notes.append("a latency run did not drain: p99 understated")
                    self._progress.advance(task)
                report.record("rss_front_door_mb", front_door.peak_rss_mb())
                report.record("rss_worker_mb", workers[0].peak_rss_mb())
        for one, two in zip(sustained[1], sustained[2], strict=True):
            report.record("e2e_events_per_s", one)
            report.record("e2e_ratio", one / insert_rate)
            report.record("e2e_2_workers_events_per_s", two)
            report.record("scaling_ratio", two / one)
        for service in [front_door, *workers]:
            stack.stop(service)
        sink.close()
