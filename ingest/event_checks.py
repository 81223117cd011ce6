"""What every dialect checks of each decoded event: its time within a window, and how many
properties and items it carries. Cheap (no walk over values): the body's depth and string
sizes were checked before decoding (ingest.shape)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ingest.problems import FieldError

if TYPE_CHECKING:
    from collections.abc import Sized

    from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class EventChecks:
    """The limits as of one request: its time window is taken when the request arrives."""

    earliest: datetime
    latest: datetime
    max_properties: int
    max_items: int

    @classmethod
    def now(cls, settings: Settings) -> EventChecks:
        now = datetime.now(UTC)
        return cls(
            earliest=now - timedelta(seconds=settings.max_past_s),
            latest=now + timedelta(seconds=settings.max_future_s),
            max_properties=settings.max_properties,
            max_items=settings.max_items,
        )

    def timestamp(self, ts: datetime | None, field: str = "timestamp") -> FieldError | None:
        """Refuse times absurdly far ahead or back: clock bugs, milliseconds sent as seconds,
        0 read as 1970. No offset means UTC."""
        if ts is None:
            return None
        aware = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        if aware > self.latest:
            bound, where = self.latest, "after"
        elif aware < self.earliest:
            bound, where = self.earliest, "before"
        else:
            return None
        return FieldError(
            field=field,
            message=f"{ts.isoformat()} is {where} {bound:%Y-%m-%dT%H:%M:%SZ}: too far in the "
            + ("future" if where == "after" else "past"),
        )

    def properties(self, properties: Sized, field: str = "properties") -> FieldError | None:
        """An object of free-form members (properties, an item, attributes) that is too big."""
        if len(properties) <= self.max_properties:
            return None
        return FieldError(
            field=field,
            message=f"{len(properties)} members; at most {self.max_properties}",
        )

    def items(self, items: object, field: str = "items") -> FieldError | None:
        """Too many items, or an item object with too many members. Anything but a list (a
        vendor field that is not the items after all) is left to the other checks."""
        if not isinstance(items, list) or not items:
            return None
        if len(items) > self.max_items:
            return FieldError(field=field, message=f"{len(items)} items; at most {self.max_items}")
        for index, item in enumerate(items):
            if isinstance(item, dict) and len(item) > self.max_properties:
                return self.properties(item, f"{field}.{index}")
        return None
