"""The gateway's usage reports carry the 1.8.0 import register range their consumption covers
(issue #6: the head-end books consumption a gateway restored from an old backup reports again only
once): one contiguous range per report, kept in the state file; none when the consumption is not
one range of readings (charged without registers, an older state file)."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.clock import SimClock
from meterlink.gateway import credit as C
from meterlink.gateway import payg as P
from meterlink.gateway import tokens as T
from meterlink.gateway.payg_sync import usage_to_proto

UTC = timezone.utc
HEAD_END = Ed25519PrivateKey.generate()
T0 = datetime(2026, 3, 9, 11, tzinfo=UTC)


class NoRelay:
    def read(self):
        return "closed"

    def command(self, position, command_id):
        return None


def meter(clock, path) -> P.PaygMeter:
    return P.PaygMeter("M1", NoRelay(), clock, cfg=C.PrepaymentConfig(), friendly=None, price=Decimal(30),
                       head_end_key=T.public_bytes(HEAD_END), state_path=path)


def wh_range(u: C.Usage) -> tuple:
    return u.import_wh_from, u.import_wh_to


def test_reports_carry_the_register_range_of_their_readings_and_a_restored_state_file_reports_from_its_own(
        tmp_path):
    clock = SimClock(T0)
    pm = meter(clock, tmp_path / "m1.json")
    pm.boot(10_000)                                   # the first reading: nothing charged yet
    assert wh_range(pm.peek_usage()) == (None, None)
    clock.advance(timedelta(minutes=15))
    pm.on_reading(12_000)
    clock.advance(timedelta(minutes=15))
    pm.on_reading(13_500)
    shutil.copy(tmp_path / "m1.json", tmp_path / "backup.json")     # the backup: last_import_wh 13 500

    report = pm.usage_report()
    assert (report.used_wh, wh_range(report)) == (3_500, (10_000, 13_500))
    pb = usage_to_proto(report)
    assert (pb.import_wh_from, pb.import_wh_to, pb.used_wh) == (10_000, 13_500, 3_500)
    clock.advance(timedelta(minutes=15))
    pm.on_reading(14_000)                             # after the report point: the next report's range
    assert wh_range(pm.state.unreported) == (13_500, 14_000) and wh_range(pm.state.in_flight) == (10_000, 13_500)
    assert wh_range(pm.peek_usage()) == (10_000, 14_000)
    # the state file keeps the ranges (a restart reports the same)
    again = meter(clock, tmp_path / "m1.json")
    assert again.state.in_flight == pm.state.in_flight and wh_range(again.state.unreported) == (13_500, 14_000)

    # the backup restored (new SD card): the register read now is charged from the backup's value,
    # and the report says so, so the head-end can tell what it booked already
    clock.advance(timedelta(minutes=15))
    shutil.copy(tmp_path / "backup.json", tmp_path / "restored.json")
    restored = meter(clock, tmp_path / "restored.json")
    restored.on_reading(15_000)
    report = restored.usage_report()
    assert (report.used_wh, wh_range(report)) == (5_000, (10_000, 15_000))
    pb = usage_to_proto(report)
    assert (pb.import_wh_from, pb.import_wh_to) == (10_000, 15_000)


def test_usage_without_one_contiguous_range_of_readings_reports_none():
    state = C.AccountState(account="M1", cfg=C.PrepaymentConfig())
    state, _ = C.charge(state, 1_000, Decimal(30), T0, register=(5_000, 6_000))
    state, _ = C.charge(state, 0, Decimal(30), T0 + timedelta(minutes=1), register=(6_000, 6_000))
    assert wh_range(state.unreported) == (5_000, 6_000)      # nothing consumed: the range stays
    state, _ = C.charge(state, 500, Decimal(30), T0 + timedelta(minutes=2), register=(6_000, 6_500))
    assert (state.unreported.used_wh, wh_range(state.unreported)) == (1_500, (5_000, 6_500))
    # consumption charged without its registers (an older caller): no range, the head-end books as before
    plain, _ = C.charge(state, 200, Decimal(30), T0 + timedelta(minutes=3))
    assert wh_range(plain.unreported) == (None, None)
    pb = usage_to_proto(plain.unreported)
    assert not pb.HasField("import_wh_from") and not pb.HasField("import_wh_to")
    # an in-flight report given back joins the usage since when the ranges meet, not otherwise
    state, _ = C.begin_report(state)
    state, _ = C.charge(state, 100, Decimal(30), T0 + timedelta(minutes=4), register=(6_500, 6_600))
    assert wh_range(C.abandon_report(state).unreported) == (5_000, 6_600)
    gap = C.Usage(used_wh=100, import_wh_from=7_000, import_wh_to=7_100)
    assert wh_range(state.in_flight.plus(gap)) == (None, None)
    # usage without consumption (a top-up, standing days) keeps the range of the consumption
    assert wh_range(C.Usage(tokens=(("t1", 500),)).plus(state.in_flight)) == (5_000, 6_500)
    assert wh_range(C.Usage(used_wh=10).plus(state.in_flight)) == (None, None)
