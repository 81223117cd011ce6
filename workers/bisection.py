"""Bisecting a batch a sink refuses, so one poison event does not sink the others."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from workers.sinks.base import SinkRejectedError, WriteResult

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from shared.event import Event

# Writes one bisection may spend: finding one poison event among n costs about 2*log2(n)
# writes (20 for 1000), so this isolates a handful exactly; past it, what is still refused
# is dead-lettered in groups (a replay bisects them again).
BUDGET = 100


class Refused(NamedTuple):
    events: list[Event]
    reason: str


def write_bisecting(
    write: Callable[[Sequence[Event]], WriteResult],
    events: Sequence[Event],
    *,
    budget: int = BUDGET,
) -> tuple[WriteResult, list[Refused]]:
    """Write the events; if the sink rejects the batch, write each half, and so on down to
    single events. Returns what was written and the events refused, one per poison event
    (a group once `budget` writes are spent), with the sink's reason.

    Raises:
        SinkUnavailableError, SinkRefusedError: from `write`, as they come; what was
            written before stays written (the sink's key or markers make a retry harmless).
    """
    new = duplicate = 0
    refused: list[Refused] = []
    writes = 0
    stack = [list(events)]
    while stack:
        part = stack.pop()
        writes += 1
        try:
            result = write(part)
        except SinkRejectedError as exc:
            if len(part) == 1 or writes >= budget:
                refused.append(Refused(part, str(exc)))
            else:
                middle = len(part) // 2
                stack += [part[middle:], part[:middle]]  # the first half next
            continue
        new += result.new
        duplicate += result.duplicate
    return WriteResult(new=new, duplicate=duplicate), refused
