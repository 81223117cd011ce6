"""A PostgreSQL server of a test's own (initdb into a temporary directory), to stop, crash and
start again without touching the machine's shared one."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.integration.test_redis_outage import port_outside_ephemeral_range


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable_reason() -> str | None:
    """Why this machine cannot run an own PostgreSQL, or None if it can."""
    if _bin_dir() is None:
        return "no initdb (PostgreSQL server binaries) found"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _uid("postgres") is None):
        return "running as root, and no `postgres` user to run initdb as"
    return None


def _uid(user: str) -> int | None:
    import pwd  # noqa: PLC0415 - Unix only, like PostgreSQL here

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


class OwnPostgres:
    """initdb refuses to run as root: as root, every server command runs as `postgres`."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        assert bin_dir is not None, unavailable_reason()
        self.bin = bin_dir
        # Not under pytest's tmp_path: its parents are private to root.
        self.directory = Path(tempfile.mkdtemp(prefix="eg-pg-"))
        self.data = self.directory / "data"
        self.port = port_outside_ephemeral_range()
        self._as = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            uid = _uid("postgres")
            assert uid is not None
            os.chown(self.directory, uid, -1)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        log = str(self.directory / "server.log")
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "30", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """`fast`: clients are disconnected and the server shuts down cleanly; `immediate`:
        every server process quits at once, as in a crash (recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def cut_connections(self, application_name: str = "eventgate-worker") -> int:
        """Terminate the backends of the workers' connections; how many."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                [application_name],
            ).fetchall()
        return len(rows)

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [
                    *self._as,
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "stop",
                ],
                check=False,
                capture_output=True,
            )
        deadline = time.monotonic() + 10
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bin / program), *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.directory,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr}{done.stdout}")
