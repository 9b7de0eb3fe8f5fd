"""Offline card top-ups through a running gateway's card socket, reconciled by the head-end on sync
(real mutual-TLS gRPC, the daemon's PAYG hook on a real `Gateway` with a simulated meter and relay).

The gateway holds the signed card list and blacklist from its last answer; while it cannot reach
the head-end, a customer tops up with a card at the gateway (applied), and a card the head-end
blacklisted after that last answer is still accepted locally. At the next exchange the head-end
books both once and raises the second as a ``blacklisted_card_attempt`` caught on sync; the new
blacklist reaches the gateway with that answer and the card is refused locally from then on."""

from __future__ import annotations

from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.gateway import tokens as T
from meterlink.gateway.cardterminal import challenge_from_json, request
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.profiles import load_profile
from meterlink.headend import ledger as L
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer


def top_up(sock, card_id: str, key, amount: int) -> dict:
    ch = challenge_from_json(request(sock, {"op": "challenge", "meter": "H-1", "amount_minor": amount})["challenge"])
    return request(sock, {"op": "topup", "meter": "H-1", "card_id": card_id, "nonce": ch.nonce.hex(),
                          "signature": T.sign_ed25519(key, ch.signing_bytes()).hex()})


def test_offline_card_top_ups_are_booked_once_on_sync_and_a_card_blacklisted_since_is_caught(payg_headend, tmp_path):
    hd = payg_headend
    identity = hd.enrolled(tmp_path, "GW-H", meters=["H-1"])
    hd.store.bind_meter("H-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 1_000, "GBP", hd.store.vat)])
    card, lost = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    hd.store.register_card("CARD1", "ACC1", T.public_bytes(card), hd.clock.now())
    hd.store.register_card("CARD2", "ACC1", T.public_bytes(lost), hd.clock.now())
    meter = MeterModel.starting_at(load_profile("eastron_sdm630"), hd.clock, unit=1, seed=5, import_wh=10_000)
    server = TcpServer({1: meter}).start()
    sock = tmp_path / "cards.sock"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nid = "GW-H"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 900\n'
                   f'\n[headend]\naddress = "{hd.address}"\npki_dir = "{identity.state_dir}"\n'
                   f'\n[[bus]]\nport = "tcp://{server.address}"\n'
                   f'\n[[bus.meter]]\nid = "H-1"\nunit = 1\nprofile = "eastron_sdm630"\n'
                   f'\n[[payg]]\nmeter_id = "H-1"\naccount = "ACC1"\nprice_minor_per_kwh = "30"\n'
                   f'token_public_key = "{T.public_bytes(hd.token_key).hex()}"\nstate_dir = "{tmp_path / "payg"}"\n'
                   f'card_socket = "{sock}"\ntimeout_s = 5\n')
    gw = Gateway(load_config(str(cfg)), hd.clock)
    hook = gw.payg
    try:
        hook.boot()                                        # online: grant, signed card lists in the answer
        pm = hook.meters["H-1"]
        assert pm.card_list.find("CARD2") and pm.blacklist.card_ids == frozenset()
        window = pm.state.credit_balance
        # offline from here (no exchange): CARD2 is reported lost at the head-end meanwhile
        hd.clock.advance(timedelta(minutes=10))
        hd.store.blacklist_card("CARD2", hd.clock.now(), "lost")
        hd.clock.advance(timedelta(minutes=10))
        first = top_up(sock, "CARD1", card, 500)
        second = top_up(sock, "CARD2", lost, 300)          # the gateway's last blacklist does not have it yet
        assert first["applied"] and second["applied"]
        assert pm.state.credit_balance == window + 800
        hd.clock.advance(timedelta(minutes=10))
        hook.exchange("H-1")                               # back online: the report carries both top-ups
        hook.exchange("H-1")                               # and again: nothing booked twice
        ledger = list(hd.store.transactions())
        for ref in (first["reference"], second["reference"]):
            assert sum(1 for t in ledger if t.business_key == f"card-topup:{ref}") == 1
        assert L.customer_credit(ledger, "ACC1", "GBP") == 1_000 + 800
        assert L.totals_by_currency(ledger) == {"GBP": 0}
        caught = [e for e in hd.store.events(0, 100) if e.kind == "blacklisted_card_attempt"]
        assert [(e.payload["reference"], e.payload["caught"]) for e in caught] == [(second["reference"], "on_sync")]
        assert pm.blacklist.card_ids == frozenset({"CARD2"})   # the new signed blacklist came with the answer
        again = top_up(sock, "CARD2", lost, 300)
        assert again["applied"] is False and again["reason"] == "blacklisted"
    finally:
        hook.close()
        gw.close()
        server.stop()
