"""PAYG latency: credit control (RFC 4006 update) and vendor top-up authorisation, in-process on the SQLite store and over loopback gRPC with TLS from a separate process.

Usage:
  .venv/bin/python bench/bench_payg.py                 # core + gRPC/TLS, ~45 s
  .venv/bin/python bench/bench_payg.py --core-only
  .venv/bin/python bench/bench_payg.py --rate 1000 --seconds 5
  .venv/bin/python bench/bench_payg.py --history 0,10000,100000   # cost per request vs ledger history
  .venv/bin/python bench/bench_payg.py --grpc-only --server-processes 2 --gateways 16 [--quick]
  .venv/bin/python bench/bench_payg.py --grpc-only --gateways 4 --paths ping,cc,stream   # unary vs Session stream

Core: every call goes through the real shell path (PaygStore on a SQLite file in WAL mode with
synchronous=FULL, group commit, Ed25519 card verification for sales); "servicer" is the gRPC
servicer's own method called in-process (SQL sessions, token key, card lists), without gRPC;
"engine ... batches of 64" the same work as the servicer's engine runs it when requests queue up
(one transaction and COMMIT per 64 requests), on the calling thread: the server's own CPU per request.
gRPC: a server process (this file with --serve) runs the real head-end mutual-TLS server (gateway
interceptor + registry) with the product's PAYG services as `serve --payg --payg-token-key` builds
them (proto/meterlink/v1/payg.proto, headend/payg_service.py), plus a trivial `bench.Ping/Ping`
method (the gRPC + TLS floor: no interceptor, no servicer work). The client process enrols as a
gateway (one gateway, 200 provisioned meters bound to 200 accounts) and sells as vendor SHOP1 with
its vendor certificate; it sends Ping, CreditControl Reserve/Update (unary, and the same requests
on each gateway's CreditControl.Session stream through the gateway's CreditControlLink) and Vending
Authorise at a fixed
open-loop rate (default 1000/s: futures, latency =
answer - scheduled send, so a late client or server is counted) and reports p50/p99, the result
codes, the CPU time per request of the server and client processes and the load average; then
closed loop with several threads for the maximum sustained rate. The server reports how many
durable commits carried how many PAYG transactions (group commit). `--server-processes N` runs N
server processes on the one database and port as `serve --processes N` does (the kernel spreads
connections over them); `--gateways G` enrols G gateways (the meters split between them), each
with its own certificate and connection, and opens G vendor connections, so that the connections
can spread; CPU per request is then the sum over the server processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.gateway import credit as C
from meterlink.gateway import tokens as T
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import vendors as V
from meterlink.headend.payg_store import PaygStore, SqlSessionStore

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

    def __init__(self, db: str, seed: bool = True) -> None:
        self.store = PaygStore(db, velocity_limits=())
        self.vat = L.PrepaidVat(Decimal("0.05"))
        self.cc = CC.CreditControl(self.store, CC.InMemorySessionStore(),
                                   CC.GrantPolicy(max_grant_minor=500, min_grant_minor=50), self.vat)
        self.next_n: dict[str, int] = {}
        self.lock = threading.Lock()
        if not seed:
            return
        self.store.put_vendor(V.VendorContract("SHOP1", "GBP", Decimal("2.5"), 5, Decimal("0.2")))
        card = Ed25519PrivateKey.from_private_bytes(CARD_SEED)
        seed = []
        for i in range(ACCOUNTS):
            acc = f"ACC{i:04d}"
            self.store.put_account(acc, "GBP", max_balance_minor=10**12)
            self.store.register_card(f"CARD{i:04d}", acc, T.public_bytes(card), T0)
            seed.append(L.top_up(f"seed:{acc}", T0, acc, "SHOP1", 10**9, "GBP", self.vat))
        self.store.append(seed)

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
        bench_servicer(tmp, n)
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


def bench_servicer(tmp: str, n: int) -> None:
    """`CreditControlService.Update` called in-process (no gRPC): the gateway's registry check (the
    client certificate's identity given), SQL sessions, token key and card lists, each request one
    durable transaction, one after the other (so every one commits alone: one fsync each)."""
    from meterlink.clock import SimClock
    from meterlink.headend import payg_service
    from meterlink.headend.gatewayauth import Peer
    from meterlink.headend.registry import open_registry
    from meterlink.v1 import payg_pb2
    db = f"sqlite:///{tmp}/servicer.db"
    svc = Service(db)
    clock = SimClock(T0)
    registry = open_registry(db)
    registry.add("gw", T0)
    registry.provision("gw", [f"M-ACC{i:04d}" for i in range(ACCOUNTS)], [], T0)
    for i in range(ACCOUNTS):
        svc.store.bind_meter(f"M-ACC{i:04d}", f"ACC{i:04d}", T0)
    cc = payg_service.CreditControlService(svc.store, clock, CC.GrantPolicy(max_grant_minor=500, min_grant_minor=50),
                                           token_key=Ed25519PrivateKey.from_private_bytes(TOKEN_KEY_SEED),
                                           registry=registry)
    peer = Peer("gw", registry.get("gw").cert_serial)
    cc._peer = lambda context: peer         # the identity a verified client certificate would give
    digests: dict[str, bytes] = {}

    def call(i: int, n_req: int):
        acc = f"ACC{i % ACCOUNTS:04d}"
        req = payg_pb2.CreditControlRequest(gateway_id="gw", session_id=f"S-{acc}", request_number=n_req,
                                            account_id=acc, meter_id=f"M-{acc}", currency="GBP",
                                            used=payg_pb2.UsedUnits(used_minor=40, used_wh=1600) if n_req else None,
                                            card_lists_digest=digests.get(acc, b""))
        answer = (cc.Update if n_req else cc.Reserve)(req, None)
        assert answer.result_code == 2001, answer
        if answer.card_list:
            from meterlink.gateway.payg import _blacklist_from_json, _card_list_from_json
            digests[acc] = T.card_lists_digest(_card_list_from_json(json.loads(answer.card_list)),
                                               _blacklist_from_json(json.loads(answer.blacklist)))

    for i in range(ACCOUNTS):
        call(i, 0)
    samples, cpu0, commits0 = [], time.process_time(), getattr(svc.store, "commits", 0)
    for i in range(n):
        clock.advance(timedelta(milliseconds=10))
        t = time.perf_counter_ns()
        call(i, 1 + i // ACCOUNTS)
        samples.append(time.perf_counter_ns() - t)
    report("servicer credit control in-process (no gRPC)", samples,
           f"cpu/req {1e3 * (time.process_time() - cpu0) / n:.3f} ms, "
           f"{getattr(svc.store, 'commits', 0) - commits0} commits")
    # the same work as the engine runs it when requests queue up: batches of 64, one COMMIT each, on
    # this thread (no gRPC, no thread hand-over): the server's own credit-control CPU per request
    from concurrent.futures import Future
    last = {f"ACC{i % ACCOUNTS:04d}": 1 + i // ACCOUNTS for i in range(n)}     # numbers used above
    requests = []
    for i in range(n):
        acc = f"ACC{i % ACCOUNTS:04d}"
        last[acc] += 1
        requests.append(payg_pb2.CreditControlRequest(
            gateway_id="gw", session_id=f"S-{acc}", request_number=last[acc], account_id=acc,
            meter_id=f"M-{acc}", currency="GBP", used=payg_pb2.UsedUnits(used_minor=40, used_wh=1600),
            card_lists_digest=digests.get(acc, b"")))
    cpu0, commits0, t0 = time.process_time(), svc.store.commits, time.perf_counter()
    for k in range(0, n, 64):
        batch = [(r, payg_service._InBandCall(None), CC.RequestType.UPDATE_REQUEST, Future())
                 for r in requests[k:k + 64]]
        cc.engine._process(batch)
        assert all(f.result().result_code == 2001 for *_, f in batch)
    cpu = time.process_time() - cpu0
    print(f"engine credit control in-process, batches of 64 (no gRPC)   n={n:6d} {n / (time.perf_counter() - t0):8.0f} "
          f"req/s; cpu/req {1e3 * cpu / n:.3f} ms, {svc.store.commits - commits0} commits", flush=True)
    svc.store.close()
    registry.close()


# --------------------------------------------------------------------------- gRPC over mutual TLS

TOKEN_KEY_SEED = bytes(range(32, 64))         # the head-end's token/card-list signing key (server process)
PING = "/bench.Ping/Ping"


def serve(directory: str, rpc_workers: int | None = None, join: int | None = None, gateways: int = 1) -> int:
    """Server process: the real head-end mutual-TLS server (sync + config + PAYG services with a token
    key, gateway interceptor and registry), seeded like `Service`; `gateways` gateways, meter i
    provisioned to gateway i % gateways; plus the trivial `bench.Ping/Ping`. `join`: a further
    server process on the same database and port (SO_REUSEPORT, as `serve --processes N` runs
    them), seeding nothing. Each line on stdin asks for one JSON line of stats (process CPU seconds,
    durable commits, PAYG transactions committed); EOF stops it."""
    import grpc

    from meterlink import pki
    from meterlink.clock import SystemClock
    from meterlink.headend import payg_service
    from meterlink.headend.enrolment import make_secure_servers
    from meterlink.headend.registry import open_registry
    from meterlink.headend.store import open_repository
    d = Path(directory)
    clock = SystemClock()
    db = f"sqlite:///{d}/headend.db"
    svc = Service(db, seed=join is None)
    now = clock.now().replace(microsecond=0)
    if join is None:
        for i in range(ACCOUNTS):
            svc.store.bind_meter(f"M-ACC{i:04d}", f"ACC{i:04d}", now)
    repo, registry = open_repository(db), open_registry(db)
    keys = pki.ensure_headend_pki(d / "pki", ["localhost", "127.0.0.1"], now)
    servers = make_secure_servers(repo, clock, keys, registry, f"127.0.0.1:{join or 0}", "127.0.0.1:0",
                                  workers=rpc_workers or 8)
    servers.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Ping", {"Ping": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}),))
    servers.auth.exempt = frozenset(servers.auth.exempt) | {PING}
    payg_service.add_to_server(servers.server, svc.store, clock,
                               CC.GrantPolicy(max_grant_minor=500, min_grant_minor=50), registry=registry,
                               auth=servers.auth, token_key=Ed25519PrivateKey.from_private_bytes(TOKEN_KEY_SEED))
    servers.start()
    codes, vendor = [], None
    if join is None:
        for g in range(gateways):
            codes.append(registry.add(f"gw-bench-{g}", now))
            registry.provision(f"gw-bench-{g}", [f"M-ACC{i:04d}" for i in range(g, ACCOUNTS, gateways)], [], now)
        vendor = str(payg_service.write_vendor_identity(svc.store, keys, "SHOP1", d / "vendor", now))
    print(json.dumps({"port": servers.port, "enrol_port": servers.enrol_port, "codes": codes,
                      "ca": keys.ca_fingerprint, "vendor": vendor}), flush=True)
    for _ in sys.stdin:            # runs until the client closes our stdin
        print(json.dumps({"cpu": time.process_time(), "sys": os.times().system, "commits": getattr(svc.store, "commits", 0),
                          "transactions": getattr(svc.store, "committed_transactions", 0)}), flush=True)
    servers.stop(0)
    return 0


class Phase:
    """CPU time per request of the server processes (together) and the client, group commits (and
    how the PAYG transactions split between server processes) and the load average over one
    measurement."""

    def __init__(self, procs) -> None:
        self.procs = procs
        self.server0, self.client0 = self.server(), time.process_time()

    def server(self) -> list[dict]:
        out = []
        for proc in self.procs:
            proc.stdin.write("stats\n")
            proc.stdin.flush()
            out.append(json.loads(proc.stdout.readline()))
        return out

    def figures(self, n: int) -> str:
        s1, c1 = self.server(), time.process_time()
        cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(self.server0, s1))
        kernel = sum(b["sys"] - a["sys"] for a, b in zip(self.server0, s1))
        commits = sum(b["commits"] - a["commits"] for a, b in zip(self.server0, s1))
        txns = [b["transactions"] - a["transactions"] for a, b in zip(self.server0, s1)]
        group = f", {sum(txns)} PAYG txns in {commits} commits" if commits else ""
        if commits and len(txns) > 1:
            group += f" (per process {'/'.join(map(str, txns))})"
        return (f"cpu/req server {1e3 * cpu / n:.3f} ms (kernel {1e3 * kernel / n:.3f}) client "
                f"{1e3 * (c1 - self.client0) / n:.3f} ms{group}, load {os.getloadavg()[0]:.1f}")


PATHS = ("ping", "cc", "stream", "auth")


def bench_grpc(rate: int, seconds: float, rpc_workers: int | None = None, processes: int = 1,
               gateways: int = 1, quick: bool = False, paths: frozenset = frozenset(PATHS)) -> None:
    import grpc

    from meterlink.gateway.enrol import channel_credentials, enroll
    from meterlink.gateway.payg_sync import CreditControlLink
    from meterlink.gateway.payg import _blacklist_from_json, _card_list_from_json
    from meterlink.headend.payg_service import vendor_channel_credentials
    from meterlink.v1 import payg_pb2, payg_pb2_grpc
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--rpc-workers", str(rpc_workers)] if rpc_workers else []
        procs = [subprocess.Popen([sys.executable, __file__, "--serve", tmp, "--gateways", str(gateways), *extra],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)]
        channels, vendor_channels = [], []
        try:
            info = json.loads(procs[0].stdout.readline())
            for _ in range(processes - 1):       # further server processes on the same database and port
                procs.append(subprocess.Popen([sys.executable, __file__, "--serve", tmp, "--join", str(info["port"]),
                                               *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
                json.loads(procs[-1].stdout.readline())
            target = f"127.0.0.1:{info['port']}"
            own = [("grpc.use_local_subchannel_pool", 1)]      # one TCP connection per channel
            for g, code in enumerate(info["codes"]):            # each gateway its own certificate and connection
                identity = enroll(f"127.0.0.1:{info['enrol_port']}", code, Path(tmp) / f"gw{g}",
                                  ca_fingerprint=info["ca"])
                channels.append(grpc.secure_channel(target, channel_credentials(identity), options=own))
            for channel in channels:
                grpc.channel_ready_future(channel).result(timeout=10)
            ccs = [payg_pb2_grpc.CreditControlStub(channel) for channel in channels]
            links = [CreditControlLink(channel) for channel in channels]     # the gateways' Session streams
            # the vendor SHOP1's terminals: its certificate, as many connections as gateways
            vendor_channels = [grpc.secure_channel(target, vendor_channel_credentials(info["vendor"]), options=own)
                               for _ in channels]
            vends = [payg_pb2_grpc.VendingStub(channel) for channel in vendor_channels]
            pings = [channel.unary_unary(PING) for channel in channels]
            rr = itertools.count()                              # round robin over the connections
            card = Ed25519PrivateKey.from_private_bytes(CARD_SEED)
            numbers: dict[str, int] = {}
            digests: dict[str, bytes] = {}
            nlock = threading.Lock()
            codes: dict = {}

            def count(key) -> None:
                with nlock:
                    codes[key] = codes.get(key, 0) + 1

            def cc_request(i: int):
                acc = f"ACC{i % ACCOUNTS:04d}"
                with nlock:
                    n = numbers.get(acc, 0)
                    numbers[acc] = n + 1
                used = payg_pb2.UsedUnits(used_minor=40, used_wh=1600) if n else None
                g = i % ACCOUNTS % gateways                         # meter i is provisioned to gateway i % G
                req = payg_pb2.CreditControlRequest(gateway_id=f"gw-bench-{g}", session_id=f"S-{acc}",
                                                    request_number=n, account_id=acc, meter_id=f"M-{acc}",
                                                    currency="GBP", used=used, card_lists_digest=digests.get(acc, b""))
                return ccs[g].Reserve if n == 0 else ccs[g].Update, req

            def stream_request(i: int):
                _, req = cc_request(i)
                req.request_type = (payg_pb2.REQUEST_TYPE_INITIAL if req.request_number == 0
                                    else payg_pb2.REQUEST_TYPE_UPDATE)
                return links[int(req.gateway_id.rsplit("-", 1)[1])], req

            def keep_lists(acc: str, answer) -> None:
                """As a gateway does: remember the card lists delivered, so later answers omit them."""
                if answer.card_list and answer.blacklist:
                    digests[acc] = T.card_lists_digest(_card_list_from_json(json.loads(answer.card_list)),
                                                       _blacklist_from_json(json.loads(answer.blacklist)))

            class CC_call:
                """`fn(body)` / `fn.future(body)` over the right RPC for the session's next request."""
                def __call__(self, i):
                    m, req = cc_request(i)
                    answer = m(req, timeout=30)
                    keep_lists(req.account_id, answer)
                    return answer

                def future(self, i):
                    m, req = cc_request(i)
                    f = m.future(req, timeout=30)

                    def done(f, acc=req.account_id):
                        count(f.result().result_code)
                        keep_lists(acc, f.result())
                    f.add_done_callback(done)
                    return f

            class CC_stream:
                """The same requests on each gateway's `CreditControl.Session` stream (CreditControlLink)."""
                def __call__(self, i):
                    link, req = stream_request(i)
                    answer = link.submit(req).result(timeout=30)
                    keep_lists(req.account_id, answer)
                    return answer

                def future(self, i):
                    link, req = stream_request(i)
                    f = link.submit(req)

                    def done(f, acc=req.account_id):
                        count(f.result().result_code)
                        keep_lists(acc, f.result())
                    f.add_done_callback(done)
                    return f

            class Auth_call:
                def __call__(self, body):
                    return vends[next(rr) % gateways].Authorise(body, timeout=30)

                def future(self, body):
                    f = vends[next(rr) % gateways].Authorise.future(body, timeout=30)
                    f.add_done_callback(lambda f: count("authorised" if f.result().authorised else f.result().reason))
                    return f

            class Ping_call:
                def __call__(self, body):
                    return pings[next(rr) % gateways](body, timeout=30)

                def future(self, body):
                    return pings[next(rr) % gateways].future(body, timeout=30)

            def sale_body(i: int, tag: str):
                ch = vends[0].Challenge(payg_pb2.ChallengeRequest(vendor_id="SHOP1"), timeout=10).challenge
                r = sale_request(ch, i, card, tag)
                return payg_pb2.AuthoriseRequest(vendor_id=r.vendor_id, sale_id=r.sale_id, card_id=r.card_id,
                                                 account_id=r.account_id, amount_minor=r.amount_minor,
                                                 currency=r.currency, challenge=r.challenge,
                                                 card_signature=r.signature)

            ccall, acall, pcall, scall = CC_call(), Auth_call(), Ping_call(), CC_stream()
            for i in range(2 * ACCOUNTS):                           # warm up: every session reserved
                ccall(i)
            for r in (rate,) if quick else (rate, rate // 4):       # the goal rate, and a quarter of it
                n = int(r * seconds)
                for path, name, fn in (("ping", "trivial Ping", pcall), ("cc", "credit control", ccall),
                                       ("stream", "credit control Session stream", scall),
                                       ("auth", "top-up authorisation", acall)):
                    if path not in paths:
                        continue
                    bodies = ([b"ping"] * n if path == "ping" else list(range(n)) if path in ("cc", "stream")
                              else [sale_body(i, f"o{r}-") for i in range(n)])     # challenges fetched beforehand
                    codes.clear()
                    phase = Phase(procs)
                    lat = open_loop(fn, bodies, r)
                    results = "" if path == "ping" else f" results {dict(codes)}"
                    report(f"gRPC/mTLS {name} @ {r}/s open loop", lat[0],
                           f"achieved {lat[1]:.0f}/s{results}; {phase.figures(n)}")
            for path, name, fn, body in () if quick else (
                    ("ping", "trivial Ping", pcall, lambda i: b"ping"), ("cc", "credit control", ccall, lambda i: i),
                    ("stream", "credit control Session stream", scall, lambda i: i),
                    ("auth", "sales (Challenge + Authorise)", acall, lambda i: sale_body(i, "c-"))):
                if path not in paths:
                    continue
                for threads in (4, 16):
                    phase = Phase(procs)
                    done, per_s = closed_loop(fn, body, threads, seconds)
                    print(f"gRPC/mTLS {name} closed loop {threads:2d} threads: {per_s:7.0f} req/s sustained; "
                          f"{phase.figures(done)}", flush=True)
        finally:
            for link in locals().get("links", ()):
                link.close()
            for channel in channels + vendor_channels:
                channel.close()
            for proc in procs:
                proc.stdin.close()
            for proc in procs:
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


def closed_loop(fn, body, threads: int, seconds: float) -> tuple[int, float]:
    """(requests done, requests/s) with `threads` threads each sending the next as soon as answered."""
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
    return sum(counts), sum(counts) / (time.perf_counter() - t0)


def bench_history(lengths: list[int], n: int) -> None:
    """Credit control on ONE account whose ledger already holds `length` postings on its prepaid
    account (adjustment pairs that net to nothing): the real CreditControl + SQL sessions over
    PaygStore (SQLite, WAL, synchronous=FULL). The balance is the account's running balance (one
    row), so the cost should not grow with the history; the SUM over the account's postings (how the
    balance was read before, one indexed range scan) is timed next to it for comparison."""
    for length in lengths:
        with tempfile.TemporaryDirectory() as tmp:
            store = PaygStore(f"sqlite:///{tmp}/headend.db", velocity_limits=())
            store.put_account("ACC1", "GBP", max_balance_minor=10**12)
            store.append([L.top_up("seed", T0, "ACC1", "SHOP1", 10**9, "GBP", store.vat)])
            built = time.perf_counter()
            for k in range(0, length, 2 * 5_000):
                batch = []
                for i in range(k, min(length, k + 2 * 5_000), 2):
                    at = T0 - timedelta(days=300) + timedelta(seconds=i)
                    batch += [L.adjustment(f"h{i}", at, "ACC1", 100 + i % 997, "GBP", "history"),
                              L.adjustment(f"h{i}-", at, "ACC1", -(100 + i % 997), "GBP", "history")]
                store.append(batch)
            built = time.perf_counter() - built
            cc = CC.CreditControl(store, SqlSessionStore(store), CC.GrantPolicy(max_grant_minor=500, min_grant_minor=50),
                                  store.vat)
            samples, sums = [], []
            for i in range(n):
                now = T0 + timedelta(seconds=10 * i)
                req = (CC.initial("S1", "ACC1", "M1", "GBP") if i == 0 else
                       CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, i, "ACC1", "M1", "GBP", 40, 1600))
                t = time.perf_counter_ns()
                with store.transaction():
                    assert cc.handle(req, now).answer.ok
                samples.append(time.perf_counter_ns() - t)
                t = time.perf_counter_ns()
                with store._read():
                    store._db.execute("SELECT COALESCE(SUM(amount_minor), 0) FROM payg_posting WHERE account = ? "
                                      "AND currency = ?", (L.prepaid("ACC1"), "GBP")).fetchone()
                sums.append(time.perf_counter_ns() - t)
            assert store.verify_balances() == []
            print(f"history {length:7d} postings on the account (built in {built:5.1f} s):", flush=True)
            report("  credit control (reserve/update, running balance)", samples)
            report("  for comparison: SUM over the account's postings", sums)
            store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: .venv/bin/python bench/bench_payg.py --rate 1000 --seconds 5")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--core-only", action="store_true")
    ap.add_argument("--grpc-only", action="store_true", help="skip the in-process measurements")
    ap.add_argument("-n", type=int, default=2000, help="requests per core measurement")
    ap.add_argument("--rate", type=int, default=1000, help="open-loop request rate over gRPC")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--history", help="only the history benchmark: comma-separated numbers of postings already "
                                      "on the account (e.g. 0,10000,100000); -n requests each")
    ap.add_argument("--rpc-workers", type=int, help="worker threads of the gRPC server process (default: "
                                                       "make_server's 8)")
    ap.add_argument("--join", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--server-processes", type=int, default=1, metavar="N",
                    help="head-end server processes on the one database and port (as `serve --processes N`)")
    ap.add_argument("--gateways", type=int, default=1, metavar="G",
                    help="gateways (each its own certificate and TLS connection; the 200 meters split between "
                         "them) and as many vendor terminal connections")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help="gRPC: which requests to measure, comma-separated: ping (trivial Ping), cc (credit "
                         "control, unary), stream (credit control on CreditControl.Session streams, one per "
                         "gateway), auth (top-up authorisation); default all")
    ap.add_argument("--quick", action="store_true", help="gRPC: only the open-loop lines at --rate (no quarter "
                                                         "rate, no closed loop)")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.rpc_workers, args.join, args.gateways)
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (shared machine: figures are noisy)")
    if args.history:
        bench_history([int(x) for x in args.history.split(",")], args.n)
        return 0
    if not args.grpc_only:
        bench_core(args.n)
    if not args.core_only:
        paths = frozenset(p for p in args.paths.split(",") if p)
        if args.rpc_workers is None and "stream" in paths and args.gateways + 2 > 8:
            # each gateway's Session stream holds a worker while open, and a process serves at most
            # workers - 2 streams (the others would go unary): room for every stream on one process
            args.rpc_workers = args.gateways + 2
        print(f"gRPC server worker threads: {args.rpc_workers or 'default (8)'}, server processes: "
              f"{args.server_processes}, gateway connections: {args.gateways}", flush=True)
        if not paths <= set(PATHS):
            ap.error(f"--paths: unknown {','.join(sorted(paths - set(PATHS)))}; choose from {','.join(PATHS)}")
        bench_grpc(args.rate, args.seconds, args.rpc_workers, args.server_processes, args.gateways, args.quick,
                   paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
