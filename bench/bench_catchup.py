"""Catch-up after an outage: 1000 meters x 7 days x 15-minute readings (672,000 records) journaled on the
gateway, then the head-end comes up and the gateway drains to zero unacked over loopback gRPC with mutual TLS.

Prints the drain time, records/s, CPU microseconds per record on each side and the draining gateway
process's peak RSS. Goal: <= 10 s. The drain is one PushStream call with `--window` batches in flight
(the gateway reads and signs the next batches while the head-end commits; acks by highest committed seq).

The gateway side (journal -> signed batches -> gRPC) runs in its own process (this script with --drain) so
its peak RSS is its own; the head-end (verify -> SQLite repository + chain store) runs in this process.

With --postgres the head-end stores into PostgreSQL (a throwaway database on 127.0.0.1:5432, or
--database URL) instead of SQLite; the server backends' CPU seconds are reported too.

Run: .venv/bin/python bench/bench_catchup.py [--meters 1000] [--days 7] [--batch 20000] [--window 2]
                                             [--no-tls] [--postgres [--database postgresql://...]]
     .venv/bin/python bench/bench_catchup.py --store-only    # the store step alone (SQLite), CPU us/record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

START = datetime(2026, 11, 24, tzinfo=timezone.utc)
GW = "gw-bench"


def journal_week(path: Path, meters: int, days: int) -> int:
    from meterlink.gateway.journal import Journal
    from meterlink.readings import Reading
    j = Journal(path)
    n = 0
    for slot in range(days * 96):
        at = START + timedelta(minutes=15 * slot)
        # one poll of every meter: its import register, journaled in one commit
        j.append([Reading(f"MTR-{m:05d}", "1.8.0", at, 1_000_000 + m * 10_000 + slot * 37, "Wh")
                  for m in range(meters)])
        n += meters
    j.close()
    return n


def tls_material(tmp: Path) -> dict:
    """A head-end CA, server and gateway client certificates (common/pki.py), as PEM files."""
    from meterlink import pki
    now = START
    ca_key, ca = pki.create_ca("meterlink bench CA", now)
    srv_key = pki.new_tls_key()
    srv = pki.issue_server_cert(ca_key, ca, srv_key.public_key(), ["localhost", "127.0.0.1"], now)
    cli_key = pki.new_tls_key()
    cli = pki.issue_client_cert(ca_key, ca, pki.build_csr(cli_key, GW), GW, now)
    files = {"ca": pki.cert_pem(ca), "srv_key": pki.private_key_pem(srv_key), "srv": pki.cert_pem(srv),
             "cli_key": pki.private_key_pem(cli_key), "cli": pki.cert_pem(cli)}
    for k, v in files.items():
        (tmp / f"{k}.pem").write_bytes(v)
    return files


def drain(args) -> int:
    """Child process: drain the journal to the head-end; print JSON with the time and own peak RSS."""
    import grpc
    from meterlink.gateway.journal import Journal
    from meterlink.gateway.sync import Pusher, load_or_create_key
    tmp = Path(args.dir)
    creds = None
    if not args.no_tls:
        creds = grpc.ssl_channel_credentials(root_certificates=(tmp / "ca.pem").read_bytes(),
                                             private_key=(tmp / "cli_key.pem").read_bytes(),
                                             certificate_chain=(tmp / "cli.pem").read_bytes())
    journal = Journal(tmp / "gw.db")
    pusher = Pusher(GW, args.address, journal, batch=args.batch, key=load_or_create_key(tmp / "signing.key"),
                    credentials=creds, timeout_s=120, window=args.window)
    t0 = time.perf_counter()
    sent = pusher.drain()
    elapsed = time.perf_counter() - t0
    left = journal.unacked_count()
    print(json.dumps({"sent": sent, "seconds": elapsed, "unacked": left,
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


def store_only(args) -> int:
    """The head-end's store step alone: the catch-up's records, chained and hashed before the clock starts,
    stored batch by batch with `commit_with_readings` (SQLite repository + chain store, one file);
    prints the store's CPU per record (no gRPC, decode or verification)."""
    from meterlink.chain import hash_of, link
    from meterlink.headend.chainstore import SqliteChainStore
    from meterlink.headend.store import SqliteReadingRepository
    from meterlink.readings import Reading
    bodies = []
    for slot in range(args.days * 96):
        at = START + timedelta(minutes=15 * slot)
        bodies += [Reading(f"MTR-{m:05d}", "1.8.0", at, 1_000_000 + m * 10_000 + slot * 37, "Wh")
                   for m in range(args.meters)]
    recs = link(bodies)
    hashes = [hash_of(r) for r in recs]
    with tempfile.TemporaryDirectory(prefix="bench-catchup-store-") as d:
        repo = SqliteReadingRepository(Path(d) / "headend.db")
        chain = SqliteChainStore(Path(d) / "headend.db")
        head, cpu0, t0 = 0, time.process_time(), time.perf_counter()
        for i in range(0, len(recs), args.batch):
            head = chain.commit_with_readings(repo, GW, head, recs[i:i + args.batch], 0, hashes[i:i + args.batch])
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        assert head == repo.acked_seq(GW) == len(recs), (head, repo.acked_seq(GW))
        chain.close()
        repo.close()
    n = len(recs)
    print(f"store only (commit_with_readings, SQLite, batch {args.batch}): {n:,} records in {wall:.2f} s; "
          f"store CPU {cpu:.2f} s = {cpu / n * 1e6:.2f} us/record; load average {os.getloadavg()[0]:.1f}")
    print("command: " + " ".join([sys.executable] + sys.argv))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meters", type=int, default=1000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--batch", type=int, default=20000, help="records per batch (default 20000)")
    ap.add_argument("--window", type=int, default=2, help="batches in flight, not yet acked (default 2)")
    ap.add_argument("--no-tls", action="store_true", help="plaintext gRPC instead of mutual TLS")
    ap.add_argument("--postgres", action="store_true", help="store into PostgreSQL instead of SQLite")
    ap.add_argument("--database", help="PostgreSQL URL for --postgres (default: a throwaway database)")
    ap.add_argument("--store-only", action="store_true",
                    help="time only the head-end's store step (commit_with_readings on SQLite), no gRPC/verify")
    ap.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.store_only:
        return store_only(args)
    if args.drain:
        return drain(args)

    import grpc
    from meterlink.chain import public_bytes
    from meterlink.clock import SimClock
    from meterlink.gateway.sync import load_or_create_key
    from meterlink.headend.chainstore import SqliteChainStore
    from meterlink.headend.service import make_server
    from meterlink.headend.store import SqliteReadingRepository

    with tempfile.TemporaryDirectory(prefix="bench-catchup-") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        n = journal_week(tmp / "gw.db", args.meters, args.days)
        print(f"journaled {n:,} records ({args.meters} meters x {args.days} days x 96) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        key = load_or_create_key(tmp / "signing.key")
        creds = None
        if not args.no_tls:
            pem = tls_material(tmp)
            creds = grpc.ssl_server_credentials([(pem["srv_key"], pem["srv"])], root_certificates=pem["ca"],
                                                require_client_auth=True)
        pg_url, pg_cpu = None, (lambda: 0.0)
        if args.postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_ingest import _pg_backend_cpu, postgres_url
            from meterlink.headend.chainstore_postgres import PostgresChainStore
            from meterlink.headend.store import open_repository
            pg_url, shown = postgres_url(args.database)
            if pg_url is None:
                print(f"PostgreSQL unavailable: {shown}", file=sys.stderr)
                return 1
            print(f"head-end database: {shown}", flush=True)
            repo, chain = open_repository(pg_url, migrate=True), PostgresChainStore(pg_url)
            pg_cpu = lambda: _pg_backend_cpu(pg_url)  # noqa: E731
        else:
            repo = SqliteReadingRepository(tmp / "headend.db")
            chain = SqliteChainStore(tmp / "headend.db")
        chain.trust(GW, public_bytes(key), 0)
        from meterlink.metrics import HeadendMetrics
        metrics = HeadendMetrics.create()
        server, port = make_server(repo, SimClock(START + timedelta(days=args.days)), "127.0.0.1:0",
                                   chain=chain, credentials=creds, metrics=metrics)
        server.start()                                          # the head-end comes up
        address = f"localhost:{port}" if creds else f"127.0.0.1:{port}"
        cpu0, server_cpu0 = resource.getrusage(resource.RUSAGE_SELF), pg_cpu()
        out = subprocess.run([sys.executable, __file__, "--drain", "--dir", str(tmp), "--address", address,
                              "--batch", str(args.batch), "--window", str(args.window)]
                             + (["--no-tls"] if args.no_tls else []),
                             capture_output=True, text=True)
        cpu1, server_cpu = resource.getrusage(resource.RUSAGE_SELF), pg_cpu() - server_cpu0
        child = resource.getrusage(resource.RUSAGE_CHILDREN)    # the draining gateway (the only child)
        server.stop(grace=None).wait()
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        res = json.loads(out.stdout.strip().splitlines()[-1])
        held = chain.head(GW)[0]
        repo.close()
        chain.close()
        rate = res["sent"] / res["seconds"]
        print(f"catch-up over loopback gRPC {'with mutual TLS' if creds else 'WITHOUT TLS'}, batch {args.batch}, "
              f"window {args.window}: "
              f"{res['sent']:,} records in {res['seconds']:.2f} s = {rate:,.0f} records/s; "
              f"unacked after: {res['unacked']}; head-end head seq {held:,}")
        busy = metrics.registry.get_sample_value("meterlink_headend_ingest_seconds_sum") or 0.0
        print(f"head-end busy verifying and committing: {busy:.2f} s of the {res['seconds']:.2f} s")
        he_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        gw_cpu = child.ru_utime + child.ru_stime
        he_cpu += server_cpu
        print(f"CPU: head-end {he_cpu:.2f} s ({res['sent'] / he_cpu:,.0f} records per head-end CPU-second"
              + (f"; {server_cpu:.2f} s of it in PostgreSQL backends" if args.postgres else "")
              + f"), gateway {gw_cpu:.2f} s; load average {os.getloadavg()[0]:.1f} (2 cores, shared)")
        print(f"CPU per record: head-end {he_cpu / res['sent'] * 1e6:.1f} us, gateway {gw_cpu / res['sent'] * 1e6:.1f} us")
        print(f"gateway (draining process) peak RSS: {res['peak_rss_kib'] / 1024:.0f} MiB")
        print(f"goal <= 10 s: {'met' if res['seconds'] <= 10 and res['unacked'] == 0 else 'NOT met'}")
        print(f"command: {sys.executable} {' '.join(sys.argv)}")
        return 0 if res["unacked"] == 0 and held == n else 1


if __name__ == "__main__":
    sys.exit(main())
