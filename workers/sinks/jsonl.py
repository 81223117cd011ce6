"""The JSON Lines file sink: one event per line, appended and fsynced per batch, the file
rotated by size (`events.jsonl` -> `events.jsonl.1` -> ...), for debugging and for piping
into other tools (`tail -F events.jsonl | jq`)."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from workers.sinks.base import SinkUnavailableError, WriteResult, event_record

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from shared.event import Event
    from shared.persons import Profile

MiB = 1024 * 1024
_ENCODER = msgspec.json.Encoder()


class JsonlSink:
    """Several workers may share the file: each batch is written under an exclusive lock on
    `<file>.lock`, which also makes rotation safe. No unique key: Redis markers keep a
    re-run batch from being appended twice (at-least-once across a crash in between)."""

    keyed = False
    keeps_profiles = False
    max_events: int | None = None

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = 100 * MiB, keep: int = 10
    ) -> None:
        """Raises:
        SinkUnavailableError: the directory cannot be created.
        """
        self.path = Path(path)
        self.name = f"jsonl://{self.path}"
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkUnavailableError(f"{self.name}: {exc}") from exc

    def write_batch(self, events: Sequence[Event]) -> WriteResult:
        """Append the events, one JSON object per line, and fsync.

        Raises:
            SinkUnavailableError: the file cannot be written (disk full, permissions).
        """
        if not events:
            return WriteResult(new=0, duplicate=0)
        data = b"".join(_ENCODER.encode(event_record(e)) + b"\n" for e in events)
        try:
            with self._locked():
                self._rotate_if_full(len(data))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise SinkUnavailableError(f"{self.name}: {exc}") from exc
        return WriteResult(new=len(events), duplicate=0)

    def _rotate_if_full(self, adding: int) -> None:
        """Shift `file.N` to `file.N+1` (dropping the oldest past `keep`) and `file` to
        `file.1` if this batch would take it past `max_bytes`; a batch is never split."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + adding <= self.max_bytes:
            return
        oldest = self._rotated(self.keep)
        oldest.unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            if self._rotated(n).exists():
                self._rotated(n).rename(self._rotated(n + 1))
        if self.keep > 0:
            self.path.rename(self._rotated(1))
        else:
            self.path.unlink()

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def upsert_profiles(self, profiles: Sequence[Profile]) -> int:  # noqa: ARG002 - events only
        return 0

    def close(self) -> None:
        """Nothing is held open between batches."""
