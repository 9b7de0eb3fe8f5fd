"""EXPERIMENT, not the product: credit control on a grpc.aio server whose event loop runs each request's body inline and group-commits by one executor hop per group, against the product's sync server — CPU per request over loopback mutual TLS.

Usage:
  .venv/bin/python bench/proto_aio_payg.py [--rate 1000] [--seconds 3] [--gateways 4] [--server-processes 2]

Both servers are separate processes seeded like bench_payg.py (200 accounts, bound meters, the token
key, G gateways with the meters split between them). "sync" is bench_payg.py's own server (the
product's mutual-TLS server and PAYG servicers); "aio" puts the same `CreditControlService._handle`
(the registry check, the SQL, the core, the card lists) on a grpc.aio server: a body runs on the
event loop inside one open SQLite transaction (a SAVEPOINT each), and the COMMIT of everything run
since the last one goes to an executor thread while the loop goes on receiving; a body that finds a
COMMIT in flight waits for it. It reaches into PaygStore's private group-commit state and has no
gateway interceptor, sync/config services, refusal path or shutdown handling: a measurement of what
that shape would save (docs/payg.md, Benchmark, third round), not something to deploy.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_payg as B  # noqa: E402


def serve_aio(directory: str, gateways: int, join: int | None = None) -> int:
    import grpc
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from meterlink import pki
    from meterlink.clock import SystemClock
    from meterlink.headend import creditcontrol as CC
    from meterlink.headend import payg_service
    from meterlink.headend.enrolment import make_enrolment_server, mtls_server_credentials
    from meterlink.headend.registry import open_registry
    from meterlink.v1 import payg_pb2_grpc
    d = Path(directory)
    clock = SystemClock()
    db = f"sqlite:///{d}/headend.db"
    store = B.Service(db, seed=join is None).store
    now = clock.now().replace(microsecond=0)
    if join is None:
        for i in range(B.ACCOUNTS):
            store.bind_meter(f"M-ACC{i:04d}", f"ACC{i:04d}", now)
    registry = open_registry(db)
    keys = pki.ensure_headend_pki(d / "pki", ["localhost", "127.0.0.1"], now)
    enrol_server, enrol_port = make_enrolment_server(registry, keys, clock, "127.0.0.1:0")
    enrol_server.start()
    cc = payg_service.CreditControlService(store, clock, CC.GrantPolicy(max_grant_minor=500, min_grant_minor=50),
                                           token_key=Ed25519PrivateKey.from_private_bytes(B.TOKEN_KEY_SEED),
                                           registry=registry)
    codes = []
    for g in range(gateways if join is None else 0):
        codes.append(registry.add(f"gw-bench-{g}", now))
        registry.provision(f"gw-bench-{g}", [f"M-ACC{i:04d}" for i in range(g, B.ACCOUNTS, gateways)], [], now)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        me = threading.get_ident()
        pending: list = []
        state: dict = {"committing": None, "open": False}
        executor = ThreadPoolExecutor(1)

        def commit() -> None:
            store._db.execute("COMMIT")
            store._unlock()

        async def group_commit() -> None:
            batch = pending[:]
            pending.clear()
            state["open"] = False
            store._owner = None
            done = state["committing"] = loop.create_future()
            try:
                await loop.run_in_executor(executor, commit)
                store.commits += 1
                store.committed_transactions += len(batch)
                for f in batch:
                    f.set_result(None)
            finally:
                state["committing"] = None
                done.set_result(None)

        class Servicer(payg_pb2_grpc.CreditControlServicer):
            async def _do(self, request, context, rtype):
                while state["committing"] is not None:
                    await state["committing"]
                if not state["open"]:
                    store._begin()                       # flock + BEGIN IMMEDIATE
                    store._batch = None
                    store._owner = me                    # the servicer's transaction() joins ours
                    state["open"] = True
                store._db.execute("SAVEPOINT request")
                try:
                    answer = cc._handle(request, context, rtype)
                except BaseException:
                    store._db.execute("ROLLBACK TO request")
                    raise
                finally:
                    store._db.execute("RELEASE request")
                done = loop.create_future()
                pending.append(done)
                if len(pending) == 1:
                    loop.call_soon(lambda: asyncio.ensure_future(group_commit()))
                await done
                return answer

            async def Reserve(self, request, context):
                return await self._do(request, context, CC.RequestType.INITIAL_REQUEST)

            async def Update(self, request, context):
                return await self._do(request, context, CC.RequestType.UPDATE_REQUEST)

        async def ping(request, context):
            return request

        server = grpc.aio.server()
        payg_pb2_grpc.add_CreditControlServicer_to_server(Servicer(), server)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Ping", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}),))
        port = server.add_secure_port(f"127.0.0.1:{join or 0}", mtls_server_credentials(keys))
        await server.start()
        print(json.dumps({"port": port, "enrol_port": enrol_port, "codes": codes, "ca": keys.ca_fingerprint}),
              flush=True)
        while await loop.run_in_executor(None, sys.stdin.readline):
            print(json.dumps({"cpu": time.process_time(), "sys": os.times().system, "commits": store.commits,
                              "transactions": store.committed_transactions}), flush=True)
        await server.stop(0)

    asyncio.run(run())
    enrol_server.stop(None)
    return 0


def drive(kind: str, rate: int, seconds: float, gateways: int, processes: int = 1) -> None:
    """Open loop Ping, then credit control (Reserve once per session, then Update, with the card-list
    digest like a gateway) at `rate`, against the `kind` server; one line each as bench_payg.py."""
    import grpc

    from meterlink.gateway import tokens as T
    from meterlink.gateway.enrol import channel_credentials, enroll
    from meterlink.gateway.payg import _blacklist_from_json, _card_list_from_json
    from meterlink.v1 import payg_pb2, payg_pb2_grpc
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ([sys.executable, __file__, "--serve-aio", tmp, "--gateways", str(gateways)] if kind == "aio" else
               [sys.executable, B.__file__, "--serve", tmp, "--gateways", str(gateways)])
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)]
        channels = []
        try:
            info = json.loads(procs[0].stdout.readline())
            for _ in range(processes - 1):          # further servers on the same database and port
                procs.append(subprocess.Popen(cmd + ["--join", str(info["port"])], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, text=True))
                json.loads(procs[-1].stdout.readline())
            for g, code in enumerate(info["codes"]):
                identity = enroll(f"127.0.0.1:{info['enrol_port']}", code, Path(tmp) / f"gw{g}",
                                  ca_fingerprint=info["ca"])
                channels.append(grpc.secure_channel(f"127.0.0.1:{info['port']}", channel_credentials(identity),
                                                    options=[("grpc.use_local_subchannel_pool", 1)]))
            ccs = [payg_pb2_grpc.CreditControlStub(c) for c in channels]
            pings = [c.unary_unary(B.PING) for c in channels]
            numbers: dict[str, int] = {}
            digests: dict[str, bytes] = {}

            def request(i: int):
                acc, g = f"ACC{i % B.ACCOUNTS:04d}", i % B.ACCOUNTS % gateways
                n = numbers.get(acc, 0)
                numbers[acc] = n + 1
                req = payg_pb2.CreditControlRequest(
                    gateway_id=f"gw-bench-{g}", session_id=f"S-{acc}", request_number=n, account_id=acc,
                    meter_id=f"M-{acc}", currency="GBP", card_lists_digest=digests.get(acc, b""),
                    used=payg_pb2.UsedUnits(used_minor=40, used_wh=1600) if n else None)
                return (ccs[g].Reserve if n == 0 else ccs[g].Update), req

            def keep(acc: str, answer) -> None:
                assert answer.result_code == 2001, answer
                if answer.card_list and answer.blacklist:
                    digests[acc] = T.card_lists_digest(_card_list_from_json(json.loads(answer.card_list)),
                                                       _blacklist_from_json(json.loads(answer.blacklist)))

            for i in range(2 * B.ACCOUNTS):                      # warm up: every session reserved
                method, req = request(i)
                keep(req.account_id, method(req, timeout=30))

            class CreditControl:
                def future(self, i):
                    method, req = request(i)
                    f = method.future(req, timeout=30)
                    f.add_done_callback(lambda f, acc=req.account_id: keep(acc, f.result()))
                    return f

            turn = itertools.count()

            class Ping:
                def future(self, body):
                    return pings[next(turn) % gateways].future(body, timeout=30)

            n = int(rate * seconds)
            for name, fn, bodies in (("trivial Ping", Ping(), [b"ping"] * n),
                                     ("credit control", CreditControl(), list(range(n)))):
                phase = B.Phase(procs)
                lat, per_s = B.open_loop(fn, bodies, rate)
                B.report(f"{kind:4} {name} @ {rate}/s open loop", lat, f"achieved {per_s:.0f}/s; {phase.figures(n)}")
        finally:
            for c in channels:
                c.close()
            for proc in procs:
                proc.stdin.close()
            for proc in procs:
                proc.wait(timeout=20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: .venv/bin/python bench/proto_aio_payg.py --rate 1000 --seconds 3")
    ap.add_argument("--serve-aio", help=argparse.SUPPRESS)
    ap.add_argument("--join", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--server-processes", type=int, default=1, metavar="N",
                    help="server processes of each kind on one database and port (as bench_payg.py)")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--gateways", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="sync/aio pairs, back to back")
    args = ap.parse_args()
    if args.serve_aio:
        return serve_aio(args.serve_aio, args.gateways, args.join)
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (shared machine: figures are noisy)")
    for _ in range(args.rounds):
        for kind in ("sync", "aio"):
            drive(kind, args.rate, args.seconds, args.gateways, args.server_processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
