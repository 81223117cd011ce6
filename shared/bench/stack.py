"""What the benchmark runs against: its own Redis, front door, workers and baselines, all
started as real processes in a temporary directory and stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Self

from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from shared.redis_server import EmbeddedRedis

if TYPE_CHECKING:
    from pathlib import Path

    import redis

Loop = Literal["asyncio", "uvloop"]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Under uvloop: the same module run after installing uvloop's event loop policy.
_UVLOOP = (
    "import runpy, sys, uvloop; uvloop.install(); sys.argv[0] = {module!r}; "
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def module_command(module: str, *args: str, loop: Loop = "asyncio") -> list[str]:
    """`python -m module args`, or the same under uvloop."""
    if loop == "uvloop":
        return [sys.executable, "-c", _UVLOOP.format(module=module), *args]
    return [sys.executable, "-m", module, *args]


@dataclass
class Service:
    """A process the benchmark started; `url` if it serves HTTP."""

    name: str
    process: subprocess.Popen[bytes]
    url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_mb(self) -> float:
        """Peak resident memory so far (VmHWM); 0 where /proc has no such line."""
        with suppress(OSError):
            for line in open(f"/proc/{self.pid}/status", encoding="ascii"):  # noqa: PTH123, SIM115
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        """SIGTERM (workers finish their job, the front door its requests), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Stack:
    """The benchmark's processes, sharing one Redis and one queue; `close` stops them all."""

    def __init__(
        self,
        root: Path,
        *,
        redis_url: str | None = None,
        appendfsync: str = "always",
        queue: str = "bench",
        loop: Loop = "asyncio",
    ) -> None:
        self.root = root
        self.queue = queue
        self.loop: Loop = loop
        self._exit = ExitStack()
        self._appendfsync = appendfsync
        self.redis_url = redis_url or ""
        self._services: list[Service] = []

    def __enter__(self) -> Self:
        if not self.redis_url:
            server = EmbeddedRedis(self.root / "redis", appendfsync=self._appendfsync)
            self.redis_url = self._exit.enter_context(server).url
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for service in reversed(self._services):
            service.stop()
        self._services.clear()
        self._exit.close()

    def env(self, sink: str, **settings: str) -> dict[str, str]:
        """The environment of an eventgate process of this stack: no EVENTGATE_* of ours."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("EVENTGATE_")},
            "REDIS_URL": self.redis_url,
            "EVENTGATE_DATA_DIR": str(self.root / "data"),
            "EVENTGATE_SINK": sink,
            "EVENTGATE_QUEUE": self.queue,
            "EVENTGATE_LOG_FORMAT": "json",
            **{f"EVENTGATE_{k.upper()}": v for k, v in settings.items()},
        }

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Service:
        log = self._exit.enter_context((self.root / f"{name}.log").open("ab"))
        process = subprocess.Popen(  # noqa: S603 - our own modules
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        service = Service(name, process)
        self._services.append(service)
        return service

    def start_front_door(self, sink: str) -> Service:
        port = free_port()
        env = self.env(sink, port=str(port), host="127.0.0.1")
        service = self._spawn("front-door", module_command("ingest", loop=self.loop), env)
        service.url = f"http://127.0.0.1:{port}"
        self._wait_healthy(service)
        return service

    def start_baseline(self, mode: str) -> Service:
        port = free_port()
        command = module_command(
            "shared.bench.baseline", "--mode", mode, "--port", str(port), loop=self.loop
        )
        service = self._spawn(f"baseline-{mode}", command, self.env("sqlite:///unused.db"))
        service.url = f"http://127.0.0.1:{port}"
        self._wait_healthy(service)
        return service

    def start_worker(self, sink: str, name: str = "worker") -> Service:
        return self._spawn(name, module_command("workers"), self.env(sink))

    def wait_workers(self, client: redis.Redis, count: int) -> None:
        """Wait until `count` workers listen on the queue (rq registers them when ready).

        Raises:
            RuntimeError: they did not within the start timeout.
        """
        deadline = time.monotonic() + START_TIMEOUT_S
        while int(client.scard(WORKERS_BY_QUEUE_KEY % self.queue)) < count:
            if time.monotonic() > deadline:
                last = self._services[-1].name if self._services else ""
                raise RuntimeError(f"{count} worker(s) did not start:\n{self.log_tail(last)}")
            time.sleep(0.05)

    def stop(self, service: Service) -> None:
        service.stop()
        if service in self._services:
            self._services.remove(service)

    def log_tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _wait_healthy(self, service: Service) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited:\n{self.log_tail(service.name)}")
            try:
                with urllib.request.urlopen(f"{service.url}/healthz", timeout=1):  # noqa: S310
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"{service.name} did not answer:\n{self.log_tail(service.name)}")
