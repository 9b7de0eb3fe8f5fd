"""Ingest throughput of the head-end STORE alone (repository.ingest: dedupe, insert, ack, durable commit), readings/s.

Measures the storage layer only: records are built before the clock starts, and chain verification
(headend/verify.py) and rating are not included (their own benchmarks cover them). Batches look like
what a gateway pushes: consecutive seqs, a few meters x registers at 15-minute steps.

Scenarios, on SQLite (a file, WAL, synchronous=FULL) and PostgreSQL (synchronous_commit on):
  * one gateway pushing 500-record batches one after another (one durable commit per batch);
  * the same with 5000-record batches (the gateway's default push_batch);
  * 8 gateways pushing 500-record batches at once (the head-end's 8 gRPC workers): SQLite then
    commits concurrent batches as a group (one fsync), PostgreSQL uses 8 connections.

Besides wall-clock readings/s it prints the CPU seconds spent (this process + the PostgreSQL backends,
from /proc) and readings per CPU-second, and the load average: on a shared machine the wall figure
moves with the neighbours, the CPU figure much less.

Usage: .venv/bin/python bench/bench_ingest.py [--readings N] [--backend sqlite|postgres|both]
                                              [--database postgresql://...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meterlink.headend.store import StoredRecord, open_repository
from meterlink.readings import Reading

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
REGISTERS = ("1.8.0", "2.8.0", "1.7.0", "32.7.0")
HZ = os.sysconf("SC_CLK_TCK")
GOALS = {"sqlite": 200_000, "postgres": 100_000}


def gateway_records(gateway: str, count: int, meters: int = 16) -> list[StoredRecord]:
    """`count` chain records of one gateway: meters x registers read every 15 minutes, seq 1..count."""
    out, seq, step = [], 0, 0
    while seq < count:
        at = T0 + timedelta(minutes=15 * step)
        for m in range(meters):
            for obis in REGISTERS:
                seq += 1
                if seq > count:
                    break
                value = (m + 1) * 1_000_000 + step * 250 if obis in ("1.8.0", "2.8.0") else 230_000 + m
                out.append(StoredRecord(gateway, seq, seq.to_bytes(32, "big"),
                                        Reading(f"{gateway}-M{m:02d}", obis, at, value,
                                                "Wh" if obis.endswith(".8.0") else "mV" if obis == "32.7.0" else "W")))
        step += 1
    return out


def batches(records: list[StoredRecord], size: int) -> list[list[StoredRecord]]:
    return [records[i:i + size] for i in range(0, len(records), size)]


def _pg_backend_cpu(url: str) -> float:
    """CPU seconds used so far by every backend connected to the benchmark database (same host)."""
    import psycopg
    total = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND pid <> pg_backend_pid()")]
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / HZ
        except (OSError, IndexError):
            pass
    return total


def run(url: str, backend: str, total: int, batch: int, gateways: int, label: str) -> dict:
    repo = open_repository(url, migrate=True)
    per_gateway = total // gateways
    work = {f"{label}-gw{g}": batches(gateway_records(f"{label}-gw{g}", per_gateway), batch) for g in range(gateways)}
    if backend == "postgres":          # open the pool's connections before the clock starts
        warm = [threading.Thread(target=repo.acked_seq, args=("warm",)) for _ in range(gateways)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
    server0 = _pg_backend_cpu(url) if backend == "postgres" else 0.0
    barrier = threading.Barrier(gateways + 1)
    errors: list = []

    def push(gateway: str, bs: list) -> None:
        barrier.wait()
        try:
            for b in bs:
                res = repo.ingest(gateway, b, 1)
                assert res.accepted == len(b), res
        except Exception as exc:              # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=item) for item in work.items()]
    for t in threads:
        t.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    server = (_pg_backend_cpu(url) - server0) if backend == "postgres" else 0.0
    if errors:
        raise errors[0]
    stored = sum(repo.acked_seq(g) for g in work)
    repo.close()
    n = per_gateway * gateways
    assert stored == n, f"acked {stored} of {n}"
    return {"readings": n, "wall": wall, "rate": n / wall, "cpu": cpu + server, "per_cpu": n / (cpu + server)}


def fsync_ms(directory: str, rounds: int = 20) -> float:
    """Median time of write(4 KiB) + fdatasync on `directory`'s disk: the floor under every durable commit."""
    path, times = os.path.join(directory, "fsync-probe"), []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return sorted(times)[len(times) // 2] * 1000


def postgres_url(given: str | None) -> tuple[str | None, str]:
    if given:
        return given, given
    sys.path.insert(0, str(ROOT / "tests"))
    import pgserver
    if pgserver.PG_UNAVAILABLE:
        return None, pgserver.PG_UNAVAILABLE
    url = pgserver.pg_database_url()                # throwaway database, dropped at exit
    return url, url.rsplit("/", 1)[0] + "/<throwaway>"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: .venv/bin/python bench/bench_ingest.py --readings 200000")
    ap.add_argument("--readings", type=int, default=200_000, help="readings per scenario (default 200000)")
    ap.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--database", help="PostgreSQL URL to use (default: a throwaway database on 127.0.0.1:5432)")
    args = ap.parse_args(argv)
    print("command:", shlex.join([sys.executable.replace(str(ROOT) + "/", ""), "bench/bench_ingest.py",
                                  *(argv if argv is not None else sys.argv[1:])]))
    print(f"store only (no chain verification, no rating); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    scenarios = [("1 gateway, 500/batch", 500, 1), ("1 gateway, 5000/batch", 5000, 1),
                 ("8 gateways at once, 500/batch", 500, 8)]
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    best: dict[str, float] = {}
    header = (f"{'backend':9} {'scenario':32} {'readings':>9} {'wall s':>7} {'readings/s':>11} {'cpu s':>7} "
              f"{'readings/cpu-s':>15}")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=ROOT / "var" if (ROOT / "var").is_dir() else None) as tmp:
        sync = fsync_ms(tmp)
        print(f"disk: write+fdatasync median {sync:.2f} ms -> one durable commit per 500-record batch caps a "
              f"single stream at ~{500 / sync * 1000:,.0f} readings/s")
        for backend in backends:
            if backend == "postgres":
                url, shown = postgres_url(args.database)
                if url is None:
                    print(f"postgres  skipped: {shown}")
                    continue
                print(f"postgres  database {shown}")
            print(header)
            for i, (name, batch, gateways) in enumerate(scenarios):
                if backend == "sqlite":
                    url = f"sqlite:///{tmp}/ingest-{i}.db"
                r = run(url, backend, args.readings, batch, gateways, f"s{i}-{int(time.time() * 1000) % 10**8}")
                best[backend] = max(best.get(backend, 0.0), r["rate"])
                print(f"{backend:9} {name:32} {r['readings']:>9} {r['wall']:>7.2f} {r['rate']:>11,.0f} "
                      f"{r['cpu']:>7.2f} {r['per_cpu']:>15,.0f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    for backend, rate in best.items():
        goal = GOALS[backend]
        print(f"goal {backend}: >= {goal:,} readings/s -> best {rate:,.0f}/s: {'met' if rate >= goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
