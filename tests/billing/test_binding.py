"""Binding: effective-dated meter -> service point -> account, overlaps refused, parked stretches."""

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from meterlink.errors import ConfigError, ValidationError
from meterlink.headend.binding import (Account, Bindings, Customer, Meter, ServicePoint, bindings_from_csv,
                                       load_demo_bindings)

UTC = timezone.utc


def t(day, hour=0):
    return datetime(2026, 11, day, hour, tzinfo=UTC)


@pytest.fixture
def base():
    return Bindings(customers={"C1": Customer("C1", "GB"), "C2": Customer("C2", "GB")},
                    accounts={"A1": Account("A1", "C1"), "A2": Account("A2", "C2", "prepaid")},
                    service_points={"SP1": ServicePoint("SP1", "GB")},
                    meters={"M1": Meter("M1"), "M2": Meter("M2")}).validate()


def test_move_in_move_out_and_move_in_of_the_next_tenant(base):
    b = base.install("M1", "SP1", t(1)).move_in("SP1", "A1", t(1)).move_out("SP1", t(10)).move_in("SP1", "A2", t(12))
    assert b.account_at("M1", t(5)) == "A1"
    assert b.account_at("M1", t(10)) is None            # move-out is exclusive: void from 10th 00:00
    assert b.account_at("M1", t(11)) is None
    assert b.account_at("M1", t(12)) == "A2"
    spans = b.spans("M1")
    assert [(s.start.day, s.end.day if s.end else None, s.account_id) for s in spans] == [
        (1, 10, "A1"), (10, 12, None), (12, None, "A2")]


def test_meter_exchange_moves_the_account_to_the_new_meter(base):
    b = base.install("M1", "SP1", t(1)).move_in("SP1", "A1", t(1)).exchange_meter("M1", "M2", t(15, 6))
    assert b.account_at("M1", t(15, 5)) == "A1" and b.account_at("M1", t(15, 6)) is None
    assert b.account_at("M2", t(15, 6)) == "A1" and b.account_at("M2", t(15, 5)) is None
    assert b.installations[-1].reason == "exchange"


def test_two_accounts_on_one_service_point_at_once_is_refused_naming_both(base):
    b = base.install("M1", "SP1", t(1)).move_in("SP1", "A1", t(1))
    with pytest.raises(ValidationError, match=r"service point SP1: supply SP1 -> account A1 .* overlaps supply SP1 -> account A2"):
        b.move_in("SP1", "A2", t(5))


def test_one_meter_at_two_service_points_is_refused(base):
    b = replace(base, service_points={**base.service_points, "SP2": ServicePoint("SP2", "GB")})
    b = b.install("M1", "SP1", t(1), t(10))
    with pytest.raises(ValidationError, match="meter M1: installation meter M1 at SP1 .* overlaps"):
        b.install("M1", "SP2", t(9))
    assert b.install("M1", "SP2", t(10)).account_at("M1", t(11)) is None


def test_unknown_account_and_naive_instant_are_refused(base):
    with pytest.raises(ValidationError, match="unknown account A9"):
        base.move_in("SP1", "A9", t(1))
    with pytest.raises(ValidationError, match="no time zone"):
        base.install("M1", "SP1", datetime(2026, 11, 1))


def test_ending_a_binding_that_is_not_in_force_is_refused(base):
    with pytest.raises(ValidationError, match="service point SP1 has no binding in force"):
        base.move_out("SP1", t(3))


def test_back_dated_move_in_binds_previously_parked_time(base):
    b = base.install("M1", "SP1", t(1)).move_in("SP1", "A1", t(10))
    assert b.account_at("M1", t(5)) is None
    b2 = b.move_out("SP1", t(20)).move_in("SP1", "A2", t(1), t(10))
    assert b2.account_at("M1", t(5)) == "A2"


def test_demo_bindings_load_and_validate():
    b = load_demo_bindings()
    assert b.account_at("MTR-RTU-01", t(15)) == "A-GB-001"
    assert b.market_of_account("A-FR-001") == "FR"
    assert b.accounts["A-IE-001"].payment == "prepaid"


def test_a_bad_csv_row_names_file_and_line(tmp_path, base):
    p = tmp_path / "b.csv"
    p.write_text("kind,subject,target,from,to\ninstallation,M1,SP1,2026-11-01T00:00:00Z,\nfoo,M1,SP1,2026-11-01T00:00:00Z,\n")
    with pytest.raises(ConfigError, match=r"b.csv:3.*kind must be installation or supply"):
        bindings_from_csv(base, p)
    p.write_text("kind,subject,target,from,to\ninstallation,M1,SP1,yesterday,\n")
    with pytest.raises(ValidationError, match=r"b.csv:2: bad instant 'yesterday'"):
        bindings_from_csv(base, p)
