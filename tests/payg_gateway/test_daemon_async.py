"""Credit control off the bus thread, with the real `Gateway.run` (bus scheduler threads, journal, Modbus
TCP to firmware-sim meters with relay coils):

* with the head-end unreachable (a server that accepts connections and never answers), the other
  meter on the PAYG meter's bus keeps its polling schedule while the sync worker's attempts hang,
  and the PAYG meter's exhausted window still opens its relay at the poll that used it up;
* a card top-up at the running daemon re-arms the supply at once: the decision is queued as a
  RELAY-priority job that wakes the bus, not left to the meter's next poll.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import Event
from meterlink.clock import ScaledClock, SimClock, parse_instant, to_ms
from meterlink.gateway import tokens as T
from meterlink.gateway.cardterminal import challenge_from_json, request
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.profiles import load_profile
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer

UTC = timezone.utc
HEAD_END = Ed25519PrivateKey.generate()
CARD = Ed25519PrivateKey.generate()


def write_config(tmp_path, server, *, interval: int, headend: str | None = None, payg: str = "") -> str:
    cfg = tmp_path / "gateway.toml"
    he = f'\n[headend]\naddress = "{headend}"\n' if headend else ""
    cfg.write_text(f'[gateway]\nid = "GW-A"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = {interval}\n{he}'
                   f'\n[[bus]]\nport = "tcp://{server.address}"\ntimeout_s = 1.0\n'
                   f'\n[[bus.meter]]\nid = "H-1"\nunit = 1\nprofile = "eastron_sdm630"\n'
                   f'\n[[bus.meter]]\nid = "M-2"\nunit = 2\nprofile = "eastron_sdm630"\n'
                   f'\n[[payg]]\nmeter_id = "H-1"\naccount = "ACC1"\nprice_minor_per_kwh = "100"\n'
                   f'token_public_key = "{T.public_bytes(HEAD_END).hex()}"\nstate_dir = "{tmp_path / "payg"}"\n'
                   f'{payg}')
    return str(cfg)


def events(gw) -> list[tuple[str, dict]]:
    return [(r.body.kind, json.loads(r.body.payload)) for r in gw.journal.records() if isinstance(r.body, Event)]


def token(counter: int, amount: int, at: datetime) -> str:
    return T.TopUpToken(f"tok-{counter}", "H-1", counter, amount, "GBP", at, at + timedelta(days=30)).signed(
        HEAD_END).encode()


def test_an_unreachable_head_end_never_holds_the_bus_and_exhaustion_still_opens_the_relay(tmp_path):
    # a "head-end" that completes TCP handshakes (listen backlog) and never says a word
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(16)
    speed, interval = 240, 60                     # a poll every 0.25 s real; a 1 s hang = 4 grid instants
    clock = ScaledClock(datetime(2026, 3, 10, 12, tzinfo=UTC), speed)
    profile = load_profile("eastron_sdm630")
    meters = {u: MeterModel.starting_at(profile, clock, unit=u, seed=u, import_wh=10_000) for u in (1, 2)}
    server = TcpServer(meters).start()
    cfg = write_config(tmp_path, server, interval=interval, headend=f"127.0.0.1:{black_hole.getsockname()[1]}",
                       payg="sync_s = 600\ntimeout_s = 1.0\n")
    gw = Gateway(load_config(cfg), clock)
    gw.pusher.close()
    gw.pusher = None                              # this test is about credit control, not the journal push
    stop = threading.Event()
    try:
        hook = gw.payg
        pm = hook.meters["H-1"]
        # 25p of offline credit (a token typed in): at 1.00/kWh it lasts a few simulated minutes
        pm.enter_token(token(1, 25, clock.now()))
        assert pm.state.credit_balance == 25 and meters[1].relay_closed
        runner = threading.Thread(target=gw.run, args=(stop,), daemon=True)
        runner.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (hook.worker.exchanges >= 3 and pm.state.relay == "open"):
            time.sleep(0.05)
        stop.set()
        runner.join(10)
        assert not runner.is_alive()
        assert hook.worker.exchanges >= 3 and hook.online == {"H-1": False}
        # M-2 was read at every grid instant while the attempts hung (each 1 s real = 4 instants)
        polled = sorted({r.body.taken_at for r in gw.journal.records()
                         if getattr(r.body, "meter_id", None) == "M-2" and getattr(r.body, "obis", None) == "1.8.0"})
        grid = [to_ms(t) // (interval * 1000) for t in polled]          # the grid instant each poll served
        assert len(grid) >= 10 and grid == list(range(grid[0], grid[0] + len(grid))), grid
        # (boot's one exchange, before the buses start, delays the FIRST poll by up to timeout_s: docs/payg.md)
        # the window ran out at one poll, and that very poll opened the relay (the head-end never answered)
        ev = events(gw)
        charged = [p for k, p in ev if k == "credit.charged"]
        spent = [sum(p["from_credit"] for p in charged[:i + 1]) for i in range(len(charged))]
        exhausted = charged[spent.index(25)]                                 # the charge that used the 25p up
        [opened] = [p for k, p in ev if k == "relay.open"]
        assert opened["reason"] == "credit_exhausted"
        # decided right after that charge, in the same poll (before the meter's next reading)
        i = charged.index(exhausted)
        following = [parse_instant(p["at"]) for p in charged[i + 1:]]
        assert parse_instant(exhausted["at"]) <= parse_instant(opened["at"]) < min(
            following, default=parse_instant(exhausted["at"]) + timedelta(seconds=interval))
        assert not meters[1].relay_closed and pm.state.relay == "open"
        assert meters[2].relay_closed
    finally:
        stop.set()
        gw.close()
        server.stop()
        black_hole.close()


def test_a_card_top_up_at_the_running_daemon_closes_the_relay_at_once_not_at_the_next_poll(tmp_path):
    clock = SimClock(datetime(2026, 3, 10, 12, tzinfo=UTC))        # Tuesday noon: no friendly period
    profile = load_profile("eastron_sdm630")
    meters = {u: MeterModel.starting_at(profile, clock, unit=u, seed=u, import_wh=10_000) for u in (1, 2)}
    server = TcpServer(meters).start()
    sock = tmp_path / "cards.sock"
    gw = Gateway(load_config(write_config(tmp_path, server, interval=900, payg=f'card_socket = "{sock}"\n')), clock)
    stop = threading.Event()
    pm = gw.payg.meters["H-1"]
    pm.set_card_lists(T.CardList(1, clock.now(), (T.CardEntry("CARD1", "H-1", T.public_bytes(CARD)),)).signed(HEAD_END),
                      T.Blacklist(1, clock.now(), frozenset()).signed(HEAD_END))
    runner = threading.Thread(target=gw.run, args=(stop,), kwargs={"until": clock.now() + timedelta(days=2)},
                              daemon=True)
    try:
        runner.start()                            # boot: no credit -> the relay opens; then polls every 15 min
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (gw.workers and gw.workers[0].thread.is_alive()
                                                    and clock.now() > datetime(2026, 3, 10, 16, tzinfo=UTC)):
            time.sleep(0.01)
        sleeper = gw.workers[0].sleeper
        sleeper.join()                            # the test takes part in the lock step: simulated time stands
        try:
            assert not meters[1].relay_closed and pm.state.relay == "open"
            at = clock.now()
            ch = challenge_from_json(request(sock, {"op": "challenge", "meter": "H-1", "amount_minor": 500})["challenge"])
            answer = request(sock, {"op": "topup", "meter": "H-1", "card_id": "CARD1", "nonce": ch.nonce.hex(),
                                    "signature": T.sign_ed25519(CARD, ch.signing_bytes()).hex()})
            assert answer["applied"]
            deadline = time.monotonic() + 5
            # the bus writes the coil, reads it back, then records the state: wait for both (real threads)
            while time.monotonic() < deadline and not (meters[1].relay_closed and pm.state.relay == "closed"):
                time.sleep(0.01)
            assert meters[1].relay_closed and pm.state.relay == "closed"
            assert clock.now() == at                 # no poll instant passed: the bus thread ran it at once
        finally:
            sleeper.leave()
        stop.set()
        runner.join(10)
        ev = events(gw)
        [topup] = [p for k, p in ev if k == "card.topup"]
        [close] = [p for k, p in ev if k == "relay.close"]
        assert close["reason"] == "credit_restored" and parse_instant(close["at"]) == parse_instant(topup["at"]) == at
    finally:
        stop.set()
        gw.close()
        server.stop()
