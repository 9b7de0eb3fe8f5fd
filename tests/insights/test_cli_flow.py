"""The operator's flow through the real CLI: import -> insights -> offers -> acceptance -> CRM export -> report."""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from meterlink.headend.binding import load_bindings
from meterlink.headend.cli import main
from meterlink.headend.rating import Promotion, quote
from meterlink.headend.store import open_repository
from meterlink.headend.tariff import bundled_tariffs, load_tariff
from meterlink.headend.usage import usage_by_account
from meterlink.headend.vat import load_markets

UTC = timezone.utc
DATA = Path(__file__).parent / "data"
BIND = ["--bindings", str(DATA / "bindings_gb.toml"), "--bindings-csv", str(DATA / "bindings_gb.csv")]


def profile(meter: str, hour: int) -> int:
    """Wh per half hour (GB grid) by UTC hour: M-1 night heavy, M-2 small and flat, M-3 tea-time peak, M-UNBOUND flat 240 W."""
    if meter == "M-1":
        return 600 if hour < 7 else 150
    if meter == "M-2":
        return 60
    if meter == "M-3":
        return 900 if 16 <= hour < 19 else 120
    return 120


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("flow")
    csv = d / "readings.csv"
    lines = ["meter,obis,timestamp,value,unit"]
    t0 = datetime(2026, 10, 1, tzinfo=UTC)
    for meter in ("M-1", "M-2", "M-3", "M-UNBOUND"):
        reg = 5_000_000
        for i in range(92 * 48 + 1):                     # October to December
            t = t0 + timedelta(minutes=30 * i)
            lines.append(f"{meter},1.8.0,{t.isoformat().replace('+00:00', 'Z')},{reg},Wh")
            reg += profile(meter, t.hour)
    csv.write_text("\n".join(lines) + "\n")
    url = f"sqlite:///{d / 'headend.db'}"
    assert main(["import", str(csv), "--database", url, "--json"]) == 0
    return url


def test_insights_command_stores_features_and_segments_for_every_account(db, capsys):
    assert main(["insights", "--period", "2026-11", "--database", db, "--json", *BIND]) == 0
    rows = {r["account_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"A-1", "A-2", "A-3"}
    # M-1: 14 half hours x 600 + 34 x 150 = 13500 Wh a day, 8400 of it before 07:00
    assert rows["A-1"]["avg_daily_wh"] == 13_500 and rows["A-1"]["night_share"] == "0.6222"
    assert rows["A-1"]["trend_prev"] == "0.0000"          # October had the same days
    assert "night_user" in rows["A-1"]["segments"]
    assert rows["A-2"]["segments"] == ["low_user"]         # 2880 Wh a day
    assert "peak_heavy" in rows["A-3"]["segments"]


def test_offers_are_shadow_rated_stored_once_and_exported_with_a_cursor(db, tmp_path, capsys):
    assert main(["promotions", "offer", "--period", "2026-11", "--lookback-months", "1", "--database", db,
                 "--json", *BIND]) == 0
    got = json.loads(capsys.readouterr().out)
    offers = {(o["promotion_id"], o["account_id"]): o for o in got["offers"]}
    switch = offers[("gb-e7-night-switch", "A-1")]
    # the CLI's saving is the library's shadow rating of the same intervals
    tariffs = {t.id: t for t in (load_tariff(p) for p in bundled_tariffs())}
    b = load_bindings(DATA / "bindings_gb.toml", [DATA / "bindings_gb.csv"])
    repo = open_repository(db)
    ivs = usage_by_account(repo, b, load_markets(), date(2026, 11, 1), date(2026, 12, 1), ["A-1"])["A-1"]
    repo.close()
    cur = quote(tariffs["gb-standard"], ivs, "A-1", date(2026, 11, 1), date(2026, 12, 1))
    e7 = quote(tariffs["gb-economy7"], ivs, "A-1", date(2026, 11, 1), date(2026, 12, 1))
    assert switch["saving_minor"] == cur.total_minor - e7.total_minor > 0
    assert ("gb-single-rate-switch", "A-1") not in offers                 # not in its segments
    assert ("gb-payg-bonus-5", "A-2") in offers and ("gb-payg-bonus-5", "A-1") not in offers  # prepaid only
    # A-3 is peak heavy on Economy 7: a single-rate switch is offered only if it saves
    if ("gb-single-rate-switch", "A-3") in offers:
        assert offers[("gb-single-rate-switch", "A-3")]["saving_minor"] > 0
    # offering again creates nothing new
    assert main(["promotions", "offer", "--period", "2026-11", "--lookback-months", "1", "--database", db,
                 "--json", *BIND]) == 0
    assert json.loads(capsys.readouterr().out)["new"] == 0
    out = tmp_path / "crm.jsonl"
    assert main(["promotions", "export", "--to", str(out), "--database", db]) == 0
    first = out.read_text().splitlines()
    assert len(first) == len(got["offers"]) and all(json.loads(l)["type"] == "promotion_offer" for l in first)
    assert main(["promotions", "export", "--to", str(out), "--database", db]) == 0
    assert out.read_text().splitlines() == first                     # nothing exported twice


def test_accepted_discount_is_priced_on_the_report_from_its_start_date(db, tmp_path, capsys):
    assert main(["promotions", "offer", "--period", "2026-11", "--lookback-months", "1", "--database", db, *BIND]) == 0
    # A-2 (low user) was never offered the winter discount: accepting it is refused
    assert main(["promotions", "accept", "--account", "A-2", "--promotion", "gb-winter-day-10",
                 "--from", "2026-11-15", "--database", db]) == 2
    # the promotion runs from 1 December: an earlier start is refused
    assert main(["promotions", "accept", "--account", "A-1", "--promotion", "gb-winter-day-10",
                 "--from", "2026-11-15", "--database", db]) == 2
    # A-1 (300 W base load) was offered it and accepts from 15 December
    assert main(["promotions", "accept", "--account", "A-1", "--promotion", "gb-winter-day-10",
                 "--from", "2026-12-15", "--database", db]) == 0
    assert main(["promotions", "accept", "--account", "A-1", "--promotion", "gb-winter-day-10",
                 "--from", "2026-12-15", "--database", db]) == 2          # only once
    capsys.readouterr()
    out = tmp_path / "a1.html"
    assert main(["report", "--account", "A-1", "--period", "2026-12", "--out", str(out), "--database", db, *BIND]) == 0
    page = out.read_text()
    net = int(re.search(r'id="net" data-minor="(-?\d+)"', page).group(1))
    tariffs = {t.id: t for t in (load_tariff(p) for p in bundled_tariffs())}
    b = load_bindings(DATA / "bindings_gb.toml", [DATA / "bindings_gb.csv"])
    repo = open_repository(db)
    ivs = usage_by_account(repo, b, load_markets(), date(2026, 12, 1), date(2027, 1, 1), ["A-1"])["A-1"]
    repo.close()
    promo = Promotion("gb-winter-day-10", "", Decimal(10), frozenset({"day", "standard"}), date(2026, 12, 15),
                      date(2027, 3, 1))
    with_promo = quote(tariffs["gb-standard"], ivs, "A-1", date(2026, 12, 1), date(2027, 1, 1), promotions=(promo,))
    without = quote(tariffs["gb-standard"], ivs, "A-1", date(2026, 12, 1), date(2027, 1, 1))
    assert net == with_promo.total_minor
    # 17 of 31 days discounted: 10 % of 17 x 13.5 kWh x 24.86p = 570.537p -> 571p off
    assert without.total_minor - with_promo.total_minor == 571
    assert "10 % off day-rate energy" in page or "gb-winter-day-10" in page or "promotion" in page.lower()


def test_market_report_and_outcomes_run_on_stored_results(db, tmp_path, capsys):
    assert main(["insights", "--period", "2026-11", "--database", db, *BIND]) == 0
    out = tmp_path / "gb.png"
    assert main(["report", "--market", "GB", "--period", "2026-11", "--out", str(out), "--database", db, *BIND]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 20_000
    html = tmp_path / "gb.html"
    assert main(["report", "--market", "GB", "--period", "2026-11", "--out", str(html), "--database", db, *BIND]) == 0
    # M-UNBOUND is installed nowhere: its 30 days x 48 half hours x 120 Wh of November are parked, not billed
    assert f"parked {30 * 48 * 120} Wh" in html.read_text()
    assert main(["promotions", "outcomes", "--json", "--database", db, *BIND]) == 0
    capsys.readouterr()


def test_bindings_loaded_into_the_database_are_used_without_files(db, capsys):
    assert main(["bindings", "load", "--toml", str(DATA / "bindings_gb.toml"), "--csv", str(DATA / "bindings_gb.csv"),
                 "--database", db]) == 0
    capsys.readouterr()
    assert main(["insights", "--period", "2026-11", "--database", db, "--json"]) == 0
    rows = {r["account_id"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {"A-1", "A-2", "A-3"}            # not the demo's A-GB-001...


def test_report_of_a_billed_month_shows_the_issued_invoice_numbers(db, tmp_path, capsys):
    assert main(["bindings", "load", "--toml", str(DATA / "bindings_gb.toml"), "--csv", str(DATA / "bindings_gb.csv"),
                 "--database", db]) == 0
    assert main(["bill", "--period", "2026-10", "--database", db, "--clock", "sim:2026-11-02T06:00:00Z"]) == 0
    capsys.readouterr()
    from meterlink.headend.billing_store import BillingStore
    store = BillingStore(db)
    invoices = {j["buyer_reference"]: j for _, _, j, _ in store.invoices(period="2026-10")}
    items = {d["account_id"]: d for _, d in store.items(period="2026-10")}
    store.close()
    out = tmp_path / "a3-oct.html"
    assert main(["report", "--account", "A-3", "--period", "2026-10", "--out", str(out), "--database", db]) == 0
    assert "(the issued bill)" in capsys.readouterr().out
    page = out.read_text()
    item = items["A-3"]
    assert int(re.search(r'id="gross" data-minor="(-?\d+)"', page).group(1)) == item["gross_minor"]
    assert int(re.search(r'id="vat" data-minor="(-?\d+)"', page).group(1)) == item["vat_minor"]
    assert [int(m) for m in re.findall(r"data-minor='(-?\d+)'", page)][:len(item["lines"])] == \
        [l["net_minor"] for l in item["lines"]]
    assert int(re.search(r'id="gross" data-minor="(-?\d+)"', page).group(1)) == \
        invoices["A-3"]["totals"]["gross_minor"]        # BT-115 payable of the issued invoice


def test_accepted_promotion_is_its_own_line_on_the_next_invoice_which_keeps_en16931_totals(db, capsys):
    from meterlink.headend.billing_store import BillingStore
    from meterlink.headend.ubl import check_en16931

    assert main(["bindings", "load", "--toml", str(DATA / "bindings_gb.toml"), "--csv", str(DATA / "bindings_gb.csv"),
                 "--database", db]) == 0
    assert main(["promotions", "offer", "--period", "2026-11", "--lookback-months", "1", "--database", db]) == 0
    main(["promotions", "accept", "--account", "A-1", "--promotion", "gb-winter-day-10", "--from", "2026-12-15",
          "--database", db])                     # may already be accepted by an earlier test of this module
    assert main(["bill", "--period", "2026-12", "--database", db, "--clock", "sim:2027-01-02T06:00:00Z"]) == 0
    capsys.readouterr()
    store = BillingStore(db)
    (inv,) = [(j, u) for _, _, j, u in store.invoices(period="2026-12") if j["buyer_reference"] == "A-1"]
    store.close()
    doc, ubl = inv
    promo = [l for l in doc["lines"] if "10 % off" in l["description"] or "winter" in l["description"].lower()]
    assert len(promo) == 1 and promo[0]["net_minor"] == -571        # 10 % of 17 days of 13.5 kWh at 24.86p
    assert check_en16931(ubl) == []
    assert doc["totals"]["net_minor"] == sum(l["net_minor"] for l in doc["lines"])
    # outcome tracking counts the realised cost: the discount line of the issued item
    assert main(["promotions", "outcomes", "--json", "--database", db]) == 0
    outs = {o["promotion_id"]: o for o in json.loads(capsys.readouterr().out)}
    assert outs["gb-winter-day-10"]["accepted"] == 1 and outs["gb-winter-day-10"]["cost_minor"] == 571
