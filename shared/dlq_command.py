"""`eventgate dlq list|show|replay|purge`: the dead letters (shared/dead_letters.py).

Replaying writes to the sinks, which only workers open (`shared` never imports `workers`):
`replay` runs `python -m workers.replay` with the same settings.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import msgspec
import redis
import typer
from rich.console import Console
from rich.markup import escape
from rq.registry import FailedJobRegistry

from shared.dead_letters import DeadLetter, DeadLetters
from shared.jobs import shard_queues
from shared.redis_server import redis_url_for
from shared.settings import Settings, settings_or_exit

if TYPE_CHECKING:
    from collections.abc import Iterator

dlq_app = typer.Typer(
    help="Dead letters: events a sink refused, or could not take within the retry window.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

Entries = Annotated[list[str] | None, typer.Argument(help="Entry ids (from `dlq list`).")]
AllEntries = Annotated[bool, typer.Option("--all", help="Every entry (of --sink, --account).")]
SinkName = Annotated[str | None, typer.Option(help="Only entries of this sink.")]
AccountName = Annotated[str | None, typer.Option(help="Only entries of this account.")]


@contextmanager
def _letters() -> Iterator[tuple[DeadLetters, redis.Redis, Settings]]:
    settings = settings_or_exit()
    with redis_url_for(settings) as url:
        client = redis.Redis.from_url(url)
        try:
            yield DeadLetters(client), client, settings
        finally:
            client.close()


@dlq_app.command("list")
def dlq_list(
    *,
    sink: SinkName = None,
    account: AccountName = None,
    limit: Annotated[int, typer.Option(help="At most this many, oldest first.")] = 200,
) -> None:
    """List dead-letter entries, oldest first."""
    with _letters() as (letters, client, settings):
        found = _matching(letters.list(limit), sink, account)
        failed = sum(
            FailedJobRegistry(queue, connection=client).count for queue in shard_queues(settings)
        )
    # Two plain lines an entry rather than a table: a terminal of any width shows the id
    # whole (replay and purge take it), and the lines grep well.
    for letter in found:
        facts = (
            f"{letter.kind}  {letter.count} event(s)  account {escape(letter.account)}"
            f"  attempts {letter.attempts}  last {letter.last_failure:%Y-%m-%d %H:%M:%S}"
        )
        out.print(f"[bold]{letter.id}[/]  {facts}", soft_wrap=True, highlight=False)
        out.print(
            f"    {letter.sink}: {letter.reason[:300]}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    events = sum(x.count for x in found)
    out.print(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}, {events} events")
    if failed:
        out.print(
            f"{failed} job(s) in rq's failed registry (unreadable envelopes, repeated crashes):"
            " `rq info`; they never reached a sink."
        )


@dlq_app.command("show")
def dlq_show(entry: str) -> None:
    """Show an entry: why, when, and its events (one JSON object a line)."""
    with _letters() as (letters, _, _):
        letter = letters.get(entry)
    if letter is None:
        err.print(f"[red]error:[/] no dead-letter entry {entry!r}")
        raise typer.Exit(1)
    for name in ("id", "sink", "account", "kind", "attempts", "count", "counted"):
        out.print(f"{name}: {getattr(letter, name)}", highlight=False)
    out.print(f"first_failure: {letter.first_failure.isoformat()}", highlight=False)
    out.print(f"last_failure: {letter.last_failure.isoformat()}", highlight=False)
    out.print(f"reason: {letter.reason}", highlight=False, soft_wrap=True)
    for event in letter.events:
        sys.stdout.write(msgspec.json.encode(event).decode() + "\n")


@dlq_app.command("replay")
def dlq_replay(
    entries: Entries = None,
    *,
    all_entries: AllEntries = False,
    sink: SinkName = None,
    account: AccountName = None,
) -> None:
    """Write entries' events again to their sink, exactly once; events still refused stay."""
    if not entries and not all_entries:
        err.print("[red]error:[/] name entries, or --all")
        raise typer.Exit(2)
    settings_or_exit()  # a bad setting is reported here, before anything starts
    args = [*(entries or [])]
    args += ["--sink", sink] if sink else []
    args += ["--account", account] if account else []
    os.execv(sys.executable, [sys.executable, "-m", "workers.replay", *args])  # noqa: S606 - ours


@dlq_app.command("purge")
def dlq_purge(
    entries: Entries = None,
    *,
    all_entries: AllEntries = False,
    sink: SinkName = None,
    account: AccountName = None,
) -> None:
    """Delete entries for good. Their events stay counted as dead-lettered."""
    if not entries and not all_entries:
        err.print("[red]error:[/] name entries, or --all")
        raise typer.Exit(2)
    with _letters() as (letters, _, _):
        chosen = (
            [letters.get(e) for e in entries]
            if entries
            else _matching(letters.list(1_000_000), sink, account)
        )
        purged = [x for x in chosen if x is not None and letters.remove(x)]
    out.print(f"purged {len(purged)} entr{'y' if len(purged) == 1 else 'ies'}")


def _matching(found: list[DeadLetter], sink: str | None, account: str | None) -> list[DeadLetter]:
    return [
        x
        for x in found
        if (sink is None or x.sink == sink) and (account is None or x.account == account)
    ]
