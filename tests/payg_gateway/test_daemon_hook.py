"""The daemon's PAYG hook on a real `Gateway` (journal, Modbus TCP master to the firmware simulator),
offline (no head-end): acceptance scenario 2 at the gateway — emergency credit is offered, used only
after the customer accepts it (`meterlink-gateway payg accept-emergency-credit`), and when it is
exhausted outside friendly hours the relay opens; every step is a hash-chained journal event."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meterlink.chain import Event
from meterlink.clock import SimClock
from meterlink.gateway import payg as P
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.profiles import load_profile
from meterlink.readings import Reading
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer

BIN = Path(sys.executable).parent


def test_emergency_credit_is_used_only_after_acceptance_and_its_exhaustion_opens_the_relay(tmp_path):
    clock = SimClock(datetime(2026, 3, 10, 12, tzinfo=timezone.utc))      # a Tuesday noon: no friendly period
    meter = MeterModel.starting_at(load_profile("eastron_sdm630"), clock, unit=1, seed=5, import_wh=10_000)
    server = TcpServer({1: meter}).start()
    (tmp_path / "market.toml").write_text(
        '[prepayment]\nemergency_credit_limit = 150\nemergency_credit_threshold = 100\n'
        '[friendly_credit]\ntimezone = "Europe/London"\ncountry = "GB"\npublic_holidays = true\n'
        'windows = [{ days = ["weekday"], start = "18:00", end = "10:00" }]\n')
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nid = "GW-H"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 900\n'
                   f'\n[[bus]]\nport = "tcp://{server.address}"\n'
                   f'\n[[bus.meter]]\nid = "H-1"\nunit = 1\nprofile = "eastron_sdm630"\n'
                   f'\n[[payg]]\nmeter_id = "H-1"\naccount = "ACC1"\nprice_minor_per_kwh = "100"\n'
                   f'market = "market.toml"\nstate_dir = "{tmp_path / "payg"}"\n')
    gw = Gateway(load_config(str(cfg)), clock)
    try:
        hook, master, profile = gw.payg, gw.masters[0], load_profile("eastron_sdm630")
        [meter_cfg] = gw.config.buses[0].meters

        def poll():
            clock.advance(timedelta(minutes=15))
            value = P.read_import_wh(master, 1, profile)
            hook.on_poll(meter_cfg, [Reading("H-1", "1.8.0", clock.now(), value, "Wh", 0)])

        hook.boot()                                            # no credit: the relay opens before the first poll
        pm = hook.meters["H-1"]
        assert pm.state.relay == "open" and not meter.relay_closed
        held = P.read_import_wh(master, 1, profile)
        poll()                                                 # emergency credit is offered, not used
        assert pm.state.emergency_credit_offered and not pm.state.emergency_credit_accepted
        assert P.read_import_wh(master, 1, profile) == held and pm.state.emergency_credit_used == 0
        out = subprocess.run([str(BIN / "meterlink-gateway"), "payg", "accept-emergency-credit", "--meter", "H-1",
                              "--state-dir", str(tmp_path / "payg")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        poll()                                                 # the request is picked up: supply re-armed
        assert pm.state.emergency_credit_accepted and meter.relay_closed and pm.state.relay == "closed"
        for _ in range(12):                                    # 150 at 1.00/kWh: under 3 hours
            poll()
            if pm.state.relay == "open":
                break
        assert pm.state.relay == "open" and not meter.relay_closed
        assert pm.state.emergency_credit_used == 150
        kinds = [(r.body.kind, json.loads(r.body.payload)) for r in gw.journal.records() if isinstance(r.body, Event)]
        names = [k for k, _ in kinds]
        assert names.index("credit.emergency_credit_offered") < names.index("credit.emergency_credit_taken")
        opens = [p for k, p in kinds if k == "relay.open"]
        assert [p["reason"] for p in opens] == ["credit_exhausted", "emergency_credit_exhausted"]
        assert all(p["command_id"].startswith("H-1-") for p in opens)
        assert "relay.close" in names
        assert not (tmp_path / "payg" / "H-1.accept-emergency-credit").exists()
        assert pm.journal == []          # on flash in the hash chain, so no longer held in memory
    finally:
        gw.close()
        server.stop()

