"""`[[payg]]` tables in gateway.toml and the market file they point to: parsed, or refused naming the key."""

from __future__ import annotations


import pytest

from meterlink.errors import ConfigError
from meterlink.gateway.config import load_config
from meterlink.gateway.payg_sync import load_market

BASE = '''[gateway]
id = "GW-1"
database = "gw.db"

[[bus]]
port = "tcp://127.0.0.1:1502"

[[bus.meter]]
id = "M-1"
unit = 1
profile = "eastron_sdm630"
'''


def write(tmp_path, payg: str):
    p = tmp_path / "gateway.toml"
    p.write_text(BASE + payg)
    return p


def test_a_payg_table_is_parsed_with_paths_relative_to_the_config_file(tmp_path):
    (tmp_path / "market.toml").write_text(
        '[prepayment]\nemergency_credit_limit = 500\nreconnect = "customer_confirms"\n'
        '[friendly_credit]\ntimezone = "Europe/London"\ncountry = "GB"\npublic_holidays = true\n'
        'windows = [{ days = ["weekday"], start = "18:00", end = "10:00" }]\n')
    cfg = load_config(str(write(tmp_path, '\n[[payg]]\nmeter_id = "M-1"\naccount = "ACC1"\n'
                                          'price_minor_per_kwh = "28.5"\nmarket = "market.toml"\nsync_s = 60\n')))
    [p] = cfg.payg
    assert (p.meter_id, p.account, p.price_minor_per_kwh, p.sync_s) == ("M-1", "ACC1", "28.5", 60.0)
    assert p.market == str(tmp_path / "market.toml")
    prepay, friendly = load_market(p.market, "GBP")
    assert prepay.emergency_credit_limit == 500 and prepay.reconnect == "customer_confirms"
    assert friendly is not None and friendly.timezone == "Europe/London"


def test_a_config_without_payg_has_no_payg_meters(tmp_path):
    assert load_config(str(write(tmp_path, ""))).payg == ()


@pytest.mark.parametrize("table, key, message", [
    ('meter_id = "M-9"\naccount = "A"\n', "meter_id", "not configured on any [[bus]]"),
    ('meter_id = "M-1"\naccount = "A"\nprice_minor_per_kwh = "-3"\n', "price_minor_per_kwh", "non-negative"),
    ('meter_id = "M-1"\naccount = "A"\nsync_s = 0\n', "sync_s", "positive"),
    ('meter_id = "M-1"\naccount = "A"\ncolour = "red"\n', "colour", "unknown key"),
    ('meter_id = "M-1"\naccount = "A"\ncard_socket = "/run/' + "x" * 100 + '.sock"\n', "card_socket", "too long"),
])
def test_a_bad_payg_table_is_refused_naming_the_key(tmp_path, table, key, message):
    with pytest.raises(ConfigError) as err:
        load_config(str(write(tmp_path, "\n[[payg]]\n" + table)))
    assert key in str(err.value) and message in str(err.value)


def test_a_market_file_with_an_unknown_prepayment_key_is_refused(tmp_path):
    (tmp_path / "m.toml").write_text("[prepayment]\nemergency_credit = 5\n")
    with pytest.raises(ConfigError, match="emergency_credit"):
        load_market(str(tmp_path / "m.toml"), "GBP")
    assert load_market(None, "EUR")[0].currency == "EUR"


def test_the_card_socket_is_optional_and_relative_to_the_config_file(tmp_path):
    table = '\n[[payg]]\nmeter_id = "M-1"\naccount = "ACC1"\n'
    assert load_config(str(write(tmp_path, table))).payg[0].card_socket is None
    [p] = load_config(str(write(tmp_path, table + 'card_socket = "run/cards.sock"\n'))).payg
    assert p.card_socket == str(tmp_path / "run" / "cards.sock")
