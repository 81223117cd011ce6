"""Starting eventgate's real processes (front door, workers) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Front door and workers as subprocesses sharing one environment; all killed at close."""

    def __init__(self, data_dir: Path, redis_url: str, **settings: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EVENTGATE_")},
            "REDIS_URL": redis_url,
            "EVENTGATE_DATA_DIR": str(data_dir),
            "EVENTGATE_PORT": str(self.port),
            "EVENTGATE_LOG_FORMAT": "json",
            # One queue unless a test asks for shards: tests read the queue by its name.
            "EVENTGATE_SHARDS": "1",
            **{f"EVENTGATE_{k.upper()}": v for k, v in settings.items()},
        }
        self.web: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[object] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, module: str, name: str) -> subprocess.Popen[bytes]:
        log = (self.data_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", module], env=self.env, cwd=ROOT, stdout=log, stderr=log
        )

    def start_web(self, timeout_s: float = 20.0) -> None:
        self.web = self._spawn("ingest", "web")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.web.poll() is not None:
                raise RuntimeError(f"front door exited: {self.log('web')}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"front door did not answer: {self.log('web')}")

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self._spawn("workers", f"worker-{len(self.workers)}")
        self.workers.append(worker)
        return worker

    def log(self, name: str) -> str:
        return (self.data_dir / f"{name}.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        for process in [self.web, *self.workers]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
