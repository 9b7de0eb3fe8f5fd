"""Shared builders for the billing tests (plain functions, no fixtures with hidden state)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from meterlink.headend.binding import Account, Bindings, Customer, Meter, ServicePoint
from meterlink.headend.tariff import bundled_tariffs, load_tariff
from meterlink.headend.vat import load_markets, load_vat_table
from meterlink.readings import Reading

UTC = timezone.utc
MARKETS = load_markets()
VAT = load_vat_table()
TARIFFS = {t.id: t for t in (load_tariff(p) for p in bundled_tariffs())}


def utc(y, mo, d, h=0, mi=0):
    return datetime(y, mo, d, h, mi, tzinfo=UTC)


def hourly_readings(meter, start, hours, wh_per_hour=500, base=1_000_000, obis="1.8.0", skip=()):
    """A cumulative register read every hour from `start` (UTC) for `hours` hours; `skip` = hour indexes lost."""
    out = []
    for h in range(hours + 1):
        if h in skip:
            continue
        out.append(Reading(meter, obis, start + timedelta(hours=h), base + h * wh_per_hour, "Wh"))
    return out


def gb_bindings(start=utc(2026, 10, 1), accounts=("A1",), market="GB", tariff="gb-economy7"):
    b = Bindings(customers={"C1": Customer("C1", market, "Ada Lovelace", "ada@example.org")},
                 accounts={a: Account(a, "C1", "postpaid", tariff) for a in accounts},
                 service_points={"SP1": ServicePoint("SP1", market)},
                 meters={"M1": Meter("M1"), "M2": Meter("M2")})
    return b.install("M1", "SP1", start)
