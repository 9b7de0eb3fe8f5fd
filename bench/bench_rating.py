"""Rating alone, readings/s per CPU-second: the incremental `process` (billing_store.process_readings) that serve's rating worker runs, on readings already stored.

The readings are stored first (repository.ingest, no rating, no timing), `--run-every` readings at a
time; after each such slice ONE `process_readings` runs over what arrived (as the worker does after the
commits of a burst). Only those runs are timed: CPU seconds of this process (time.process_time) plus,
on PostgreSQL, the CPU of the server backends, and wall seconds. Same data shape as bench_ingest.py's
pipeline: 16 meters x 4 registers per gateway every 15 minutes, 1.8.0/2.8.0 rated, every meter bound to
an account on gb-economy7. The figure to compare with the ingest goal is "rated readings/s" (readings
stored, all four registers, per second of rating): the rating worker keeps up with ingest at R
readings/s when its busy time for N readings is under N / R.

Usage: .venv/bin/python bench/bench_rating.py [--readings N] [--backend sqlite|postgres|both]
                                              [--run-every N] [--gateways N] [--profile FILE]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_ingest import (GOALS, T0, _pg_backend_cpu, bench_bindings, fresh_url,  # noqa: E402
                          gateway_records, postgres_url)


def run(url: str, backend: str, total: int, run_every: int, gateways: int, profile: str | None) -> dict:
    from meterlink.clock import SimClock
    from meterlink.headend.billing_store import BillingStore, process_readings
    from meterlink.headend.rating_worker import load_reference
    from meterlink.headend.store import open_repository
    from meterlink.headend.vat import load_vat_table

    repo = open_repository(url, migrate=True)
    names = [f"g{g}" for g in range(gateways)]
    records = {g: gateway_records(g, total // gateways) for g in names}
    meter_ids = sorted({r.reading.meter_id for recs in records.values() for r in recs})
    markets, tariffs = load_reference()
    store = BillingStore(url, durable=False)          # as the rating worker opens it
    store.import_bindings(bench_bindings(meter_ids), markets, load_vat_table())
    now = SimClock(T0 + timedelta(days=40)).now()
    process_readings(repo, store, markets, now, tariffs=tariffs)        # the start-up run: nothing yet
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    per = run_every // gateways
    cpu = wall = server = 0.0
    derived = changed = runs = 0
    for lo in range(0, total // gateways, per):
        for g in names:
            recs = records[g][lo:lo + per]
            if recs:
                repo.ingest(g, recs, 1)
        s0 = _pg_backend_cpu(url) if backend == "postgres" else 0.0
        c0, w0 = time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        res = process_readings(repo, store, markets, now, tariffs=tariffs)
        if prof:
            prof.disable()
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        server += (_pg_backend_cpu(url) - s0) if backend == "postgres" else 0.0
        derived += res.readings
        changed += res.rows_changed
        runs += 1
    usage = sum(wh for per_acct in store.pending_usage().values() for wh in per_acct.values())
    store.close()
    repo.close()
    if prof:
        prof.dump_stats(profile)
    n = (total // gateways) * gateways
    return {"readings": n, "runs": runs, "cpu": cpu, "server": server, "wall": wall, "derived": derived,
            "intervals": changed, "usage_wh": usage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: .venv/bin/python bench/bench_rating.py --readings 200000 --backend sqlite")
    ap.add_argument("--readings", type=int, default=200_000)
    ap.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--database", help="PostgreSQL URL (default: a throwaway database on 127.0.0.1:5432)")
    ap.add_argument("--run-every", type=int, default=10_000, help="readings stored between two runs (default 10000)")
    ap.add_argument("--gateways", type=int, default=1, help="gateways the readings come from (default 1)")
    ap.add_argument("--profile", help="write a cProfile of the timed runs to this file")
    args = ap.parse_args(argv)
    print("command:", shlex.join([sys.executable.replace(str(ROOT) + "/", ""), "bench/bench_rating.py",
                                  *(argv if argv is not None else sys.argv[1:])]))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory(prefix="bench-rating-") as tmp:
        for backend in backends:
            if backend == "sqlite":
                url = f"sqlite:///{tmp}/rating.db"
            else:
                base, shown = postgres_url(args.database)
                if base is None:
                    print(f"postgres  skipped: {shown}")
                    continue
                url = fresh_url(args.database, base)
            r = run(url, backend, args.readings, args.run_every, args.gateways, args.profile)
            cpu = r["cpu"] + r["server"]
            print(f"{backend:9} {r['readings']:,} readings in {r['runs']} runs of ~{args.run_every:,}: "
                  f"derived {r['derived']:,} (1.8.0/2.8.0) into {r['intervals']:,} intervals, {r['usage_wh']:,} Wh pending")
            print(f"{'':9} rating cpu {r['cpu']:.2f} s (+ server {r['server']:.2f} s) = {cpu / r['readings'] * 1e6:.2f} "
                  f"us/reading -> {r['readings'] / cpu:,.0f} readings/cpu-s; wall {r['wall']:.2f} s -> "
                  f"{r['readings'] / r['wall']:,.0f} readings/s (goal {GOALS[backend]:,})", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
