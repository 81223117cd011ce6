"""`eventgate up`'s process supervisor: a front door and N workers, restarted if they die."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from collections.abc import Mapping

log = structlog.get_logger("eventgate.up")

# A child that dies is started again after this long (not at once: no crash loop).
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 35.0


@dataclass
class Child:
    name: str
    module: str
    process: subprocess.Popen[bytes] | None = None
    died_at: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    """Runs `python -m <module>` children with one environment; stops them on SIGTERM/SIGINT."""

    def __init__(self, children: list[Child], env: Mapping[str, str]) -> None:
        self.children = children
        self.env = dict(env)
        self._stopping = False

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        # A session of its own: Ctrl-C reaches the supervisor only, which then stops each
        # child once (a second signal would make rq abandon the job in hand).
        child.process = subprocess.Popen(  # noqa: S603 - our own modules
            [sys.executable, "-m", child.module], env=self.env, start_new_session=True
        )
        log.debug("child.started", child=child.name, pid=child.process.pid)

    def run(self) -> None:
        """Watch the children until a signal asks to stop, then stop them gracefully."""
        previous = {
            signum: signal.signal(signum, self._request_stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            while not self._stopping:
                self._restart_dead()
                time.sleep(0.2)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.stop()

    def _request_stop(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            if not child.died_at:
                child.died_at = now
                log.warning(
                    "child.died",
                    child=child.name,
                    code=child.process.returncode,
                    restart_in_s=RESTART_DELAY_S,
                )
            elif now - child.died_at >= RESTART_DELAY_S:
                child.died_at = 0.0
                child.restarts += 1
                self._spawn(child)

    def stop(self) -> None:
        """SIGTERM every child (workers finish their job, the front door its requests)."""
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
