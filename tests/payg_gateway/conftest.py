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


@pytest.fixture
def payg_gateway(tmp_path):
    """A real `Gateway` (journal, Modbus TCP master to a firmware-sim SDM630 with a relay) with one
    ``[[payg]]`` meter H-1 on a simulated clock (Tuesday noon), offline. Call it with the extra
    ``[[payg]]`` lines; returns (gateway, hook, clock, simulated meter)."""
    from contextlib import ExitStack

    from meterlink.clock import SimClock
    from meterlink.gateway.config import load_config
    from meterlink.gateway.daemon import Gateway
    from meterlink.gateway.profiles import load_profile
    from meterlink.sim.meter import MeterModel
    from meterlink.sim.server import TcpServer

    stack = ExitStack()

    def make(extra: str = "", market: str = ""):
        clock = SimClock(datetime(2026, 3, 10, 12, tzinfo=UTC))
        meter = MeterModel.starting_at(load_profile("eastron_sdm630"), clock, unit=1, seed=5, import_wh=10_000)
        server = TcpServer({1: meter}).start()
        stack.callback(server.stop)
        (tmp_path / "market.toml").write_text(market or "[prepayment]\n")
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(f'[gateway]\nid = "GW-H"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 900\n'
                       f'\n[[bus]]\nport = "tcp://{server.address}"\n'
                       f'\n[[bus.meter]]\nid = "H-1"\nunit = 1\nprofile = "eastron_sdm630"\n'
                       f'\n[[payg]]\nmeter_id = "H-1"\naccount = "ACC1"\nprice_minor_per_kwh = "100"\n'
                       f'market = "market.toml"\nstate_dir = "{tmp_path / "payg"}"\n{extra}')
        gw = Gateway(load_config(str(cfg)), clock)
        stack.callback(gw.close)
        stack.callback(gw.payg.close)
        return gw, gw.payg, clock, meter

    yield make
    stack.close()
