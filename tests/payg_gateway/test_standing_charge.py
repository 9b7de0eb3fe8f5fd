"""Daily standing charges at the gateway (credit.charge_standing, TariffPrice.standing_gross, the
PaygMeter shell): one charge per local supply day of the pulled tariff, at the first evaluation on
or after local midnight, missed days charged once, drawn credit -> emergency credit -> debt,
rounded once with the consumption's residue; nothing with the flat fallback price."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterlink.clock import SimClock
from meterlink.errors import ValidationError
from meterlink.gateway import credit as C
from meterlink.gateway import payg as P
from meterlink.gateway.friendly import friendly_config_from_mapping
from meterlink.gateway.pricing import TariffPrice, tariff_from_text
from meterlink.headend.tariff import bundled_tariffs
from meterlink.money import round_minor

UTC = timezone.utc
E7 = tariff_from_text("gb-economy7", next(p for p in bundled_tariffs() if "economy7" in p.name).read_text())
PRICE = TariffPrice(E7, "gb-economy7", Decimal("0.05"), timedelta(minutes=30))
DAY_2026 = Decimal("52.14") * Decimal("1.05")        # 54.747 gross minor units per day (version 2026-01-01)


class ClosedRelay:
    """A meter relay that reads closed and accepts every command."""

    def read(self):
        return "closed"

    def command(self, position, command_id):
        return None


def standing_events(events):
    return [e for e in events if isinstance(e, C.StandingCharged)]


def run(state, instants, standing=PRICE):
    out = []
    for at in instants:
        state, events = C.charge_standing(state, standing, at)
        out += standing_events(events)
    return state, out


def test_the_gross_day_charge_is_the_version_in_force_that_local_day_plus_vat():
    assert PRICE.standing_zone == "Europe/London"
    assert PRICE.standing_gross(date(2025, 12, 31)) == Decimal("51.12") * Decimal("1.05")
    assert PRICE.standing_gross(date(2026, 1, 1)) == DAY_2026


def test_each_local_day_is_charged_once_at_its_local_midnight_across_both_dst_days():
    # every 10 minutes from Saturday 28 March 12:00 UTC to Tuesday 31 March 00:30 UTC (29 March: 23 h),
    # and from Saturday 24 October to Monday 26 October 00:30 UTC (25 October: 25 h)
    for start, end, days in ((datetime(2026, 3, 28, 12, tzinfo=UTC), datetime(2026, 3, 31, 0, 30, tzinfo=UTC),
                              ["2026-03-28", "2026-03-29", "2026-03-30", "2026-03-31"]),
                             (datetime(2026, 10, 24, 12, tzinfo=UTC), datetime(2026, 10, 26, 0, 30, tzinfo=UTC),
                              ["2026-10-24", "2026-10-25", "2026-10-26"])):
        n = (end - start) // timedelta(minutes=10)
        instants = [start + i * timedelta(minutes=10) for i in range(n + 1)]
        state, charged = run(C.AccountState("M1"), instants)
        assert [e.day.isoformat() for e in charged] == days
        # the first day at the first evaluation; every later one at the first evaluation at/after ITS local midnight
        assert charged[0].at == start
        zone = E7.zone
        for e in charged[1:]:
            midnight = datetime(e.day.year, e.day.month, e.day.day, tzinfo=zone).astimezone(UTC)
            assert midnight <= e.at < midnight + timedelta(minutes=10)
        # 29 March starts 00:00 GMT (= UTC); 25 October starts 00:00 BST (= 24 October 23:00 UTC)
        at = {e.day.isoformat(): e.at for e in charged}
        assert at.get("2026-03-29", datetime(2026, 3, 29, tzinfo=UTC)) == datetime(2026, 3, 29, tzinfo=UTC)
        assert at.get("2026-10-25", datetime(2026, 10, 24, 23, tzinfo=UTC)) == datetime(2026, 10, 24, 23, tzinfo=UTC)
        assert state.standing_charged_through.isoformat() == days[-1]
        assert state.unreported.standing_days == len(days) and state.unreported.standing_last_day == days[-1]
        # charging again at the same instant (idempotent on the day) charges nothing
        again, events = C.charge_standing(state, PRICE, instants[-1])
        assert standing_events(events) == [] and again.unreported == state.unreported


def test_a_gateway_off_for_three_days_charges_the_three_missed_days_at_its_next_evaluation_rounded_once():
    t0 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    state = replace(C.AccountState("M1"), credit_balance=10_000)
    state, first = run(state, [t0])
    assert [e.day for e in first] == [date(2026, 3, 9)]
    state, missed = run(state, [t0 + timedelta(days=3)])
    assert [e.day for e in missed] == [date(2026, 3, 10), date(2026, 3, 11), date(2026, 3, 12)]
    assert all(e.at == t0 + timedelta(days=3) for e in missed)
    # 54.747 a day, rounded once with the residue carried: 55, 54, 55, 55 (exact 218.988 -> 219)
    amounts = [e.amount_minor for e in first + missed]
    assert amounts == [55, 54, 55, 55] and sum(amounts) == round_minor(4 * DAY_2026, "half_up") == 219
    assert state.charge_residue == 4 * DAY_2026 - 219
    assert state.credit_balance == 10_000 - 219
    u = state.unreported
    assert (u.standing_minor, u.standing_days, u.standing_first_day, u.standing_last_day) == (
        219, 4, "2026-03-09", "2026-03-12")
    assert u.used_minor == 0 and u.window_spend == 219 and u.standing_from_credit == 219


def test_standing_and_consumption_share_one_rounding_residue():
    t0 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    state = replace(C.AccountState("M1"), credit_balance=100_000)
    exact, total, at = Decimal(0), 0, t0
    for i in range(200):                                     # 200 readings 37 minutes apart, ~5 days
        since, at = at, at + timedelta(minutes=37)
        wh = 113 + (i * 37) % 291
        exact += PRICE.amount(wh, since, at)
        state, ev = C.charge(state, wh, PRICE, at, since=since)
        state, sev = C.charge_standing(state, PRICE, at)
        exact += sum(PRICE.standing_gross(e.day) for e in standing_events(sev))
        total += sum(e.amount_minor for e in ev + sev if isinstance(e, (C.Charged, C.StandingCharged)))
    assert state.standing_charged_through == date(2026, 3, 14)
    assert total == round_minor(exact, "half_up")             # everything the exact sum, rounded once
    assert state.charge_residue == exact - total
    u = state.unreported
    assert u.used_minor + u.standing_minor == total and u.standing_days == 6


def test_standing_charges_draw_credit_then_accepted_emergency_credit_then_debt():
    t0 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    state = replace(C.AccountState("M1", C.PrepaymentConfig(emergency_credit_limit=60)), credit_balance=30,
                    emergency_credit_offered=True, emergency_credit_accepted=True)
    state, charged = run(state, [t0, t0 + timedelta(days=1)])
    a, b = charged
    assert (a.amount_minor, a.from_credit, a.from_emergency_credit, a.to_accumulated_debt) == (55, 30, 25, 0)
    assert (b.amount_minor, b.from_credit, b.from_emergency_credit, b.to_accumulated_debt) == (54, 0, 35, 19)
    assert (state.credit_balance, state.emergency_credit_used, state.accumulated_debt) == (0, 60, 19)
    u = state.unreported
    assert (u.standing_minor, u.standing_from_emergency, u.standing_to_debt, u.standing_from_credit) == (109, 60, 19, 30)


def test_inside_a_friendly_period_the_standing_charge_goes_to_debt_and_the_relay_stays_closed():
    friendly = friendly_config_from_mapping({"timezone": "Europe/London",
                                             "windows": [{"days": ["weekend"], "start": "00:00", "end": "24:00"}]})
    sat = datetime(2026, 3, 14, 9, tzinfo=UTC)               # Saturday, credit 20
    state = replace(C.AccountState("M1"), credit_balance=20)
    state, charged = run(state, [sat])
    assert charged[0].to_accumulated_debt == 35 and state.accumulated_debt == 35 and state.credit_balance == 0
    d = C.decide_supply(state, friendly, sat)
    assert d.relay == "closed" and d.reason == "friendly_credit_period" and not d.switch
    assert any(isinstance(e, C.FriendlyPeriodWarning) for e in d.events)
    state, charged = run(d.state, [sat + timedelta(days=1)])   # Sunday: another day, to debt, still supplied
    assert state.accumulated_debt == 35 + 54
    assert C.decide_supply(state, friendly, sat + timedelta(days=1)).relay == "closed"
    # Monday after midnight: the friendly span is over, credit exhausted -> the relay opens
    mon = datetime(2026, 3, 16, 0, 5, tzinfo=UTC)
    state, charged = run(state, [mon])
    d = C.decide_supply(state, friendly, mon)
    assert d.relay == "open" and d.reason == "friendly_period_ended" and state.accumulated_debt == 35 + 54 + 55


def test_the_flat_fallback_charges_no_standing_charge_and_its_days_are_never_charged_later():
    t0 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    state = replace(C.AccountState("M1"), credit_balance=1_000)
    state, none = run(state, [t0, t0 + timedelta(days=2)], standing=None)     # fallback from the start
    assert none == [] and state.standing_charged_through is None and state.credit_balance == 1_000
    state, charged = run(state, [t0 + timedelta(days=2, hours=1)])           # a tariff pulled on 11 March
    assert [e.day for e in charged] == [date(2026, 3, 11)]                  # no day before it was known
    state, none = run(state, [t0 + timedelta(days=2, hours=5), t0 + timedelta(days=4)], standing=None)
    assert none == [] and state.standing_suspended
    # the tariff is back on 13 March (a day already charged is never charged twice; fallback days never)
    state, charged = run(state, [t0 + timedelta(days=4, hours=1), t0 + timedelta(days=5)])
    assert [e.day for e in charged] == [date(2026, 3, 13), date(2026, 3, 14)]
    # back to the fallback and to the tariff on the same day: that day is not charged again
    state, _ = run(state, [t0 + timedelta(days=5, hours=1)], standing=None)
    state, charged = run(state, [t0 + timedelta(days=5, hours=2)])
    assert charged == [] and state.unreported.standing_days == 3


def test_a_new_grant_that_cannot_cover_window_standing_charges_turns_them_into_debt():
    t0 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    state = replace(C.AccountState("M1"), credit_balance=200)
    state, usage = C.begin_report(state)                               # report point
    state, _ = run(state, [t0, t0 + timedelta(days=1)])                # 109 from the old window after it
    state, _ = C.apply_grant(state, C.Grant("S", 1, t0 + timedelta(days=3), amount_minor=50), t0 + timedelta(days=1))
    u = state.unreported
    # the grant of 50 covers 50 of the 109 spent since the report point; 59 become debt, which the
    # grant's window (0 left) cannot repay
    assert (u.standing_minor, u.standing_to_debt, u.standing_from_credit) == (109, 59, 50)
    assert state.accumulated_debt == 59 and state.credit_balance == 0


def test_the_shell_charges_standing_with_the_pulled_tariff_persists_the_day_and_charges_missed_days_at_boot(tmp_path):
    clock = SimClock(datetime(2026, 3, 9, 10, tzinfo=UTC))

    def meter(price):
        return P.PaygMeter("M1", ClosedRelay(), clock, cfg=C.PrepaymentConfig(), friendly=None, price=price,
                           head_end_key=bytes(32), state_path=tmp_path / "M1.json")

    pm = meter(Decimal(30))
    pm.boot(1_000)
    pm.on_reading(1_100)
    assert standing_events(e for e, _ in pm.journal) == []                # flat fallback: none
    pm.set_price(PRICE, PRICE.describe())
    clock.advance(timedelta(minutes=15))
    pm.on_reading(1_150)
    assert standing_events(e for e, _ in pm.journal) == []                # no answer yet said it books them
    pm.set_headend_books_standing(True)                                   # an answer's books_standing_charges
    clock.advance(timedelta(minutes=15))
    pm.on_reading(1_200)
    assert [e.day for e in standing_events(e for e, _ in pm.journal)] == [date(2026, 3, 9)]
    # restart later the same day: the day is not charged again; then off until 12 March 08:00
    pm2 = meter(Decimal(30))
    pm2.set_price(PRICE, PRICE.describe())
    assert pm2.state.standing_charged_through == date(2026, 3, 9)
    pm2.boot(1_200)
    assert standing_events(e for e, _ in pm2.journal) == []
    clock.set(datetime(2026, 3, 12, 8, tzinfo=UTC))
    pm3 = meter(Decimal(30))
    pm3.set_price(PRICE, PRICE.describe())
    pm3.boot(1_500)
    days = [e.day for e in standing_events(e for e, _ in pm3.journal)]
    assert days == [date(2026, 3, 10), date(2026, 3, 11), date(2026, 3, 12)]
    assert pm3.state.unreported.standing_days == 4
    assert pm3.state.standing_charged_through == date(2026, 3, 12)
    assert P.status(tmp_path / "M1.json")["standing_charged_through"] == "2026-03-12"
    assert P.status(tmp_path / "M1.json")["headend_books_standing"] is True
    # an answer from an older head-end (books_standing_charges false): nothing more is deducted, and those
    # days are never charged later (that head-end could not have booked them); a newer answer resumes today
    pm3.set_headend_books_standing(False)
    assert P.status(tmp_path / "M1.json")["headend_books_standing"] is False
    clock.set(datetime(2026, 3, 14, 8, tzinfo=UTC))
    pm3.on_reading(1_600)
    assert [e.day for e in standing_events(e for e, _ in pm3.journal)] == days
    pm3.set_headend_books_standing(True)
    clock.set(datetime(2026, 3, 15, 8, tzinfo=UTC))
    pm3.on_reading(1_700)
    assert [e.day for e in standing_events(e for e, _ in pm3.journal)] == [*days, date(2026, 3, 15)]


def test_a_state_file_from_before_standing_charges_loads_and_charges_from_the_day_of_the_upgrade():
    # a state written by a gateway without standing charges: no standing_* fields, usage without them
    old = P.state_to_json(replace(C.AccountState("M1"), credit_balance=500,
                                  unreported=C.Usage(used_minor=5, used_wh=20, from_credit=5)))
    for k in ("standing_charged_through", "standing_suspended"):
        del old[k]
    old["unreported"] = {k: v for k, v in old["unreported"].items() if not k.startswith("standing_")}
    state = P.state_from_json(old, C.PrepaymentConfig())
    assert state.standing_charged_through is None and not state.standing_suspended
    assert state.unreported == C.Usage(used_minor=5, used_wh=20, from_credit=5)
    state, charged = run(state, [datetime(2026, 3, 12, 8, tzinfo=UTC)])     # days before the upgrade: never
    assert [e.day for e in charged] == [date(2026, 3, 12)] and state.credit_balance == 500 - 55
    assert (state.unreported.used_minor, state.unreported.standing_minor) == (5, 55)


def test_a_tariff_pulled_before_its_first_version_charges_nothing_until_it_starts_and_decisions_go_on():
    # a tariff whose first (only) version starts on Thursday 12 March 2026, pulled on Monday the 9th
    later = replace(E7, versions=(replace(E7.version_for(date(2026, 3, 12)), valid_from=date(2026, 3, 12)),))
    price = TariffPrice(later, "gb-economy7", Decimal("0.05"), timedelta(minutes=30))
    assert price.standing_gross(date(2026, 3, 11)) is None and price.standing_gross(date(2026, 3, 12)) == DAY_2026
    t0 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    state = replace(C.AccountState("M1"), credit_balance=0, relay="closed")
    state, charged = run(state, [t0, t0 + timedelta(days=1)], standing=price)   # no exception, nothing charged
    assert charged == [] and state.unreported.standing_days == 0
    assert state.standing_charged_through == date(2026, 3, 10)
    assert C.decide_supply(state, None, t0 + timedelta(days=1)).relay == "open"   # credit exhausted: decided
    # from its first day on, each day once: the 11th is before the tariff, the 12th and 13th are charged
    state, charged = run(state, [t0 + timedelta(days=4)], standing=price)
    assert [e.day for e in charged] == [date(2026, 3, 12), date(2026, 3, 13)]
    assert state.unreported.standing_days == 2


def test_consumption_before_the_tariffs_first_version_is_priced_at_the_fallback_and_after_it_by_the_tariff():
    later = replace(E7, versions=(replace(E7.version_for(date(2026, 3, 12)), valid_from=date(2026, 3, 12)),))
    flat = Decimal("30")
    price = TariffPrice(later, "gb-economy7", Decimal("0.05"), timedelta(minutes=30), before_start=flat)
    started = TariffPrice(E7, "gb-economy7", Decimal("0.05"), timedelta(minutes=30))
    # 2 kWh over the last hour of 11 March (local = UTC in March): all before the start, at the flat gross price
    t = datetime(2026, 3, 12, tzinfo=UTC)
    assert price.amount(2000, t - timedelta(hours=1), t) == Decimal(2000) * flat / 1000
    # an hour from 12 March 00:00: the tariff itself, as a tariff in force since long before prices it
    assert price.amount(2000, t, t + timedelta(hours=1)) == started.amount(2000, t, t + timedelta(hours=1))
    # across the start: the pre-start half at the flat price, the rest by the tariff (apportioned as VEE does)
    across = price.amount(2000, t - timedelta(hours=1), t + timedelta(hours=1))
    assert across == Decimal(1000) * flat / 1000 + started.amount(1000, t, t + timedelta(hours=1))
    # without a fallback the pre-start consumption cannot be priced, and the error says why
    with pytest.raises(ValidationError, match="no version in force on 2026-03-11"):
        TariffPrice(later, "gb-economy7", Decimal("0.05"), timedelta(minutes=30)).amount(
            2000, t - timedelta(hours=1), t)


def test_standing_charges_wait_for_an_answer_saying_the_headend_books_them(tmp_path):
    """A head-end older than the standing fields answers without `books_standing_charges`: it would drop
    used.standing_*, so the gateway deducts none (ledger and gateway stay equal); a current one says so."""
    from meterlink.clock import to_ms
    from meterlink.gateway.payg_sync import CreditSession
    from meterlink.v1 import payg_pb2

    clock = SimClock(datetime(2026, 3, 9, 10, tzinfo=UTC))

    class Stub:                                       # the head-end's answers, as the wire carries them
        def __init__(self):
            self.books = False

        def answer(self, req, timeout=None):
            now = to_ms(clock.now())
            return payg_pb2.CreditControlAnswer(
                session_id=req.session_id, request_number=req.request_number, result_code=2001,
                granted=payg_pb2.GrantedUnits(amount_minor=500, validity_time_s=86400, issued_at_ms=now,
                                              expires_at_ms=now + 86_400_000),
                balance_minor=2000, books_standing_charges=self.books)
        exchange = answer                             # CreditControlLink.exchange(req, timeout)

    pm = P.PaygMeter("M1", ClosedRelay(), clock, cfg=C.PrepaymentConfig(), friendly=None, price=PRICE,
                     head_end_key=bytes(32), state_path=tmp_path / "M1.json")
    session = CreditSession(pm, None, gateway_id="GW1", account="ACC1", state_path=tmp_path / "M1.session.json")
    session.link = stub = Stub()
    pm.boot(1_000)
    assert session.sync().outcome == "granted"
    clock.advance(timedelta(days=1))
    pm.on_reading(1_500)
    assert standing_events(e for e, _ in pm.journal) == [] and not pm.headend_books_standing
    stub.books = True                                 # the head-end was upgraded
    assert session.sync().outcome == "granted" and pm.headend_books_standing
    assert [e.day for e in standing_events(e for e, _ in pm.journal)] == [date(2026, 3, 10)]
    assert pm.usage_report().standing_days == 1       # ... and reported in the next update
