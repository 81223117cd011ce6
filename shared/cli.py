"""`eventgate`, the command line: run the gateway, manage accounts and keys."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path  # noqa: TC003 - typer reads annotations at run time
from typing import TYPE_CHECKING, Annotated, TypeVar

import msgspec
import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.table import Table

from shared import accounts, definitions, stats
from shared.bench.command import bench as bench_command
from shared.dlq_command import dlq_app
from shared.formats.person import PersonIn, create_person
from shared.limits import set_key_limit
from shared.load.command import load as load_command
from shared.logging import configure_logging
from shared.persons import PersonError
from shared.redis_server import redis_url_for
from shared.settings import Settings, settings_or_exit
from shared.stats_view import accounts_table, queues_table
from shared.supervisor import Child, Supervisor

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

app = typer.Typer(
    help="eventgate: an event ingestion gateway. HTTP in, Redis queue, exactly-once rows out.",
    no_args_is_help=True,
    add_completion=False,
)
accounts_app = typer.Typer(help="Create, change and list accounts (tenants).", no_args_is_help=True)
keys_app = typer.Typer(help="Create and revoke API keys.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
definitions_app = typer.Typer(help="Load and list event definitions.", no_args_is_help=True)
app.add_typer(definitions_app, name="definitions")
persons_app = typer.Typer(help="Create persons (profiles).", no_args_is_help=True)
app.add_typer(persons_app, name="persons")
# The load generator and the benchmark live in their own packages.
app.command("load")(load_command)
app.command("bench")(bench_command)
app.add_typer(dlq_app, name="dlq")  # dead letters: shared/dlq_command.py

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

DEMO_ACCOUNT = "demo"
DEMO_KEY_FILE = "demo.key"


def _settings(**overrides: object) -> Settings:
    """Settings from the environment, with command-line options written over them."""
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"EVENTGATE_{name.upper()}"] = str(value)
    return settings_or_exit()


@contextmanager
def _redis(settings: Settings) -> Iterator[aioredis.Redis]:
    """A client for the settings' Redis (the embedded one started if needed)."""
    with redis_url_for(settings) as url:
        yield aioredis.Redis.from_url(url)


def _run(settings: Settings, action: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def go(client: aioredis.Redis) -> T:
        try:
            return await action(client)
        finally:
            await client.aclose()

    with _redis(settings) as client:
        try:
            return asyncio.run(go(client))
        except accounts.AccountError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None


@app.command()
def up(
    port: Annotated[
        int | None, typer.Option(help="Port of the front door [default: 8080].")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [default: 1].")] = None,
) -> None:
    """Run everything on this machine: embedded Redis, front door, workers, SQLite sink,
    and a demo account whose key is printed with a ready curl line."""
    settings = _settings(port=port, workers=workers)
    configure_logging(settings)
    _check_port_free(settings.host, settings.port)
    with redis_url_for(settings) as url:
        key = asyncio.run(_demo_key(url, settings.data_dir))
        env = {**os.environ, "REDIS_URL": url}
        children = [Child("web", "ingest")] + [
            Child(f"worker-{i + 1}", "workers") for i in range(settings.workers)
        ]
        supervisor = Supervisor(children, env)
        # Whatever ends `up` from here (a signal while starting included, even between two
        # spawns), the children go first and Redis last.
        try:
            supervisor.start()
            base = f"http://{settings.host}:{settings.port}"
            if not _wait_healthy(f"{base}/healthz", supervisor):
                err.print("[red]error:[/] the front door did not start; see the log above")
                raise typer.Exit(1)
            _banner(base, key, settings)
            supervisor.run()
        finally:
            supervisor.stop()


def _check_port_free(host: str, port: int) -> None:
    """Refuse to start beside another server on the port: its /healthz would answer ours."""
    with socket.socket() as sock:
        # As aiohttp binds: a port left in TIME_WAIT by a previous run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            err.print(
                f"[red]error:[/] cannot listen on {host}:{port} ({exc.strerror}); "
                "stop what runs there or choose another port with --port or EVENTGATE_PORT"
            )
            raise typer.Exit(1) from None


def _banner(base: str, key: str, settings: Settings) -> None:
    event = '{"name": "page_view", "properties": {"path": "/"}}'
    curl = (
        f"curl -X POST {base}/v1/events -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{event}'"
    )
    out.print(f"\n[bold green]eventgate is up[/] at [bold]{base}[/]")
    out.print(f"  sink:     {settings.sink_url}")
    out.print(f"  workers:  {settings.workers}")
    out.print(f"  demo key: {key}")
    out.print("\nSend an event:\n")
    out.print(curl, soft_wrap=True, highlight=False)
    out.print("\nCtrl-C stops it.\n")


def _wait_healthy(url: str, supervisor: Supervisor, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    web = supervisor.children[0].process
    while time.monotonic() < deadline and web is not None and web.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our http URL
                return bool(response.status == HTTPStatus.OK)
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return False


async def _demo_key(url: str, data_dir: Path) -> str:
    """The demo account's key, kept in data_dir so every `up` prints the same one."""
    key_file = data_dir / DEMO_KEY_FILE
    client = aioredis.Redis.from_url(url)
    try:
        if key_file.exists():
            key = key_file.read_text().strip()
            parsed = accounts.parse_key(key)
            record = await accounts.lookup_key(client, parsed[0]) if parsed else None
            if parsed and record and accounts.secret_matches(record, parsed[1]):
                return key
        if await accounts.get_account(client, DEMO_ACCOUNT) is None:
            await accounts.create_account(client, DEMO_ACCOUNT)
        key = await accounts.create_key(client, DEMO_ACCOUNT, "private")
    finally:
        await client.aclose()
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    return key


@app.command()
def serve() -> None:
    """Run the front door (HTTP) only; settings from EVENTGATE_* and REDIS_URL."""
    _exec("ingest")


@app.command()
def worker(
    *,
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty.")] = False,
) -> None:
    """Run one worker process; run as many as you like, on any host sharing the Redis."""
    _exec("workers", *(["--burst"] if burst else []))


def _exec(module: str, *args: str) -> None:
    settings_or_exit()  # a bad setting is reported here, before anything starts
    os.execv(sys.executable, [sys.executable, "-m", module, *args])  # noqa: S606 - ours


@accounts_app.command("create")
def accounts_create(name: str) -> None:
    """Create an account (tenant)."""
    created = _run(_settings(), lambda client: accounts.create_account(client, name))
    out.print(f"created account [bold]{created.name}[/]; make a key: eventgate keys create {name}")


@accounts_app.command("list")
def accounts_list() -> None:
    """List accounts and their settings ("-": the default)."""
    found = _run(_settings(), accounts.list_accounts)
    table = Table(
        "account",
        "created",
        "accepts unregistered events",
        "rate (req/s, each API)",
        "burst",
        "process rate (events/s)",
        "shard",
    )
    for account in found:
        table.add_row(
            account.name,
            f"{account.created_at:%Y-%m-%d %H:%M}",
            str(account.accept_unregistered),
            *(
                "-" if value is None else f"{value:g}"
                for value in (account.rate, account.burst, account.process_rate, account.shard)
            ),
        )
    out.print(table)


@accounts_app.command("set")
def accounts_set(  # noqa: PLR0913 - one keyword option per setting
    name: str,
    *,
    accept_unregistered: Annotated[
        bool | None,
        typer.Option(
            "--accept-unregistered/--no-accept-unregistered",
            help="Whether events without a definition are accepted (the import dialect never"
            " accepts them).",
        ),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            help="Requests/s on each API; 0: no limit; 'default': the API's (people 250,"
            " bulk 2.5, others EVENTGATE_REQUEST_RATE)."
        ),
    ] = None,
    burst: Annotated[
        str | None,
        typer.Option(help="Requests at once; 'default': the API's, or one second's worth."),
    ] = None,
    process_rate: Annotated[
        str | None,
        typer.Option(
            help="Events/s workers write (more is deferred); 0: no limit; 'default':"
            " EVENTGATE_PROCESS_RATE."
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="The shard queue of its events; 'default': by a hash of its name."),
    ] = None,
) -> None:
    """Change an account's settings; every process uses them within EVENTGATE_KEY_CACHE_S."""
    given = {"rate": rate, "burst": burst, "process_rate": process_rate, "shard": shard}
    changes = {name: _setting(name, text) for name, text in given.items() if text is not None}
    updated = _run(
        _settings(),
        lambda client: accounts.update_account(
            client, name, accept_unregistered=accept_unregistered, changes=changes
        ),
    )
    out.print(
        f"account [bold]{updated.name}[/]: accepts unregistered events:"
        f" {updated.accept_unregistered}; rate {_or_default(updated.rate)}, burst"
        f" {_or_default(updated.burst)}, process rate {_or_default(updated.process_rate)},"
        f" shard {_or_default(updated.shard)}"
    )


def _setting(name: str, text: str) -> float | int | None:
    """A number from the command line, or None for 'default' (back to the default)."""
    if text.strip().lower() == "default":
        return None
    try:
        return int(text) if name in ("burst", "shard") else float(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a number (or 'default')", param_hint=name
        ) from None


def _or_default(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


@keys_app.command("create")
def keys_create(
    account: str,
    *,
    public: Annotated[
        bool, typer.Option("--public", help="A browser-side key: can only write events.")
    ] = False,
    operator: Annotated[
        bool,
        typer.Option(
            "--operator", help="A private key that also sees every account's figures (/v1/stats)."
        ),
    ] = False,
) -> None:
    """Create an API key. It is printed once, alone on the last line: only its hash is kept."""
    kind: accounts.KeyKind = "public" if public else "private"
    key = _run(
        _settings(),
        lambda client: accounts.create_key(client, account, kind, operator=operator),
    )
    role = "operator" if operator else kind
    err.print(f"{role} key for account {account} (shown once, store it now):")
    sys.stdout.write(key + "\n")


@keys_app.command("set")
def keys_set(
    key: Annotated[str, typer.Argument(help="The key, or its id.")],
    *,
    rate: Annotated[
        str,
        typer.Option(help="Requests/s for this key, besides its account's; 'default': none."),
    ],
    burst: Annotated[
        str | None, typer.Option(help="Requests at once; default: one second's worth.")
    ] = None,
) -> None:
    """Give a key a (lower) request limit of its own; front doors use it within
    EVENTGATE_KEY_CACHE_S."""
    new_rate, new_burst = _setting("rate", rate), _setting("burst", burst or "default")
    record = _run(
        _settings(),
        lambda client: set_key_limit(
            client, key, rate=new_rate, burst=None if new_burst is None else int(new_burst)
        ),
    )
    out.print(
        f"key {record.key_id} of account {record.account}: rate {_or_default(record.rate)},"
        f" burst {_or_default(record.burst)}"
    )


@app.command("stats")
def stats_command(
    *, as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False
) -> None:
    """Queues (waiting jobs, oldest job age) and per account accepted, persisted, duplicate,
    deferred and rate-limited counts, from Redis (every front door and worker adds to them)."""
    settings = _settings()
    figures, gateway = _run(settings, lambda client: stats.read_all(client, settings.queue))
    if as_json:
        sys.stdout.write(msgspec.json.encode({"accounts": figures, "gateway": gateway}).decode())
        sys.stdout.write("\n")
        return
    out.print(queues_table(gateway))
    out.print(accounts_table(figures))


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key, or its id.")]) -> None:
    """Revoke a key; every front door refuses it within EVENTGATE_KEY_CACHE_S seconds."""
    record = _run(_settings(), lambda client: accounts.revoke_key(client, key))
    out.print(f"revoked key {record.key_id} of account {record.account}")


@persons_app.command("create")
def persons_create(
    account: str,
    *,
    person_id: Annotated[str, typer.Option("--id", help="The person's id.")],
    external_id: Annotated[str | None, typer.Option(help="Its external id.")] = None,
    email: Annotated[str | None, typer.Option(help="Its email address.")] = None,
    phone: Annotated[str | None, typer.Option(help="Its phone number.")] = None,
) -> None:
    """Create a person: indexed at once (the people dialect finds it), its profile rows
    written by a worker. Run again with more identifiers to add them."""
    fields = {"id": person_id, "external_id": external_id, "email": email, "phone": phone}
    try:
        person = msgspec.convert({k: v for k, v in fields.items() if v is not None}, PersonIn)
    except msgspec.ValidationError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    settings = _settings()
    try:
        created = _run(settings, lambda client: create_person(client, settings, account, person))
    except PersonError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    verb = "created" if created else "updated"
    out.print(f"{verb} person [bold]{person.id}[/] of account {account}")


@definitions_app.command("load")
def definitions_load(
    account: str,
    file: Annotated[
        Path, typer.Argument(help="JSON or YAML: a list of {name, properties: {prop: {type}}}.")
    ],
) -> None:
    """Create or replace an account's event definitions from a file; the others stay."""
    try:
        loaded = definitions.parse_definitions(file.read_bytes())
        definitions.compile_definitions(loaded)  # every problem found before anything is stored
    except OSError as exc:
        err.print(f"[red]error:[/] cannot read {file}: {exc.strerror}")
        raise typer.Exit(1) from None
    except definitions.DefinitionError as exc:
        err.print(f"[red]error:[/] {file}: {exc}")
        raise typer.Exit(1) from None
    count = _run(_settings(), lambda client: _store_definitions(client, account, loaded))
    out.print(f"loaded {count} definition(s) into account [bold]{account}[/]")


async def _store_definitions(
    client: aioredis.Redis, account: str, loaded: list[definitions.Definition]
) -> int:
    if await accounts.get_account(client, account) is None:
        raise accounts.AccountError(f"no account {account!r}")
    return await definitions.put_definitions(client, account, loaded)


@definitions_app.command("list")
def definitions_list(account: str) -> None:
    """List an account's event definitions (* marks a required property)."""
    found = _run(_settings(), lambda client: _account_definitions(client, account))
    table = Table("event", "properties", "description")
    for definition in found:
        table.add_row(definition.name, _describe(definition.properties), definition.description)
    out.print(table)


async def _account_definitions(
    client: aioredis.Redis, account: str
) -> list[definitions.Definition]:
    if await accounts.get_account(client, account) is None:
        raise accounts.AccountError(f"no account {account!r}")
    return await definitions.list_definitions(client, account)


def _describe(properties: dict[str, definitions.PropertySpec]) -> str:
    """`sku: string*, lines: array[object]`: each property's type, * if required."""

    def kind(spec: definitions.PropertySpec) -> str:
        if spec.type == "array" and spec.items is not None:
            return f"array[{kind(spec.items)}]"
        return spec.type

    return ", ".join(
        f"{name}: {kind(spec)}{'*' if spec.required else ''}" for name, spec in properties.items()
    )


def main() -> None:
    app()
