"""Driving an HTTP server flat out with one body: wrk when installed, else `eventgate load`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.load.bodies import EventSource, RequestMaker
from shared.load.runner import LoadConfig, run_load

if TYPE_CHECKING:
    from pathlib import Path

# wrk reads the body from a file and prints its own summary as one JSON line at the end.
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
local file = io.open("{body}", "rb")
wrk.body = file:read("*a")
file:close()

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nEGJSON {{"requests": %d, "duration_us": %d, "bad_status": %d, "errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True, slots=True)
class Throughput:
    """What one flat-out run achieved."""

    requests_per_s: float
    events_per_s: float  # of 2xx answers
    failed: int  # non-2xx answers and connection errors
    p50_ms: float
    p99_ms: float


def wrk_path() -> str | None:
    return shutil.which("wrk")


def drive(  # noqa: PLR0913 - one knob each
    url: str,
    key: str,
    *,
    batch: int,
    concurrency: int,
    duration_s: float,
    workdir: Path,
    use_wrk: bool = True,
) -> Throughput:
    """POST `batch`-event native bodies to `url`/v1/events flat out for `duration_s`.

    Raises:
        RuntimeError: wrk failed or printed no summary.
    """
    wrk = wrk_path() if use_wrk else None
    if wrk is None:
        config = LoadConfig(
            url=url, keys=(key,), batch=batch, concurrency=concurrency, duration_s=duration_s
        )
        stats = run_load(config, isolate=True)  # a process of its own, as wrk would be
        summary = stats.summary()
        return Throughput(
            requests_per_s=stats.sent / stats.elapsed_s,
            events_per_s=stats.events_accepted / stats.elapsed_s,
            failed=stats.sent - stats.answers.get("2xx", 0),
            p50_ms=float(summary["latency_p50_ms"]),
            p99_ms=float(summary["latency_p99_ms"]),
        )
    body = workdir / f"body-{batch}.json"
    if not body.exists():
        maker = RequestMaker("native", [key], batch, EventSource("wrk"))
        body.write_bytes(maker.next().body)
    script = workdir / f"wrk-{batch}.lua"
    script.write_text(_WRK_SCRIPT.format(key=key, body=body))
    seconds = max(1, math.ceil(duration_s))  # wrk counts whole seconds
    done = subprocess.run(  # noqa: S603 - wrk, our script, our URL
        [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"{url}/v1/events",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 30,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("EGJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = json.loads(line.removeprefix("EGJSON "))
    elapsed = result["duration_us"] / 1e6
    failed = result["bad_status"] + result["errors"]
    return Throughput(
        requests_per_s=result["requests"] / elapsed,
        events_per_s=(result["requests"] - result["bad_status"]) * batch / elapsed,
        failed=failed,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
    )
