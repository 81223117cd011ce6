"""`eventgate bench`: options, the run, the table and the JSON file."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

PG_DSN_ENV = "EVENTGATE_TEST_PG_DSN"


def bench(  # noqa: PLR0913 - one option per knob
    *,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small run of a few seconds (what CI runs).")
    ] = False,
    json_path: Annotated[
        Path, typer.Option("--json", help="Where to write the figures as JSON.")
    ] = Path("bench.json"),
    repeats: Annotated[
        int | None, typer.Option(help="Runs per figure (the median is shown).", min=1)
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds per front-door and end-to-end run.", min=1)
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Connections of the load.", min=1)] = 32,
    redis_url: Annotated[
        str | None, typer.Option(help="A Redis to use (default: an embedded one, temporary).")
    ] = None,
    pg_dsn: Annotated[
        str | None,
        typer.Option(help=f"PostgreSQL server for the worker section (or ${PG_DSN_ENV})."),
    ] = None,
    wrk: Annotated[
        bool, typer.Option(help="Drive the front door with wrk when it is installed.")
    ] = True,
    loop: Annotated[
        Literal["asyncio", "uvloop"], typer.Option(help="Event loop of the servers.")
    ] = "asyncio",
    appendfsync: Annotated[
        Literal["always", "everysec"], typer.Option(help="The embedded Redis's AOF fsync.")
    ] = "always",
) -> None:
    """Measure eventgate against baselines in the same run: front door, worker, end to end,
    scaling with workers, memory. Starts everything it needs; prints one table."""
    # Imported here: the benchmark pulls in aiohttp, psycopg and rq, which every other
    # `eventgate` command would otherwise pay for at start.
    from shared.bench.run import Bench, BenchOptions  # noqa: PLC0415

    options = BenchOptions.quick() if quick else BenchOptions()
    options = replace(
        options,
        repeats=repeats or options.repeats,
        duration_s=duration or options.duration_s,
        concurrency=concurrency,
        redis_url=redis_url,
        pg_dsn=pg_dsn or os.environ.get(PG_DSN_ENV),
        use_wrk=wrk,
        loop=loop,
        appendfsync=appendfsync,
    )
    err = Console(stderr=True)
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        err.print("[red]error:[/] --loop uvloop needs uvloop: pip install uvloop")
        raise typer.Exit(2)
    report = Bench(options, err).run()
    out = Console()
    if not out.is_terminal:
        out = Console(width=120)  # a file or a pipe: no wrapping of the table at 80 columns
    out.print(report.table())
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    err.print(f"figures written to {json_path}")
