"""Binding lookup benchmark: the cost per lookup of the effective-dated meter -> service point -> account links as the total number of bindings grows (it should stay flat: indexed, not a scan).

For N service points (each with an installation, a meter exchange half-way, and two supplies: a move-out and
a move-in), builds a `Bindings` (not timed), then times, on a fixed sample of meters/accounts:
  * `account_at(meter, t)`          (what `rebind` / `check_rebinding` call per usage row),
  * `spans(meter)` + `market_of_meter` (what `process` calls per meter: bind_intervals, vee_config),
  * `standing_dates(bindings, account, ...)` + `market_of_account` (per account in `bill_run` and `quote`),
  * `bill run`: what `run_billing` asks the bindings per account (market, account, `standing_due` over
    the account's supplies since the first billed period),
  * `rebind(rows)` for 48 half-hourly rows of each sampled meter (a binding edit's re-bind).
`links` = installations + supplies (4 N). Each figure is microseconds per lookup (per row for rebind), measured for up to 0.5 s, and the
index build is timed separately (it is paid once per `Bindings`, e.g. once per bill run).
Run: .venv/bin/python bench/bench_bindings.py [--sizes 1000 10000 100000] [--sample 300]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from meterlink.headend.billing import UsageRow, rebind, standing_dates
from meterlink.headend.binding import Account, Bindings, Customer, Installation, Meter, ServicePoint, Supply

UTC = timezone.utc
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LONDON = ZoneInfo("Europe/London")


def build(n: int) -> Bindings:
    insts, sups = [], []
    for i in range(n):
        swap = T0 + timedelta(days=100, minutes=i % 1440)
        insts.append(Installation(f"M{i}", f"SP{i}", T0, swap))
        insts.append(Installation(f"M{i}x", f"SP{i}", swap, None, "exchange"))
        move = T0 + timedelta(days=200, hours=i % 24)
        sups.append(Supply(f"SP{i}", f"A{i}", T0, move))
        sups.append(Supply(f"SP{i}", f"B{i}", move))
    rnd = random.Random(3)
    rnd.shuffle(insts)
    rnd.shuffle(sups)
    return Bindings(customers={f"C{i}": Customer(f"C{i}", "GB") for i in range(n)},
                    accounts={**{f"A{i}": Account(f"A{i}", f"C{i}") for i in range(n)},
                              **{f"B{i}": Account(f"B{i}", f"C{i}") for i in range(n)}},
                    service_points={f"SP{i}": ServicePoint(f"SP{i}", "GB") for i in range(n)},
                    meters={**{f"M{i}": Meter(f"M{i}") for i in range(n)}, **{f"M{i}x": Meter(f"M{i}x") for i in range(n)}},
                    installations=tuple(insts), supplies=tuple(sups))


def per_op(fn, items, budget=0.5) -> float:
    """Microseconds per item of fn(item), over as many items as fit in `budget` seconds (at least 3)."""
    t0 = time.perf_counter()
    done = 0
    for it in items:
        fn(it)
        done += 1
        if done >= 3 and time.perf_counter() - t0 > budget:
            break
    return (time.perf_counter() - t0) / done * 1e6


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    ap.add_argument("--sample", type=int, default=300)
    args = ap.parse_args(argv)
    print(f"{'links':>9} {'build idx':>10} {'account_at':>11} {'spans+mkt':>10} {'standing':>9} {'bill run':>9} "
          f"{'rebind/row':>11}"
          "   (microseconds per lookup; build in ms)")
    for n in args.sizes:
        b = build(n)
        rnd = random.Random(11)
        sample = [rnd.randrange(n) for _ in range(args.sample)]
        t = time.perf_counter()
        b.account_at("M0", T0)                      # first lookup builds the index, if there is one
        build_ms = (time.perf_counter() - t) * 1e3
        at = per_op(lambda i: b.account_at(f"M{i}", T0 + timedelta(days=rnd.randrange(300))), sample)
        sp = per_op(lambda i: (b.spans(f"M{i}"), b.market_of_meter(f"M{i}")), sample)
        st = per_op(lambda i: (b.market_of_account(f"A{i}"),
                               standing_dates(b, f"A{i}", date(2026, 7, 1), date(2026, 8, 1), LONDON)), sample)
        try:
            from meterlink.headend.billing import standing_due
            br = per_op(lambda i: (b.market_of_account(f"A{i}"), b.accounts[f"A{i}"],
                                   standing_due(f"A{i}", "2026-07", LONDON, bindings=b, charged=(),
                                                since=date(2026, 1, 1))), sample)
        except ImportError:                         # before the standing catch-up existed
            br = float("nan")
        rows = [[UsageRow(f"M{i}", "1.8.0", T0 + timedelta(days=199, minutes=30 * k),
                          T0 + timedelta(days=199, minutes=30 * k + 30), 100) for k in range(48)] for i in sample]
        rb = per_op(lambda rs: rebind(rs, b), rows) / 48
        print(f"{len(b.installations) + len(b.supplies):>9} {build_ms:>10.1f} {at:>11.1f} {sp:>10.1f} {st:>9.1f} "
              f"{br:>9.1f} {rb:>11.1f}", flush=True)
    print(f"command: {sys.executable} bench/bench_bindings.py --sizes {' '.join(map(str, args.sizes))} "
          f"--sample {args.sample}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
