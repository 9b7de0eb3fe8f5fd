"""Head-end CRM events: offline card top-ups reconciled on sync, over-usage, export cursor to a real Mosquitto."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from meterlink.gateway.payg import MqttPublisher
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as PS

UTC = timezone.utc
T0 = datetime(2026, 3, 9, 12, tzinfo=UTC)


def store_with_card(tmp_path, account="ACC1") -> PS.PaygStore:
    store = PS.PaygStore(f"sqlite:///{tmp_path}/h.db")
    store.put_account(account, "GBP")
    store.register_card("CARD1", account, b"\x01" * 32, T0 - timedelta(days=30))
    return store


def offline(ref: str, at: datetime, account="ACC1") -> PS.OfflineCardTopUp:
    return PS.OfflineCardTopUp(f"card:CARD1:{ref}", "CARD1", account, 1000, "GBP", at, "GW1")


def test_a_card_blacklisted_after_the_gateways_last_sync_is_caught_on_reconciliation(tmp_path):
    store = store_with_card(tmp_path)
    store.blacklist_card("CARD1", T0, "stolen")                 # the gateway synced before this
    caught = PS.reconcile_offline_card_topups(store, [offline("aa", T0 - timedelta(hours=1)),
                                                      offline("bb", T0 + timedelta(hours=2))])
    assert caught == ["card:CARD1:bb"]
    [event] = store.events()
    assert event.kind == "blacklisted_card_attempt" and event.payload["caught"] == "on_sync"
    assert event.payload["channel"] == "gateway_offline" and event.payload["gateway"] == "GW1"
    # the credit was given offline, so it is booked (once), and the ledger still sums to zero
    assert store.account("ACC1").balance_minor == 2000
    assert PS.reconcile_offline_card_topups(store, [offline("bb", T0 + timedelta(hours=2))]) == []
    assert store.account("ACC1").balance_minor == 2000 and len(store.events()) == 1
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0}


def test_head_end_events_are_exported_to_mosquitto_once_past_the_cursor(tmp_path, mqtt_broker, subscriber):
    account = f"ACC-{uuid.uuid4().hex[:8]}"
    store = store_with_card(tmp_path, account)
    store.append([L.top_up("seed", T0, account, "V1", 1000, "GBP", store.vat)])
    cc = CC.CreditControl(store, CC.InMemorySessionStore(), CC.GrantPolicy(max_grant_minor=200),
                          L.PrepaidVat(Decimal("0.05")))
    granted = cc.reserve(CC.initial("S1", account, "M1", "GBP"), T0).answer.grant.amount_minor
    out = cc.update(CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, 1, account, "M1", "GBP", 350, 0),
                    T0 + timedelta(hours=4))
    for e in out.events:
        PS.record_over_usage(store, e)
    store.blacklist_card("CARD1", T0, "lost")
    PS.reconcile_offline_card_topups(store, [offline("cc", T0 + timedelta(hours=5), account)])
    sub = subscriber(f"meterlink/v1/crm/+/{account}")
    publisher = MqttPublisher(*mqtt_broker)
    try:
        cursor = PS.export_events(store, publisher, 0)
        again = PS.export_events(store, publisher, cursor)
    finally:
        publisher.close()
    messages = sub.wait_for(2)
    assert cursor == again == 2
    assert [p["kind"] for _, p in messages] == ["over_usage", "blacklisted_card_attempt"]
    over = messages[0][1]
    assert over["amount_minor"] == 350 - granted and over["meter"] == "M1" and over["source"] == "headend"
    assert messages[0][0] == f"meterlink/v1/crm/over_usage/{account}"
    assert L.balance(store.transactions(), L.debt(account), "GBP") == 350 - granted


def test_over_usage_report_command_lists_debt_booked_per_account_and_meter(tmp_path, capsys):
    import json

    from meterlink.headend.cli import main
    store = store_with_card(tmp_path)
    store.append([L.top_up("seed", T0, "ACC1", "V1", 1000, "GBP", store.vat)])
    cc = CC.CreditControl(store, CC.InMemorySessionStore(), CC.GrantPolicy(max_grant_minor=200),
                          L.PrepaidVat(Decimal("0.05")))
    granted = cc.reserve(CC.initial("S1", "ACC1", "M1", "GBP"), T0).answer.grant.amount_minor
    for n, used in ((1, granted + 40), (2, 10_000)):
        out = cc.update(CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, n, "ACC1", "M1", "GBP", used,
                                                0), T0 + timedelta(hours=n))
        for e in out.events:
            PS.record_over_usage(store, e)
    debt = L.balance(store.transactions(), L.debt("ACC1"), "GBP")
    store.close()
    assert main(["over-usage", "--period", "2026-03", "--json", "--database", f"sqlite:///{tmp_path}/h.db"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["account_id"], row["meter"], row["events"], row["amount_minor"]) == ("ACC1", "M1", 2, debt)
    assert main(["over-usage", "--period", "2026-04", "--database", f"sqlite:///{tmp_path}/h.db"]) == 0
    assert "ACC1" not in capsys.readouterr().out
