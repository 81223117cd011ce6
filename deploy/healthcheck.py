#!/usr/bin/env python3
"""eventgate-healthcheck: is the eventgate process of this container alive? Exit 0 yes, 1 no.

The image's HEALTHCHECK, and the workers' probe in deploy/compose.yaml and deploy/k8s/.

- web: the front door's own GET /healthz answers 200.
- worker: rq holds a heartbeat, younger than --max-age seconds, from a worker of this host
  (the container's or pod's hostname). rq refreshes it every EVENTGATE_JOB_HEARTBEAT_S while
  idle, and eventgate's heartbeat thread does during a job: a worker that hangs goes stale.
  Redis unreachable counts as alive: the worker rides out a Redis outage by itself, and
  restarting every worker would not bring Redis back. An outage longer than rq's worker TTL
  (EVENTGATE_JOB_HEARTBEAT_S + 75 s) makes rq forget the worker; the check then fails, and
  the restart that follows registers it again.
- auto (the default): web or worker, from what PID 1 of the container runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

WORKERS_KEY = "rq:workers"  # rq's set of the hash keys of every registered worker
DEFAULT_MAX_AGE_S = 60.0
PID1_CMDLINE = Path("/proc/1/cmdline")


def role_of(argv: list[str]) -> str:
    """'worker' for `eventgate worker` (which execs `python -m workers`), else 'web'."""
    for arg, following in itertools.pairwise(argv):
        if (arg, following) == ("-m", "workers"):
            return "worker"
        if Path(arg).name == "eventgate" and following == "worker":
            return "worker"
    return "web"


def pid1_argv() -> list[str]:
    try:
        raw = PID1_CMDLINE.read_bytes()
    except OSError:  # not Linux, or no /proc: say web, the image's default command
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def web_alive(host: str, port: int, timeout_s: float) -> tuple[bool, str]:
    if host in ("", "0.0.0.0"):  # noqa: S104 - listening everywhere: ask loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"
    return status == HTTPStatus.OK, f"{url} answered {status}"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def worker_alive(
    client: redis.Redis, hostname: str, max_age_s: float, now: datetime | None = None
) -> tuple[bool, str]:
    """Whether rq has a heartbeat younger than max_age_s from a worker on `hostname`."""
    now = now or datetime.now(UTC)
    keys = client.smembers(WORKERS_KEY)
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, "hostname", "last_heartbeat")
        rows = pipe.execute()
    youngest: float | None = None
    for host, beat in rows:
        if host is None or beat is None or _text(host) != hostname:
            continue
        when = datetime.fromisoformat(_text(beat))
        if when.tzinfo is None:  # rq writes UTC
            when = when.replace(tzinfo=UTC)
        age = (now - when).total_seconds()
        youngest = age if youngest is None else min(youngest, age)
    if youngest is None:
        return False, f"no rq worker registered from host {hostname}"
    return youngest <= max_age_s, f"last heartbeat of a worker on {hostname}: {youngest:.0f} s ago"


def check_worker(max_age_s: float, timeout_s: float) -> tuple[bool, str]:
    url = os.environ.get("REDIS_URL")
    if not url:
        return True, "REDIS_URL unset: the embedded Redis is not probed"
    import redis  # noqa: PLC0415 - only the worker check needs it

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return worker_alive(client, socket.gethostname(), max_age_s)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        return True, f"Redis unreachable ({exc}); the worker waits for it, a restart would not help"
    finally:
        client.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventgate-healthcheck",
        description="Exit 0 if this container's eventgate front door or worker is alive, else 1.",
    )
    parser.add_argument(
        "role",
        nargs="?",
        choices=("auto", "web", "worker"),
        default="auto",
        help="what to check; auto: from the command PID 1 runs (default)",
    )
    parser.add_argument(
        "--max-age",
        type=float,
        default=DEFAULT_MAX_AGE_S,
        help=f"worker: oldest acceptable rq heartbeat, seconds (default {DEFAULT_MAX_AGE_S:.0f})",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    role = role_of(pid1_argv()) if args.role == "auto" else args.role
    if role == "web":
        host = os.environ.get("EVENTGATE_HOST", "127.0.0.1")
        port = int(os.environ.get("EVENTGATE_PORT", "8080"))
        alive, reason = web_alive(host, port, args.timeout)
    else:
        alive, reason = check_worker(args.max_age, args.timeout)
    sys.stdout.write(f"{role} {'alive' if alive else 'NOT alive'}: {reason}\n")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
