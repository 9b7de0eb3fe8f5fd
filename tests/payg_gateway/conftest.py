"""Shared fixtures for the gateway PAYG core: a GB market's friendly hours and a stepping simulator."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from meterlink.gateway.credit import AccountState, Decision, charge, decide_supply
from meterlink.gateway.friendly import friendly_config_from_mapping

UTC = timezone.utc
STEP = timedelta(minutes=15)

GB_FRIENDLY = {
    "timezone": "Europe/London", "country": "GB", "subdivision": "ENG", "public_holidays": True,
    "windows": [{"days": ["weekday"], "start": "18:00", "end": "10:00"},
                {"days": ["weekend"], "start": "00:00", "end": "24:00"}],
}


@pytest.fixture(scope="session")
def gb_friendly():
    return friendly_config_from_mapping(GB_FRIENDLY)


class Run:
    """Drive one account through 15-minute steps: charge the step's consumption, then decide."""

    def __init__(self, state: AccountState, friendly, at: datetime) -> None:
        self.state, self.friendly, self.at = state, friendly, at
        self.events: list = []
        self.decisions: list[tuple[datetime, Decision]] = []

    def apply(self, fn, *args) -> None:
        """Apply a transition `fn(state, *args, at)` at the current instant and keep its events."""
        self.state, events = fn(self.state, *args, self.at)
        self.events.extend(events)

    def step_until(self, end: datetime, wh_per_step: int, price="30", on_step=None) -> None:
        while self.at < end:
            self.at += STEP
            wh = wh_per_step if self.state.relay == "closed" else 0
            self.state, events = charge(self.state, wh, price, self.at)
            self.events.extend(events)
            decision = decide_supply(self.state, self.friendly, self.at)
            self.state = decision.state
            self.events.extend(decision.events)
            self.decisions.append((self.at, decision))
            if on_step:
                on_step(self)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def first_open(self) -> datetime | None:
        return next((t for t, d in self.decisions if d.relay == "open"), None)


@pytest.fixture
def run():
    return Run
