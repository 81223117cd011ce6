"""The `eventgate` console script, run for real: help, accounts and keys, and `eventgate up`
(banner, an event to the sink, the same demo key again, clean stops, a killed worker)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shared.errors import ConfigError
from shared.redis_server import ADDRESS_FILE, SERVER_LOCK_FILE, find_server_binary
from tests.processes import free_port

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

try:
    find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary to embed: {exc}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
EVENTGATE = Path(sys.executable).parent / "eventgate"
PRIVATE_KEY = re.compile(r"eg_sk_[0-9a-f]{12}\.[A-Za-z0-9_-]+")
PUBLIC_KEY = re.compile(r"eg_pk_[0-9a-f]{12}\.[A-Za-z0-9_-]+")
BANNER_END = "Ctrl-C stops it."
STOP_WITHIN_S = 10.0


# --- helpers -------------------------------------------------------------------------------------


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without eventgate settings (so the embedded Redis of the
    working directory is used), plus `settings` as EVENTGATE_<NAME>."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("EVENTGATE_") and k != "REDIS_URL"
    }
    env.update({f"EVENTGATE_{k.upper()}": v for k, v in settings.items()})
    return env


def eventgate(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run the console script to completion in `cwd`."""
    return subprocess.run(
        [str(EVENTGATE), *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def last_line(text: str) -> str:
    lines = text.rstrip("\n").splitlines()
    return lines[-1] if lines else ""


def assert_clean_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """A non-zero exit whose output says what is wrong, without a traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, output


def lock_held(path: Path) -> bool:
    """Whether any process holds an flock on `path` (the embedded server holds its lock)."""
    if not path.exists():
        return False
    with path.open("r") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
    return False


def _proc_text(pid: int, name: str) -> str | None:
    with suppress(OSError):
        return (Path("/proc") / str(pid) / name).read_bytes().replace(b"\0", b" ").decode()
    return None


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    stat = _proc_text(pid, "stat")
    return stat is not None and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def children_of(parent: int) -> dict[int, str]:
    """Live child processes of `parent`: pid -> command line."""
    found = {}
    for pid in _all_pids():
        stat = _proc_text(pid, "stat")
        if stat is None or int(stat.rsplit(")", 1)[1].split()[1]) != parent:
            continue
        cmdline = _proc_text(pid, "cmdline")
        if cmdline is not None and _alive(pid):
            found[pid] = cmdline.strip()
    return found


def processes_in(directory: Path) -> dict[int, str]:
    """Live processes working in `directory` (their cwd is in it, as for the front door,
    the workers and the embedded Redis) or naming it on their command line."""
    directory = directory.resolve()
    found = {}
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        with suppress(OSError):
            cwd = Path(f"/proc/{pid}/cwd").readlink()
            cmdline = _proc_text(pid, "cmdline") or ""
            if (cwd.is_relative_to(directory) or str(directory) in cmdline) and _alive(pid):
                found[pid] = cmdline.strip()
    return found


def kill_all(pids: Iterable[int]) -> None:
    for pid in list(pids):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_nothing_left(tmp_path: Path, started: dict[int, str]) -> None:
    """No process `eventgate` started survives it, and the embedded Redis is gone."""
    survivors = {pid: cmd for pid, cmd in started.items() if _alive(pid)}
    assert not survivors, f"still running: {survivors}"
    strays = processes_in(tmp_path)
    assert not strays, f"still running in {tmp_path}: {strays}"
    data_dir = tmp_path / ".eventgate"
    assert not (data_dir / ADDRESS_FILE).exists(), "redis.json left behind"
    assert not lock_held(data_dir / SERVER_LOCK_FILE), "a Redis server still holds the data dir"


def post(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


def stored(db: Path) -> list[tuple[str, str, str, str]]:
    """(account, event_id, name, properties) rows in the sink, [] before it exists."""
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return conn.execute("SELECT account, event_id, name, properties FROM events").fetchall()
        except sqlite3.OperationalError as exc:  # the worker made the file, not yet the table
            if "no such table" in str(exc):
                return []
            raise


def wait_for_rows(db: Path, count: int, timeout_s: float) -> list[tuple[str, str, str, str]]:
    """The sink's rows once it holds at least `count` (polled every 10 ms), or what it holds
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while len(rows := stored(db)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return rows


def record(figures: dict[str, object]) -> None:
    """Merge `figures` into test-artifacts/up.json."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "up.json"
    current: dict[str, object] = {}
    with suppress(OSError, ValueError):
        current = json.loads(path.read_text())
    path.write_text(json.dumps({**current, **figures}, indent=2) + "\n")


@dataclass
class Banner:
    base: str
    key: str
    events_url: str
    headers: dict[str, str]
    body: bytes


class UpRun:
    """One `eventgate up` in a directory, its output in files (a pipe nobody reads could
    block its children, which inherit it)."""

    def __init__(self, cwd: Path, env: dict[str, str], name: str) -> None:
        self.cwd = cwd
        self.out_path = cwd / f"{name}.out"
        self.err_path = cwd / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.process = subprocess.Popen(
                [str(EVENTGATE), "up"], cwd=cwd, env=env, stdout=out, stderr=err
            )
        self.started: dict[int, str] = {}  # every child seen, for the check that none survive

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def children(self) -> dict[int, str]:
        found = children_of(self.process.pid)
        self.started.update(found)
        return found

    def wait_banner(self, timeout_s: float = 30.0) -> Banner:
        deadline = time.monotonic() + timeout_s
        while BANNER_END not in self.out_path.read_text(errors="replace"):
            code = self.process.poll()
            assert code is None, f"eventgate up exited with {code}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no banner:\n{self.output()}"
            time.sleep(0.05)
        self.children()
        return parse_banner(self.out_path.read_text())

    def stop(self, signum: int, timeout_s: float = 30.0) -> tuple[int, float]:
        """Send `signum`; the exit code and the seconds it took to exit."""
        self.children()
        started = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout_s)
        return code, time.monotonic() - started

    def close(self) -> None:
        """Stop it if still running, then kill anything it left (even orphans)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        kill_all(pid for pid in self.started if _alive(pid))


def parse_banner(out: str) -> Banner:
    base = re.search(r"eventgate is up at (http://\S+)", out)
    key = re.search(r"demo key: (\S+)", out)
    curl = next((line for line in out.splitlines() if line.startswith("curl ")), None)
    assert base, out
    assert key, out
    assert curl, out
    words = shlex.split(curl)
    assert words[:3] == ["curl", "-X", "POST"], curl
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    body = words[words.index("-d") + 1].encode()
    return Banner(base.group(1), key.group(1), words[3], headers, body)


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[object]:
    """Factory: start `eventgate up` in tmp_path (or a directory in it); every run is stopped
    and everything it started is killed at teardown, also when the test fails."""
    runs: list[UpRun] = []

    def start(cwd: Path = tmp_path, **settings: str) -> UpRun:
        cwd.mkdir(exist_ok=True)
        run = UpRun(cwd, clean_env(**settings), f"up-{len(runs)}")
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()
    kill_all(processes_in(tmp_path))


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("command", "description"),
    [
        ([], "event ingestion gateway"),
        (["up"], "Run everything on this machine"),
        (["serve"], "Run the front door"),
        (["worker"], "Run one worker process"),
        (["accounts"], "Create, change and list accounts"),
        (["accounts", "create"], "Create an account"),
        (["accounts", "list"], "List accounts"),
        (["keys"], "Create and revoke API keys"),
        (["keys", "create"], "Create an API key"),
        (["keys", "revoke"], "Revoke a key"),
    ],
)
def test_help_describes_every_command(tmp_path, command, description):
    """`--help` of the program and of each command exits 0 with its usage and description,
    and starts nothing."""
    result = eventgate(tmp_path, *command, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Usage: eventgate {' '.join(command)}".rstrip() in result.stdout
    assert description in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / ".eventgate").exists()


# --- accounts and keys ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_accounts_and_keys_lifecycle(tmp_path):
    """Accounts and keys are created, listed and revoked through the CLI, errors are one clear
    line each, and every command stops the embedded Redis it started."""
    created = eventgate(tmp_path, "accounts", "create", "shop")
    assert created.returncode == 0, created.stdout + created.stderr
    assert "created account shop" in created.stdout

    private = eventgate(tmp_path, "keys", "create", "shop")
    assert private.returncode == 0, private.stdout + private.stderr
    private_key = last_line(private.stdout)
    assert PRIVATE_KEY.fullmatch(private_key), private.stdout
    assert "shown once" in private.stderr

    public = eventgate(tmp_path, "keys", "create", "shop", "--public")
    assert public.returncode == 0, public.stdout + public.stderr
    public_key = last_line(public.stdout)
    assert PUBLIC_KEY.fullmatch(public_key), public.stdout

    assert_clean_failure(eventgate(tmp_path, "accounts", "create", "shop"), "already exists")
    assert_clean_failure(
        eventgate(tmp_path, "keys", "create", "nosuch"),
        "no account 'nosuch'",
        "eventgate accounts create nosuch",
    )

    listed = eventgate(tmp_path, "accounts", "list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert re.search(r"\bshop\b", listed.stdout), listed.stdout

    private_id = private_key.split(".")[0].removeprefix("eg_sk_")
    revoked = eventgate(tmp_path, "keys", "revoke", private_key)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert f"revoked key {private_id} of account shop" in revoked.stdout
    assert_clean_failure(
        eventgate(tmp_path, "keys", "revoke", private_key), f"no key with id '{private_id}'"
    )

    public_id = public_key.split(".")[0].removeprefix("eg_pk_")
    by_id = eventgate(tmp_path, "keys", "revoke", public_id)
    assert by_id.returncode == 0, by_id.stdout + by_id.stderr
    assert f"revoked key {public_id} of account shop" in by_id.stdout

    assert_nothing_left(tmp_path, {})


@pytest.mark.timeout(60)
def test_revoke_accepts_the_visible_key_prefix(tmp_path):
    """A key can be revoked by the part before the dot, as the README's example shows."""
    assert eventgate(tmp_path, "accounts", "create", "shop").returncode == 0
    key = last_line(eventgate(tmp_path, "keys", "create", "shop").stdout)
    revoked = eventgate(tmp_path, "keys", "revoke", key.split(".")[0])
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr


# --- settings errors -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["up"], ["serve"], ["worker"], ["accounts", "list"]])
def test_misspelt_setting_stops_start_up(tmp_path, command):
    """A misspelt EVENTGATE_* variable stops a command within seconds, naming it, with no
    traceback and nothing started."""
    started = time.monotonic()
    result = eventgate(tmp_path, *command, env=clean_env(prot="1"), timeout_s=20)
    elapsed = time.monotonic() - started
    assert_clean_failure(result, "EVENTGATE_PROT")
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (tmp_path / ".eventgate" / ADDRESS_FILE).exists()
    assert not processes_in(tmp_path)


# --- eventgate up --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_up_prints_a_working_banner_and_stops_on_sigterm(tmp_path, start_up):
    """From a clean directory `eventgate up` prints its URL, a demo key and a curl line whose
    event is stored within a second; SIGTERM stops everything it started."""
    port = free_port()
    t0 = time.monotonic()
    up = start_up(port=str(port))
    banner = up.wait_banner()
    banner_s = time.monotonic() - t0

    assert banner.base == f"http://127.0.0.1:{port}"
    assert PRIVATE_KEY.fullmatch(banner.key), banner
    assert banner.events_url == f"{banner.base}/v1/events"
    assert banner.headers["Authorization"] == f"Bearer {banner.key}"
    event = json.loads(banner.body)
    assert event == {"name": "page_view", "properties": {"path": "/"}}
    children = up.children()
    assert sum("-m ingest" in cmd for cmd in children.values()) == 1, children
    assert sum("-m workers" in cmd for cmd in children.values()) == 1, children

    # `up` waits for its front door only: a worker still starting delays the first row.
    worker_ready = "worker.started" in up.output()
    sent = time.monotonic()
    status, answer = post(banner.events_url, banner.body, banner.headers)
    answered = time.monotonic()
    assert status == 202, answer
    assert answer["accepted"] == 1
    assert answer["rejected"] == []
    # The event's id is minted by the front door: the row is found by its content.
    rows = wait_for_rows(tmp_path / ".eventgate" / "events.db", 1, timeout_s=5)
    post_to_row_s = time.monotonic() - sent
    assert rows, f"the event never reached the sink:\n{up.output()}"
    account, _event_id, name, properties = rows[0]
    assert (account, name, json.loads(properties)) == ("demo", "page_view", {"path": "/"})
    assert len(rows) == 1

    code, stop_s = up.stop(signal.SIGTERM)
    record(
        {
            "banner_s": round(banner_s, 3),
            "post_to_202_s": round(answered - sent, 4),
            "post_to_row_s": round(post_to_row_s, 4),
            "sigterm_stop_s": round(stop_s, 3),
            "worker_ready_at_post": worker_ready,
        }
    )
    assert post_to_row_s < 1.5, f"{post_to_row_s:.3f} s from POST to row ({worker_ready=})"
    assert code in {0, 128 + signal.SIGTERM}, up.output()
    assert stop_s < STOP_WITHIN_S
    assert "Traceback" not in up.output()
    assert_nothing_left(tmp_path, up.started)


@pytest.mark.timeout(120)
def test_up_again_prints_the_same_demo_key_and_stops_on_sigint(tmp_path, start_up):
    """A second `eventgate up` on the same directory prints the same, still valid, demo key;
    SIGINT (Ctrl-C) stops each run and everything it started."""
    port = free_port()
    first = start_up(port=str(port))
    key = first.wait_banner().key
    code, first_stop_s = first.stop(signal.SIGINT)
    assert code in {0, 128 + signal.SIGINT}, first.output()
    assert first_stop_s < STOP_WITHIN_S
    assert_nothing_left(tmp_path, first.started)

    second = start_up(port=str(port))
    banner = second.wait_banner()
    assert banner.key == key
    status, answer = post(banner.events_url, banner.body, banner.headers)
    assert status == 202, answer
    assert wait_for_rows(tmp_path / ".eventgate" / "events.db", 1, timeout_s=5)

    code, second_stop_s = second.stop(signal.SIGINT)
    record({"sigint_stop_s": round(max(first_stop_s, second_stop_s), 3)})
    assert code in {0, 128 + signal.SIGINT}, second.output()
    assert second_stop_s < STOP_WITHIN_S
    assert "Traceback" not in first.output() + second.output()
    assert_nothing_left(tmp_path, second.started)


def worker_pids(up: UpRun) -> set[int]:
    return {pid for pid, cmd in up.children().items() if "-m workers" in cmd}


@pytest.mark.timeout(120)
def test_up_restarts_a_killed_worker(tmp_path, start_up):
    """A worker SIGKILLed under `eventgate up` is replaced within seconds, and events sent
    afterwards are still stored."""
    up = start_up(port=str(free_port()))
    banner = up.wait_banner()
    web_pids = {pid for pid, cmd in up.children().items() if "-m ingest" in cmd}
    (killed,) = worker_pids(up)

    os.kill(killed, signal.SIGKILL)
    killed_at = time.monotonic()
    while not (replacements := worker_pids(up) - {killed}) and time.monotonic() - killed_at < 5:
        time.sleep(0.05)
    restart_s = time.monotonic() - killed_at
    assert replacements, f"no new worker:\n{up.output()}"
    assert restart_s < 3.5, f"a new worker after {restart_s:.2f} s"
    assert not _alive(killed)
    assert {pid for pid, cmd in up.children().items() if "-m ingest" in cmd} == web_pids

    sent = time.monotonic()
    status, answer = post(banner.events_url, banner.body, banner.headers)
    assert status == 202, answer
    rows = wait_for_rows(tmp_path / ".eventgate" / "events.db", 1, timeout_s=15)
    record(
        {
            "worker_restart_s": round(restart_s, 3),
            "post_to_row_after_restart_s": round(time.monotonic() - sent, 3),
        }
    )
    assert rows, f"the event never reached the sink:\n{up.output()}"
    assert rows[0][2] == "page_view"

    code, stop_s = up.stop(signal.SIGTERM)
    assert code in {0, 128 + signal.SIGTERM}, up.output()
    assert stop_s < STOP_WITHIN_S
    assert_nothing_left(tmp_path, up.started)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_up_stopped_during_start_up_leaves_nothing_behind(tmp_path, start_up, signum):
    """A signal that reaches `eventgate up` while it waits for its front door to answer stops
    the children it already started, not only the embedded Redis."""
    up = start_up(port=str(free_port()))
    deadline = time.monotonic() + 30
    while not any("-m ingest" in cmd for cmd in up.children().values()):
        assert up.process.poll() is None, up.output()
        assert time.monotonic() < deadline, up.output()
        time.sleep(0.01)
    assert BANNER_END not in up.output()  # still starting
    up.stop(signum)
    assert_nothing_left(tmp_path, up.started)


@pytest.mark.timeout(60)
def test_up_on_a_port_in_use_fails_instead_of_printing_a_banner(tmp_path, start_up):
    """A second `eventgate up` on a port another one already serves exits non-zero instead
    of announcing a demo key that the answering front door does not know."""
    port = str(free_port())
    start_up(tmp_path / "first", port=port).wait_banner()
    second = start_up(tmp_path / "second", port=port)
    deadline = time.monotonic() + 30
    while second.process.poll() is None and BANNER_END not in second.output():
        assert time.monotonic() < deadline, second.output()
        time.sleep(0.05)
    assert BANNER_END not in second.output()
    assert second.process.wait(30) != 0
