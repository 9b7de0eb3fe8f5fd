"""Billing benchmark on the real path in SQLite: `process` (readings -> intervals -> stored pending day-band aggregates) in readings/s, and the monthly bill run (stored aggregates -> billable items, JSON + UBL invoices, all stored) in seconds and accounts/hour.

Process: M meters with a month of half-hourly register readings are ingested (not timed), then
`billing_store.process_readings` derives, binds and rates them into the stored aggregates (timed,
readings/s); then one more hour arrives for every meter and the incremental `process` is timed again.
Bill run: N accounts (each a customer, service point, meter and supply) get a month of stored
pending aggregates (30 days x 2 Economy 7 bands, and pending usage) written straight into
``day_band_aggregate`` the way `process` leaves them (not timed), then `billing_store.run_billing`
bills the month (timed): the summation, VAT, items, invoices (JSON and UBL 2.1), the billed usage and
the consumed aggregates, in one transaction.

Prints seconds and accounts/hour, and the command. One process, one core (the machine is shared:
CPU time is printed beside wall time).
`--tiers` bills with blocks (the block count reads each account's already-billed import of its pending
months, one indexed query per account).
Run: .venv/bin/python bench/bench_billrun.py [--accounts 10000 100000] [--meters 200] [--tiers] [--db PATH]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from meterlink.headend.billing import tariff_digest
from meterlink.headend.billing_store import BillingStore, process_readings, run_billing
from meterlink.headend.binding import Account, Bindings, Customer, Installation, Meter, ServicePoint, Supply
from meterlink.headend.store import StoredRecord, open_repository
from meterlink.headend.tariff import bundled_tariffs, load_tariff
from meterlink.headend.vat import load_markets, load_vat_table
from meterlink.readings import Reading

UTC = timezone.utc
START = datetime(2026, 11, 1, tzinfo=UTC)


def bindings_for(n: int, prefix: str) -> Bindings:
    ids = [f"{prefix}{i:07d}" for i in range(n)]
    return Bindings(customers={f"C{i}": Customer(f"C{i}", "GB", f"Customer {i}") for i in ids},
                    accounts={f"A{i}": Account(f"A{i}", f"C{i}", "postpaid", "gb-economy7") for i in ids},
                    service_points={f"SP{i}": ServicePoint(f"SP{i}", "GB") for i in ids},
                    meters={f"M{i}": Meter(f"M{i}") for i in ids},
                    installations=tuple(Installation(f"M{i}", f"SP{i}", START - timedelta(days=60)) for i in ids),
                    supplies=tuple(Supply(f"SP{i}", f"A{i}", START - timedelta(days=60)) for i in ids))


def bench_process(url: str, meters: int, markets, tariffs, vat) -> None:
    repo, store = open_repository(url, migrate=True), BillingStore(url)
    try:
        store.import_bindings(bindings_for(meters, "P"), markets, vat)
        rnd = random.Random(7)
        steps = 30 * 48
        values = {}
        for m in range(meters):
            meter = f"MP{m:07d}"
            v, recs = rnd.randint(0, 10**8), []
            for k in range(steps + 1):
                recs.append(StoredRecord("GW1", 0, b"\0" * 32, Reading(meter, "1.8.0", START + timedelta(minutes=30 * k),
                                                                        v, "Wh")))
                v += rnd.randint(0, 900)
            values[meter] = v
            base = m * (steps + 1)
            repo.ingest("GW1", [StoredRecord("GW1", base + i + 1, r.prev_hash, r.reading) for i, r in enumerate(recs)], 0)
        n = meters * (steps + 1)
        c0, t0 = time.process_time(), time.perf_counter()
        res = process_readings(repo, store, markets, START, tariffs=tariffs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"process: {meters} meters x {steps + 1} half-hourly readings = {n} readings -> {res.rows_changed} "
              f"intervals rated into stored aggregates")
        print(f"  {wall:.1f} s wall = {n / wall:,.0f} readings/s;  {cpu:.1f} s CPU = {n / cpu:,.0f} readings/s per core")
        # one more hour for every meter: the incremental process
        seq = n
        recs = []
        for meter, v in values.items():
            for k in (1, 2):
                seq += 1
                recs.append(StoredRecord("GW1", seq, b"\0" * 32, Reading(meter, "1.8.0", START + timedelta(
                    minutes=30 * (steps + k)), v + 400 * k, "Wh")))
        repo.ingest("GW1", recs, 0)
        c0, t0 = time.process_time(), time.perf_counter()
        res = process_readings(repo, store, markets, START, tariffs=tariffs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"  next hour ({len(recs)} new readings): incremental process {wall:.2f} s wall, {cpu:.2f} s CPU; "
              f"derived {res.readings} readings (not the {n + len(recs)} of the whole history)")
    finally:
        store.close()
        repo.close()


def tiered(tariff):
    """The tariff with blocks: the first 300 kWh of a month at the band rates, 2.00 p/kWh more above."""
    from dataclasses import replace
    from meterlink.headend.tariff import Tier
    blocks = (Tier("block1", 0, 300_000, Decimal(0)), Tier("above300", 300_000, None, Decimal("2.00")))
    return replace(tariff, versions=tuple(replace(v, tiers=blocks) for v in tariff.versions))


def bench_bill_run(url: str, accounts: int, markets, tariffs, vat) -> None:
    repo, store = open_repository(url, migrate=True), BillingStore(url)
    tariff = tariffs["gb-economy7"]
    try:
        g0 = time.perf_counter()
        store.import_bindings(bindings_for(accounts, "B"), markets, vat)
        rnd = random.Random(5)
        days = [date(2026, 11, 1) + timedelta(days=i) for i in range(30)]
        digest = tariff_digest(tariff)
        with store.db.tx():
            batch, usage, states = [], [], []
            for i in range(accounts):
                a, total = f"AB{i:07d}", 0
                for d in days:
                    for band in tariff.version_for(d).bands:
                        wh = rnd.randint(0, 12_000)
                        total += wh
                        batch.append((a, d.isoformat(), band.name, "energy", wh, str(Decimal(wh) * band.rate / 1000),
                                      str(band.rate), 0))
                usage.append((a, f"MB{i:07d}", "1.8.0", "2026-11", total))
                states.append((a, tariff.id, digest))
                if len(batch) > 200_000:
                    store.db.many("INSERT INTO day_band_aggregate VALUES (?,?,?,?,?,?,?,?)", batch)
                    batch = []
            store.db.many("INSERT INTO day_band_aggregate VALUES (?,?,?,?,?,?,?,?)", batch)
            store.db.many("INSERT INTO pending_usage VALUES (?,?,?,?,?)", usage)
            store.db.many("INSERT INTO rating_state VALUES (?,?,?,0)", states)
        gen = time.perf_counter() - g0
        c0, t0 = time.process_time(), time.perf_counter()
        run = run_billing(store, "2026-11", markets=markets, tariffs=tariffs, vat=vat, issue_date=date(2026, 12, 2),
                          now=datetime(2026, 12, 2, 6, tzinfo=UTC))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        net = sum(i.net_minor for i in run.items)
        print(f"bill run: {accounts} accounts, {accounts * 60} stored day-band aggregates -> {len(run.items)} items "
              f"+ invoices (JSON, UBL) stored; net {net / 100:,.2f} GBP")
        print(f"  {wall:.1f} s wall = {accounts / wall * 3600:,.0f} accounts/hour;  {cpu:.1f} s CPU = "
              f"{accounts / cpu * 3600:,.0f} accounts/hour per core  (setup, not counted: {gen:.1f} s)")
    finally:
        store.close()
        repo.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--meters", type=int, default=200, help="meters for the process benchmark (0: skip)")
    ap.add_argument("--db", help="directory for the SQLite files (default: a temporary one)")
    ap.add_argument("--tiers", action="store_true", help="bill with blocks (300 kWh, then +2.00 p/kWh): each "
                    "account's already-billed import of its pending months is read for the block count")
    args = ap.parse_args(argv)
    markets, vat = load_markets(), load_vat_table()
    tariffs = {t.id: t for t in (load_tariff(p) for p in bundled_tariffs())}
    if args.tiers:
        tariffs["gb-economy7"] = tiered(tariffs["gb-economy7"])
    with tempfile.TemporaryDirectory(dir=args.db) as tmp:
        if args.meters:
            bench_process(f"sqlite:///{Path(tmp) / 'process.db'}", args.meters, markets, tariffs, vat)
        for n in args.accounts:
            bench_bill_run(f"sqlite:///{Path(tmp) / f'billrun{n}.db'}", n, markets, tariffs, vat)
    print(f"command: {sys.executable} bench/bench_billrun.py --accounts {' '.join(map(str, args.accounts))} "
          f"--meters {args.meters}" + (" --tiers" if args.tiers else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
