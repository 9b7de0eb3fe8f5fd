"""PAYG latency: credit control (RFC 4006 update) and vendor top-up authorisation, in-process on the SQLite store and over loopback gRPC with TLS from a separate process.

Usage:
  .venv/bin/python bench/bench_payg.py                 # core + gRPC/TLS, ~20 s
  .venv/bin/python bench/bench_payg.py --core-only
  .venv/bin/python bench/bench_payg.py --rate 1000 --seconds 5

Core: every call goes through the real shell path (PaygStore on a SQLite file in WAL mode, one
BEGIN IMMEDIATE transaction per request, Ed25519 card verification for sales).
gRPC: a server process (this file with --serve) exposes the same two calls as unary gRPC methods
with JSON bodies over TLS (self-signed cert made here); the client process sends at a fixed
open-loop rate (default 1000/s) and reports p50/p99, then runs closed-loop with several threads to
find the maximum sustained rate. The JSON-over-gRPC methods are a benchmark harness, not the
product's API (which has no PAYG proto yet).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.gateway import credit as C
from meterlink.gateway import tokens as T
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import vendors as V
from meterlink.headend.payg_store import PaygStore

UTC = timezone.utc
T0 = datetime(2026, 3, 9, 12, tzinfo=UTC)
ACCOUNTS = 200
CARD_SEED = bytes(range(32))                 # the same card key in client and server processes


def pct(samples_ns: list[int], p: float) -> float:
    s = sorted(samples_ns)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] / 1e6


def report(name: str, samples_ns: list[int], extra: str = "") -> None:
    print(f"{name:48} n={len(samples_ns):6d}  p50 {pct(samples_ns, 50):7.3f} ms  p99 {pct(samples_ns, 99):7.3f} ms  "
          f"mean {statistics.fmean(samples_ns) / 1e6:7.3f} ms {extra}", flush=True)


class Service:
    """The head-end side: PaygStore + CreditControl, seeded with accounts, one vendor and one card."""

    def __init__(self, db: str) -> None:
        self.store = PaygStore(db, velocity_limits=())
        self.vat = L.PrepaidVat(Decimal("0.05"))
        self.cc = CC.CreditControl(self.store, CC.InMemorySessionStore(),
                                   CC.GrantPolicy(max_grant_minor=500, min_grant_minor=50), self.vat)
        self.store.put_vendor(V.VendorContract("SHOP1", "GBP", Decimal("2.5"), 5, Decimal("0.2")))
        card = Ed25519PrivateKey.from_private_bytes(CARD_SEED)
        seed = []
        for i in range(ACCOUNTS):
            acc = f"ACC{i:04d}"
            self.store.put_account(acc, "GBP", max_balance_minor=10**12)
            self.store.register_card(f"CARD{i:04d}", acc, T.public_bytes(card), T0)
            seed.append(L.top_up(f"seed:{acc}", T0, acc, "SHOP1", 10**9, "GBP", self.vat))
        self.store.append(seed)
        self.next_n: dict[str, int] = {}
        self.lock = threading.Lock()

    def credit_control(self, account: str, now: datetime) -> bool:
        session = f"S-{account}"
        with self.lock:
            n = self.next_n.get(session, 0)
            self.next_n[session] = n + 1
        if n == 0:
            out = self.cc.reserve(CC.initial(session, account, "M-" + account, "GBP"), now)
        else:
            out = self.cc.update(CC.CreditControlRequest(session, CC.RequestType.UPDATE_REQUEST, n, account,
                                                         "M-" + account, "GBP", 40, 1600), now)
        return out.answer.ok

    def authorise(self, req: V.SaleRequest, now: datetime) -> bool:
        return self.store.authorise(req, now).authorised


def sale_request(challenge: bytes, i: int, card: Ed25519PrivateKey, tag: str = "") -> V.SaleRequest:
    acc, card_id, sale_id = f"ACC{i % ACCOUNTS:04d}", f"CARD{i % ACCOUNTS:04d}", f"SALE{tag}{i:07d}"
    msg = V.sale_challenge_message(challenge, sale_id, "SHOP1", card_id, acc, 1000, "GBP")
    return V.SaleRequest(sale_id, "SHOP1", card_id, acc, 1000, "GBP", challenge, card.sign(msg))


def bench_core(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(f"sqlite:///{tmp}/headend.db")
        card = Ed25519PrivateKey.from_private_bytes(CARD_SEED)
        samples = []
        for i in range(n):
            now = T0 + timedelta(milliseconds=10 * i)
            t = time.perf_counter_ns()
            assert svc.credit_control(f"ACC{i % ACCOUNTS:04d}", now)
            samples.append(time.perf_counter_ns() - t)
        report("core credit control (reserve/update, SQLite)", samples)
        samples = []
        for i in range(n):
            now = T0 + timedelta(hours=1, milliseconds=10 * i)
            challenge = svc.store.issue_challenge(now)
            req = sale_request(challenge, i, card)
            t = time.perf_counter_ns()
            assert svc.authorise(req, now)
            samples.append(time.perf_counter_ns() - t)
        report("core top-up authorisation (card sig, SQLite)", samples)
        svc.store.close()
    head_end = Ed25519PrivateKey.generate()
    pub = T.public_bytes(head_end)
    state, window, samples = C.AccountState(account="M1"), T.ReplayWindow(), []
    toks = [T.TopUpToken(f"t{i}", "M1", i + 1, 100, "GBP", T0, T0 + timedelta(days=1)).signed(head_end)
            for i in range(n)]
    for i, tok in enumerate(toks):
        t = time.perf_counter_ns()
        state, window, _ = T.apply_token(state, window, tok, pub, T0 + timedelta(seconds=i))
        samples.append(time.perf_counter_ns() - t)
        if state.credit_balance > 90_000:
            state = C.AccountState(account="M1", at=state.at)
    report("gateway token verify + apply (pure core)", samples)


# --------------------------------------------------------------------------- gRPC over TLS

SERVICE = "meterlink.bench.payg.v1.Payg"


def make_cert(directory: Path) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key_pem)
    return cert_pem, key_pem


def serve(directory: str) -> int:
    import grpc
    d = Path(directory)
    svc = Service(f"sqlite:///{d}/headend.db")
    start = time.monotonic()

    def now() -> datetime:     # simulated instant advancing with real time (bench only)
        return T0 + timedelta(seconds=round(time.monotonic() - start, 3))

    def cc(req, ctx):
        return {"ok": svc.credit_control(req["account"], now())}

    def challenge(req, ctx):
        return {"challenge": svc.store.issue_challenge(now()).hex()}

    def authorise(req, ctx):
        r = V.SaleRequest(req["sale_id"], req["vendor_id"], req["card_id"], req["account_id"], req["amount_minor"],
                          req["currency"], bytes.fromhex(req["challenge"]), bytes.fromhex(req["signature"]))
        return {"ok": svc.authorise(r, now())}

    ser, de = (lambda o: json.dumps(o).encode()), (lambda b: json.loads(b))
    handlers = {name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=de, response_serializer=ser)
                for name, fn in (("CreditControl", cc), ("Challenge", challenge), ("Authorise", authorise))}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    creds = grpc.ssl_server_credentials([((d / "key.pem").read_bytes(), (d / "cert.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(port, flush=True)
    sys.stdin.read()               # runs until the client closes our stdin
    server.stop(0)
    return 0


def bench_grpc(rate: int, seconds: float) -> None:
    import grpc
    with tempfile.TemporaryDirectory() as tmp:
        cert, _ = make_cert(Path(tmp))
        proc = subprocess.Popen([sys.executable, __file__, "--serve", tmp], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=cert))
            ser, de = (lambda o: json.dumps(o).encode()), (lambda b: json.loads(b))
            call = {m: channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=ser, response_deserializer=de)
                    for m in ("CreditControl", "Challenge", "Authorise")}
            grpc.channel_ready_future(channel).result(timeout=10)
            card = Ed25519PrivateKey.from_private_bytes(CARD_SEED)
            for i in range(200):                                    # warm up TLS, threads, SQLite
                call["CreditControl"]({"account": f"ACC{i % ACCOUNTS:04d}"})

            def sale_body(i: int, tag: str) -> dict:
                ch = bytes.fromhex(call["Challenge"]({})["challenge"])
                r = sale_request(ch, i, card, tag)
                return {"sale_id": r.sale_id, "vendor_id": r.vendor_id, "card_id": r.card_id,
                        "account_id": r.account_id, "amount_minor": r.amount_minor, "currency": r.currency,
                        "challenge": r.challenge.hex(), "signature": r.signature.hex()}

            for r in (rate, rate // 4):                               # the goal rate, and a quarter of it
                n = int(r * seconds)
                lat = open_loop(call["CreditControl"], [{"account": f"ACC{i % ACCOUNTS:04d}"} for i in range(n)], r)
                report(f"gRPC/TLS credit control @ {r}/s open loop", lat[0], f"achieved {lat[1]:.0f}/s")
                bodies = [sale_body(i, f"o{r}-") for i in range(n)]     # challenges fetched beforehand
                lat = open_loop(call["Authorise"], bodies, r)
                report(f"gRPC/TLS top-up authorisation @ {r}/s open loop", lat[0], f"achieved {lat[1]:.0f}/s")
            for threads in (4, 16):
                done = closed_loop(call["CreditControl"], lambda i: {"account": f"ACC{i % ACCOUNTS:04d}"}, threads,
                                   seconds)
                print(f"gRPC/TLS credit control closed loop {threads:2d} threads: {done:7.0f} req/s sustained",
                      flush=True)
            channel.close()
        finally:
            proc.stdin.close()
            proc.wait(timeout=20)


def open_loop(fn, bodies: list, rate: int) -> tuple[list[int], float]:
    """Send `bodies` at a fixed rate without waiting for answers; latency = answer - scheduled send."""
    lat: list[int] = []
    lock = threading.Lock()
    pending = threading.Semaphore(0)
    start = time.perf_counter_ns()
    interval = 1e9 / rate
    for i, body in enumerate(bodies):
        due = start + int(i * interval)
        while (delay := due - time.perf_counter_ns()) > 0:
            time.sleep(delay / 1e9 if delay > 2e5 else 0)
        fut = fn.future(body)

        def done(f, due=due):
            f.result()
            with lock:
                lat.append(time.perf_counter_ns() - due)
            pending.release()

        fut.add_done_callback(done)
    for _ in bodies:
        pending.acquire()
    elapsed = (time.perf_counter_ns() - start) / 1e9
    return lat, len(bodies) / elapsed


def closed_loop(fn, body, threads: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            fn(body(i))
            counts[k] += 1
            i += threads

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: .venv/bin/python bench/bench_payg.py --rate 1000 --seconds 5")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--core-only", action="store_true")
    ap.add_argument("-n", type=int, default=2000, help="requests per core measurement")
    ap.add_argument("--rate", type=int, default=1000, help="open-loop request rate over gRPC")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve)
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (shared machine: figures are noisy)")
    bench_core(args.n)
    if not args.core_only:
        bench_grpc(args.rate, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
