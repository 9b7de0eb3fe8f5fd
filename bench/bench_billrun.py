"""Monthly bill run benchmark: N accounts billed from per-day-band aggregates (the cheap summation incremental rating leaves).

For each account, a month (November 2026, GB, Economy 7) of day-band aggregates is built the way
incremental rating leaves them (30 days x 2 bands + 30 standing-charge days), then the billable
item is made (lines per band and standing, VAT per market rule: `billing.item_from_aggregates`).
Aggregate generation is timed apart and NOT counted: the bill run is the summation. With
``--invoices`` the JSON and UBL invoices are rendered too and timed separately.

Prints seconds for N accounts and the extrapolated accounts per hour (one process, one core).
Run: .venv/bin/python bench/bench_billrun.py [--accounts 100000] [--invoices]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import date, timedelta
from decimal import Decimal

from meterlink.headend.billing import item_from_aggregates
from meterlink.headend.binding import Customer
from meterlink.headend.invoice import invoice_to_json, make_invoice
from meterlink.headend.rating import DayBandAggregate
from meterlink.headend.tariff import bundled_tariffs, load_tariff
from meterlink.headend.ubl import to_ubl
from meterlink.headend.vat import load_markets, load_vat_table


def month_aggregates(rnd: random.Random, account: str, tariff, days: list[date]) -> list[DayBandAggregate]:
    out = []
    for d in days:
        version = tariff.version_for(d)
        for band in version.bands:
            wh = rnd.randint(0, 12_000)
            out.append(DayBandAggregate(account, d, band.name, wh, Decimal(wh) * band.rate / 1000, "energy", band.rate))
        price = version.standing_charge
        out.append(DayBandAggregate(account, d, "standing", 0, price, "standing", price, 1))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=100_000)
    ap.add_argument("--invoices", action="store_true", help="also render JSON + UBL invoices (timed apart)")
    args = ap.parse_args(argv)
    markets, vat = load_markets(), load_vat_table()
    tariff = next(t for t in (load_tariff(p) for p in bundled_tariffs()) if t.id == "gb-economy7")
    market = markets["GB"]
    days = [date(2026, 11, 1) + timedelta(days=i) for i in range(30)]
    rnd = random.Random(5)
    customer = Customer("C1", "GB", "Bench Customer")
    gen = bill = render = bill_cpu = 0.0
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    net = vat_total = lines = 0
    for i in range(args.accounts):
        account = f"A{i:07d}"
        t0 = time.perf_counter()
        aggs = month_aggregates(rnd, account, tariff, days)
        t1, c1 = time.perf_counter(), time.process_time()
        item = item_from_aggregates(account, "2026-11", market=market, tariff=tariff, vat=vat, aggregates=aggs)
        t2, c2 = time.perf_counter(), time.process_time()
        bill_cpu += c2 - c1
        gen += t1 - t0
        bill += t2 - t1
        net += item.net_minor
        vat_total += item.vat_minor
        lines += len(item.lines)
        if args.invoices:
            inv = make_invoice(item, customer, market, date(2026, 12, 2))
            invoice_to_json(inv)
            to_ubl(inv)
            render += time.perf_counter() - t2
    n = args.accounts
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"bill run: {n} accounts, {n * len(days) * 3} day-band aggregates, {lines} lines, "
          f"net {net / 100:.2f} GBP, VAT {vat_total / 100:.2f} GBP")
    print(f"  bill run (aggregates -> billable items with VAT): {bill:.1f} s wall  =  {n / bill * 3600:,.0f} "
          f"accounts/hour;  {bill_cpu:.1f} s CPU  =  {n / bill_cpu:,.0f} accounts/s  =  {n / bill_cpu * 3600:,.0f} "
          f"accounts/hour per core")
    print(f"  (aggregate generation, not counted: {gen:.1f} s; whole run {wall:.1f} s wall, {cpu:.1f} s CPU of "
          f"this process: on a shared machine wall > CPU)")
    if args.invoices:
        print(f"  invoices JSON + UBL rendering: {render:.1f} s  =  {n / render * 3600:,.0f} invoices/hour")
    print(f"command: {sys.executable} bench/bench_billrun.py --accounts {n}" + (" --invoices" if args.invoices else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
