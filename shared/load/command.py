"""`eventgate load`: options, keys to use, the live display and the summary."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from typing import Annotated

import redis.asyncio as aioredis
import typer
from rich.console import Console

from shared import accounts
from shared.load.display import LiveView, summary_table
from shared.load.pacing import Burst, UnboundedRunError
from shared.redis_server import redis_url_for
from shared.settings import settings_or_exit

DEMO_KEY_FILE = "demo.key"  # what `eventgate up` writes in the data dir


def load(  # noqa: PLR0913 - one option per knob of the generator
    *,
    url: Annotated[
        str, typer.Option(help="The front door to load (never another host).")
    ] = "http://127.0.0.1:8080",
    key: Annotated[
        list[str] | None,
        typer.Option(help="API key; repeat for several accounts (default: the demo key)."),
    ] = None,
    accounts_: Annotated[
        int,
        typer.Option(
            "--accounts", help="Make this many accounts load-1..N (and keys) in the Redis."
        ),
    ] = 0,
    dialect: Annotated[str, typer.Option(help="Body shape and route.")] = "native",
    batch: Annotated[int, typer.Option(help="Events per request.")] = 100,
    rate: Annotated[
        float | None, typer.Option(help="Requests/s in total (default: as fast as it goes).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 16,
    burst_factor: Annotated[
        float | None, typer.Option(help="Bursts: this many times --rate ...")
    ] = None,
    burst_seconds: Annotated[float, typer.Option(help="... for this long ...")] = 2.0,
    burst_every: Annotated[float, typer.Option(help="... every this many seconds.")] = 30.0,
    duplicate_ratio: Annotated[
        float, typer.Option(help="Share of events resending an id already sent.")
    ] = 0.0,
    invalid_ratio: Annotated[
        float, typer.Option(help="Share of requests with an invalid event (expect 4xx).")
    ] = 0.0,
    duration: Annotated[float | None, typer.Option(help="Seconds to run (at most 3600).")] = None,
    requests: Annotated[int | None, typer.Option(help="Requests to send in all.")] = None,
    processes: Annotated[int, typer.Option(help="Generator processes.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Random seed, for repeatable runs.")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
) -> None:
    """Send producers' traffic to a front door: paced or flat out, with bursts, resends and
    invalid requests; always bounded by --duration and/or --requests."""
    # Imported here: aiohttp costs every other `eventgate` command time at start.
    from shared.load.runner import LoadConfig, run_load  # noqa: PLC0415

    err = Console(stderr=True)
    burst = None
    try:
        if burst_factor is not None:
            burst = Burst(burst_factor, burst_seconds, burst_every)
        config = LoadConfig(
            url=url,
            # Checked before any key is made, so a refused run changes nothing.
            keys=("made-below",),
            dialect=dialect,
            batch=batch,
            rate=rate,
            concurrency=concurrency,
            burst=burst,
            duplicate_ratio=duplicate_ratio,
            invalid_ratio=invalid_ratio,
            duration_s=duration,
            requests=requests,
            processes=processes,
            seed=seed,
        )
        config.check()
    except (UnboundedRunError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    config = replace(config, keys=_keys(tuple(key or ()), accounts_))
    limit = config.check()
    with LiveView(err, limit, requests) as view:
        stats = run_load(config, view.update)
    if json_out:
        sys.stdout.write(json.dumps(stats.summary()) + "\n")
    else:
        Console().print(summary_table(stats))
    if stats.sent and stats.answers.get("error", 0) == stats.sent:
        err.print(f"[red]error:[/] no answer from {url}: is the front door running there?")
        raise typer.Exit(1)


def _keys(given: tuple[str, ...], make: int) -> tuple[str, ...]:
    """The keys given, plus `make` new ones for accounts load-1..N; else the demo key."""
    if make:
        return given + _make_keys(make)
    if given:
        return given
    demo = settings_or_exit().data_dir / DEMO_KEY_FILE
    if demo.exists():
        return (demo.read_text().strip(),)
    Console(stderr=True).print(
        f"[red]error:[/] no API key: pass --key, or --accounts N (no {demo} to fall back on)"
    )
    raise typer.Exit(2)


def _make_keys(count: int) -> tuple[str, ...]:
    async def make(url: str) -> tuple[str, ...]:
        client = aioredis.Redis.from_url(url)
        made = []
        try:
            for i in range(1, count + 1):
                name = f"load-{i}"
                if await accounts.get_account(client, name) is None:
                    await accounts.create_account(client, name)
                made.append(await accounts.create_key(client, name, "private"))
        finally:
            await client.aclose()
        return tuple(made)

    with redis_url_for(settings_or_exit()) as url:
        return asyncio.run(make(url))
