"""`eventgate bench --quick`, run for real: it starts what it needs, prints the table and
writes every figure CI relies on. It checks that the benchmark runs, not how fast."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.redis_server import find_server_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(150)]

try:
    find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary to embed: {exc}", allow_module_level=True)

EVENTGATE = Path(sys.executable).parent / "eventgate"
KEYS = (
    "front_door_ratio",
    "front_door_bare_ratio",
    "front_door_single_ratio",
    "worker_ratio",
    "e2e_ratio",
    "scaling_ratio",
    "e2e_events_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "rss_front_door_mb",
    "rss_worker_mb",
)


def test_quick_bench_writes_every_figure(tmp_path):
    """A quick run ends within the CI budget with every key a positive number."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTGATE_")}
    done = subprocess.run(
        [str(EVENTGATE), "bench", "--quick", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "eventgate bench" in done.stdout
    figures = json.loads(out.read_text())
    for key in KEYS:
        value = figures.get(key)
        assert isinstance(value, int | float), f"{key} missing: {sorted(figures)}"
        assert math.isfinite(value), key
        assert value > 0, f"{key} = {value}"
    assert figures["figures"]["front_door_ratio"]["runs"]
