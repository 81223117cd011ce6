"""Fixtures every test may use: canonical events made to order."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.event import Event, new_event_id

EventFactory = Callable[..., Event]

BASE_TIME = datetime(2025, 11, 18, 7, 21, 16, 527000, tzinfo=UTC)


@pytest.fixture
def event_factory() -> EventFactory:
    """Factory: a complete, distinct Event (fresh UUIDv7 id); keywords override fields."""

    def make(**overrides: Any) -> Event:
        fields: dict[str, Any] = {
            "account": "acme",
            "event_id": new_event_id(),
            "name": "purchase",
            "occurred_at": BASE_TIME,
            "received_at": BASE_TIME + timedelta(seconds=1),
            "source": "native",
            "identity": {"external_id": "cust-1"},
            "properties": {"productCode": "P-1", "quantity": 2, "gift": False, "tags": ["x"]},
            "items": [{"sku": "S-1", "qty": 2, "price": 9.99}],
            "value": 19.98,
            "currency": "EUR",
        }
        fields.update(overrides)
        return Event(**fields)

    return make
