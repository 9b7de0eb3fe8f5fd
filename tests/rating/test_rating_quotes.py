"""Rating: day-band aggregates, DST days, tiers, export credit, quotes, rounding stages and re-rating."""

import random
import tomllib
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.errors import ValidationError
from meterlink.headend.rating import (
    Promotion, lines_from_aggregates, merge_aggregates, quote, rate_changes, rate_interval, rate_intervals, rerate,
    standing_charges, tier_usage)
from meterlink.headend.tariff import BUNDLED_DIR, load_tariff, tariff_from_toml
from meterlink.headend.vee import DECREASE, Interval, derive_intervals, diff_intervals
from meterlink.readings import Reading

UTC = timezone.utc
Q = timedelta(minutes=15)
E7 = load_tariff(BUNDLED_DIR / "tariff_gb_economy7.toml")
ES = load_tariff(BUNDLED_DIR / "tariff_es_20td.toml")


def iv(start: datetime, wh: int, obis: str = "1.8.0", meter: str = "M1", flags=frozenset()) -> Interval:
    return Interval(meter, obis, start, start + Q, wh, False, frozenset(flags))


def flat(rate: str = "20.00", standing: str = "0", tiers: str = ""):
    text = f"""
[tariff]
id = "flat"
currency = "EUR"
timezone = "Europe/Dublin"
country = "IE"
[[version]]
valid_from = "2026-01-01"
standing_charge = "{standing}"
export_rate = "10"
[[version.band]]
name = "all"
rate = "{rate}"
windows = [{{ days = ["all"], from = "00:00", to = "24:00" }}]
{tiers}
"""
    return tariff_from_toml(tomllib.loads(text), text, "flat.toml")


def by_band(q):
    return {(line.kind, line.band): line for line in q.lines}


def test_hand_computed_economy7_day_with_standing_charge_and_export():
    d = datetime(2026, 1, 15, tzinfo=UTC)                      # winter: local time == UTC
    ivs = [iv(d, 1000), iv(d + timedelta(hours=12), 2000), iv(d + timedelta(hours=13), 2000, "2.8.0")]
    q = quote(E7, ivs, "A1", date(2026, 1, 15), date(2026, 1, 16))
    lines = by_band(q)
    night, day = lines[("energy", "night")], lines[("energy", "day")]
    assert (night.quantity_kwh, night.unit_price, night.amount_dec, night.net_minor) == (
        Decimal("1"), Decimal("0.1388"), Decimal("13.88"), 14)        # 1 kWh x 13.88 p
    assert (day.quantity_kwh, day.unit_price, day.net_minor) == (Decimal("2"), Decimal("0.3067"), 61)  # 61.34 p
    export = lines[("export", "export")]
    assert (export.quantity_kwh, export.unit_price, export.net_minor) == (Decimal("-2"), Decimal("0.15"), -30)
    standing = lines[("standing", "standing")]
    assert (standing.quantity_kwh, standing.unit_code, standing.unit_price, standing.net_minor) == (
        Decimal(1), "DAY", Decimal("0.5214"), 52)
    assert q.total_minor == 14 + 61 - 30 + 52 == sum(line.net_minor for line in q.lines)
    assert q.exact_total == Decimal("13.88") + Decimal("61.34") - Decimal("30") + Decimal("52.14")
    assert q.residue == Decimal(97) - q.exact_total


def day_intervals(local_day: date, tz: str = "Europe/London") -> list[Interval]:
    from zoneinfo import ZoneInfo
    z = ZoneInfo(tz)
    start = datetime(local_day.year, local_day.month, local_day.day, tzinfo=z).astimezone(UTC)
    nxt = local_day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=z).astimezone(UTC)
    out, t = [], start
    while t < end:
        out.append(iv(t, 100))
        t += Q
    return out


def test_spring_forward_day_has_23_hours_one_standing_charge_and_six_night_hours():
    ivs = day_intervals(date(2026, 3, 29))
    assert len(ivs) == 92                                      # 23 h of 15-minute intervals
    aggs = rate_intervals({}, ivs, E7, "A1")
    assert {k[1] for k in aggs} == {date(2026, 3, 29)}
    assert aggs[("A1", date(2026, 3, 29), "night")].wh == 24 * 100   # 00:00-01:00, 02:00-06:30, 23:30-24:00
    assert aggs[("A1", date(2026, 3, 29), "day")].wh == 68 * 100     # 06:30-23:30
    q = quote(E7, ivs, "A1", date(2026, 3, 29), date(2026, 3, 30))
    assert by_band(q)[("standing", "standing")].quantity_kwh == 1


def test_fall_back_day_has_25_hours_one_standing_charge_and_eight_night_hours():
    ivs = day_intervals(date(2026, 10, 25))
    assert len(ivs) == 100                                     # 25 h
    aggs = rate_intervals({}, ivs, E7, "A1")
    assert aggs[("A1", date(2026, 10, 25), "night")].wh == 32 * 100  # 01:00-02:00 happens twice
    assert aggs[("A1", date(2026, 10, 25), "day")].wh == 68 * 100
    q = quote(E7, ivs + day_intervals(date(2026, 10, 26)), "A1", date(2026, 10, 25), date(2026, 10, 27))
    assert by_band(q)[("standing", "standing")].quantity_kwh == 2
    assert sum(line.quantity_kwh for line in q.lines if line.kind == "energy") == Decimal("19.6")  # 100+96


def test_intervals_belong_to_the_local_day_of_their_local_start():
    # 22:30 UTC is 23:30 BST on 1 July; 23:15 UTC is 00:15 BST on 2 July: both night, two local dates
    aggs = rate_intervals({}, [iv(datetime(2026, 7, 1, 22, 30, tzinfo=UTC), 10),
                               iv(datetime(2026, 7, 1, 23, 15, tzinfo=UTC), 20)], E7, "A1")
    assert {k: a.wh for k, a in aggs.items()} == {("A1", date(2026, 7, 1), "night"): 10,
                                                   ("A1", date(2026, 7, 2), "night"): 20}


def test_spanish_national_holiday_is_priced_valle_all_day():
    madrid_11 = datetime(2026, 10, 12, 9, 0, tzinfo=UTC)            # 11:00 CEST
    aggs = rate_intervals({}, [iv(madrid_11, 1000), iv(madrid_11 + timedelta(days=1), 1000)], ES, "A1")
    assert aggs[("A1", date(2026, 10, 12), "valle")].amount_dec == Decimal("11.20")
    assert aggs[("A1", date(2026, 10, 13), "punta")].amount_dec == Decimal("24.50")


TIERS = '[[version.tier]]\nup_to_kwh = 100\nadder = "0"\n[[version.tier]]\nname = "above100"\nadder = "5.00"\n'


def test_tier_threshold_crossed_mid_day_prices_only_the_energy_above_it():
    t = flat(tiers=TIERS)      # first 100 kWh at 20.00 c, then 25.00 c (20.00 + 5.00)
    d1, d2 = datetime(2026, 11, 1, 12, tzinfo=UTC), datetime(2026, 11, 2, 8, tzinfo=UTC)
    ivs = [iv(d1, 80_000), iv(d2, 10_000), iv(d2 + timedelta(hours=10), 30_000),
           iv(datetime(2026, 12, 1, 9, tzinfo=UTC), 30_000)]           # December starts a new block count
    q = quote(t, ivs, "A1", date(2026, 11, 1), date(2027, 1, 1))
    tier = by_band(q)[("tier", "above100")]
    assert (tier.quantity_kwh, tier.unit_price, tier.net_minor) == (Decimal("20"), Decimal("0.05"), 100)
    energy = by_band(q)[("energy", "all")]
    assert energy.net_minor == 150 * 20
    assert q.total_minor == 150 * 20 + 20 * 5
    assert tier_usage(t, {date(2026, 11, 1): 80_000, date(2026, 11, 2): 40_000}) == {
        (date(2026, 11, 1), "block1"): 80_000, (date(2026, 11, 2), "block1"): 20_000,
        (date(2026, 11, 2), "above100"): 20_000}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_tiers_summed_over_any_order_of_arrival_equal_the_tiers_of_the_final_import(data):
    """Usage of two months arriving in random batches (late days, corrections up and down, then the final
    truth): the tier Wh each bill adds (`tier_delta` over what was billed before) sum to `tier_usage` of
    the final import, i.e. the blocks of a period do not depend on when its usage arrived."""
    from meterlink.headend.rating import tier_delta
    t = flat(tiers=TIERS)
    days = [date(2026, 10, 20) + timedelta(days=i) for i in range(25)]          # October into November
    final = {d: data.draw(st.integers(0, 12_000)) for d in days}
    billed: dict = {}
    total: dict = {}
    batches = [{d: data.draw(st.integers(0, 12_000)) for d in data.draw(st.lists(st.sampled_from(days), max_size=8,
                                                                                 unique=True))}
               for _ in range(data.draw(st.integers(0, 5)))]
    for state in [*batches, final]:                   # each batch: the days' values as known at that bill
        delta = {d: wh - billed.get(d, 0) for d, wh in state.items() if wh != billed.get(d, 0)}
        for k, wh in tier_delta(t, delta, billed).items():
            total[k] = total.get(k, 0) + wh
        for d, wh in delta.items():
            billed[d] = billed.get(d, 0) + wh
    assert {k: v for k, v in total.items() if v} == tier_usage(t, final)


def test_rounding_per_line_and_per_invoice_differ_and_the_invoice_stage_books_residue():
    t = flat(rate="10.5", standing="10.5")                    # 1 kWh -> 10.5 c, 1 day -> 10.5 c
    ivs = [iv(datetime(2026, 11, 2, 12, tzinfo=UTC), 1000)]
    per_line = quote(t, ivs, "A1", date(2026, 11, 2), date(2026, 11, 3), rounding_stage="line")
    per_invoice = quote(t, ivs, "A1", date(2026, 11, 2), date(2026, 11, 3), rounding_stage="invoice")
    assert [line.net_minor for line in per_line.lines] == [11, 11]
    assert (per_line.total_minor, per_line.residue) == (22, Decimal(1))
    assert sorted(line.net_minor for line in per_invoice.lines) == [10, 11]
    assert (per_invoice.total_minor, per_invoice.residue) == (21, Decimal(0))
    assert per_invoice.total_minor == sum(line.net_minor for line in per_invoice.lines)
    half_even = quote(t, ivs, "A1", date(2026, 11, 2), date(2026, 11, 3), rounding_mode="half_even")
    assert half_even.total_minor == 20


def test_held_intervals_and_unknown_registers_are_refused_by_name():
    bad = iv(datetime(2026, 11, 2, tzinfo=UTC), -5, flags={DECREASE})
    with pytest.raises(ValidationError, match="meter M1 register 1.8.0 interval .* held by VEE"):
        rate_intervals({}, [bad], E7, "A1")
    with pytest.raises(ValidationError, match="register 1.7.0 is not rated"):
        rate_intervals({}, [iv(datetime(2026, 11, 2, tzinfo=UTC), 5, "1.7.0")], E7, "A1")
    with pytest.raises(TypeError, match="LOCAL dates"):
        quote(E7, [], "A1", datetime(2026, 11, 1, tzinfo=UTC), date(2026, 11, 2))


def random_month(seed: int, n: int) -> list[Interval]:
    rng = random.Random(seed)
    base = datetime(2026, 10, 1, tzinfo=UTC)
    slots = rng.sample(range(31 * 96), n)
    return [iv(base + s * Q, rng.randrange(0, 3000), "2.8.0" if rng.random() < 0.2 else "1.8.0") for s in slots]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 300), st.integers(1, 6), st.sampled_from(["line", "invoice"]))
def test_quote_equals_the_sum_of_day_aggregates_rated_incrementally_in_any_batches(seed, n, batches, stage):
    ivs = random_month(seed, n)
    start, end = date(2026, 10, 1), date(2026, 11, 1)
    rng = random.Random(seed + 1)
    rng.shuffle(ivs)
    cuts = sorted(rng.sample(range(len(ivs) + 1), min(batches, len(ivs) + 1)))
    chunks = [ivs[a:b] for a, b in zip([0, *cuts], [*cuts, len(ivs)])]
    partials = [rate_intervals({}, c, E7, "A1") for c in chunks]
    rng.shuffle(partials)
    aggs = merge_aggregates(*partials, standing_charges(E7, "A1", start, end))
    assert aggs == merge_aggregates(rate_intervals({}, ivs, E7, "A1"), standing_charges(E7, "A1", start, end))
    from_aggs = lines_from_aggregates(E7, aggs.values(), start, end, account_id="A1", rounding_stage=stage)
    q = quote(E7, ivs, "A1", start, end, rounding_stage=stage)
    assert q == from_aggs
    assert q.exact_total == sum(a.amount_dec for a in aggs.values())
    assert q.total_minor == sum(line.net_minor for line in q.lines)
    assert sum(line.quantity_kwh for line in q.lines if line.kind == "energy") * 1000 == sum(
        i.wh for i in ivs if i.obis == "1.8.0")
    assert by_band(q)[("standing", "standing")].quantity_kwh == 31      # October: 25th has 25 h


def test_tariff_correction_rerate_yields_adjustments_summing_to_new_minus_old():
    corrected_text = (BUNDLED_DIR / "tariff_gb_economy7.toml").read_text().replace('"30.67"', '"29.99"')
    corrected = tariff_from_toml(tomllib.loads(corrected_text), corrected_text, "corrected.toml")
    ivs = random_month(7, 500)
    ivs = [i for i in ivs if i.start >= datetime(2026, 10, 1, tzinfo=UTC)]
    old = quote(E7, ivs, "A1", date(2026, 10, 1), date(2026, 11, 1))
    new = quote(corrected, ivs, "A1", date(2026, 10, 1), date(2026, 11, 1))
    adj = rerate(old.lines, new.lines)
    assert sum(a.net_minor for a in adj) == new.total_minor - old.total_minor != 0
    assert {(a.kind, a.band) for a in adj} == {("energy", "day")}     # night, export, standing unchanged
    assert sorted(a.quantity_kwh for a in adj)[0] < 0                  # old price reversed ...
    assert {a.unit_price for a in adj} == {Decimal("0.3067"), Decimal("0.2999")}   # ... new price added
    assert rerate(old.lines, old.lines) == ()


def test_real_reading_replacing_estimates_rerates_by_exactly_the_changed_energy():
    def rd(minutes, value):
        return Reading("M1", "1.8.0", datetime(2026, 11, 2, 6, 0, tzinfo=UTC) + timedelta(minutes=minutes), value, "Wh")
    before = derive_intervals([rd(0, 0), rd(60, 4000)]).intervals            # 06:00-07:00 UTC: 1000 Wh each
    after = derive_intervals([rd(0, 0), rd(30, 3000), rd(60, 4000)]).intervals
    changes = diff_intervals(before, after)
    aggs = rate_changes(rate_intervals({}, before, E7, "A1"), changes, E7, "A1")
    assert aggs == rate_intervals({}, after, E7, "A1")                       # night 06:00-06:30 gained 1 kWh
    day = date(2026, 11, 2)
    old_q = quote(E7, before, "A1", day, day + timedelta(days=1))
    new_q = quote(E7, after, "A1", day, day + timedelta(days=1))
    adj = rerate(old_q.lines, new_q.lines)
    assert {(a.band, a.quantity_kwh) for a in adj} == {("night", Decimal("1")), ("day", Decimal("-1"))}
    assert sum(a.net_minor for a in adj) == new_q.total_minor - old_q.total_minor
    assert sum(a.amount_dec for a in adj) == Decimal("13.88") - Decimal("30.67")


def test_split_at_cuts_lines_at_a_date_for_vat_changes_without_changing_the_total():
    ivs = random_month(3, 200)
    whole = quote(E7, ivs, "A1", date(2026, 10, 1), date(2026, 11, 1))
    split = quote(E7, ivs, "A1", date(2026, 10, 1), date(2026, 11, 1), split_at=[date(2026, 10, 15)])
    assert split.exact_total == whole.exact_total
    assert {(line.period_start, line.period_end) for line in split.lines} == {
        (date(2026, 10, 1), date(2026, 10, 15)), (date(2026, 10, 15), date(2026, 11, 1))}


def test_rating_intervals_in_bulk_equals_adding_them_one_by_one():
    ivs = random_month(11, 400)
    one_by_one = {}
    for i in ivs:
        agg = rate_interval(i, E7, "A1")
        one_by_one = merge_aggregates(one_by_one, {agg.key: agg})
    assert one_by_one == rate_intervals({}, ivs, E7, "A1")


def test_promotion_discounts_a_percentage_of_the_chosen_bands_within_its_dates():
    night_offer = Promotion("night10", "10 % off night energy in October", Decimal(10), frozenset({"night"}),
                            date(2026, 10, 1), date(2026, 11, 1))
    d = datetime(2026, 10, 20, 0, tzinfo=UTC)                 # 01:00 BST: night
    ivs = [iv(d, 1000), iv(d + timedelta(hours=12), 1000), iv(datetime(2026, 11, 2, 1, tzinfo=UTC), 1000)]
    q = quote(E7, ivs, "A1", date(2026, 10, 20), date(2026, 11, 3), promotions=[night_offer], standing=False)
    promo = by_band(q)[("promotion", "night10")]
    assert (promo.quantity_kwh, promo.unit_code, promo.unit_price) == (Decimal(-1), "C62", Decimal("0.01388"))   # 10 % of 13.88 p
    assert promo.amount_dec == Decimal("-1.388") and promo.net_minor == -1   # November night is not discounted
    assert q.total_minor == sum(line.net_minor for line in q.lines)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.decimals("0.01", "99.99", places=2), st.decimals("0.01", "99.99", places=2),
       st.sampled_from(["line", "invoice"]))
def test_rerate_adjustments_always_sum_to_new_minus_old(seed, day_rate, standing, stage):
    text = (BUNDLED_DIR / "tariff_gb_economy7.toml").read_text().replace('"30.67"', f'"{day_rate}"').replace(
        '"52.14"', f'"{standing}"')
    corrected = tariff_from_toml(tomllib.loads(text), text, "corrected.toml")
    old_ivs = random_month(seed, 300)
    new_ivs = [replace_wh(i, seed) for i in old_ivs]              # late data changed some intervals too
    window = (date(2026, 10, 1), date(2026, 11, 1))
    old = quote(E7, old_ivs, "A1", *window, rounding_stage=stage)
    new = quote(corrected, new_ivs, "A1", *window, rounding_stage=stage)
    adj = rerate(old.lines, new.lines)
    assert sum(a.net_minor for a in adj) == new.total_minor - old.total_minor
    assert sum(a.amount_dec for a in adj) == new.exact_total - old.exact_total
    assert all(a.description.startswith("Adjustment: ") for a in adj)


def replace_wh(i: Interval, seed: int) -> Interval:
    return i if (i.start.minute + seed) % 3 else Interval(i.meter_id, i.obis, i.start, i.end, i.wh + 7, True)
