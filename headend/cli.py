"""`meterlink-headend`: the head-end service and operator commands (thin calls into the library)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass

from meterlink.clock import clock_from_spec
from meterlink.config import load_section
from meterlink.errors import MeterlinkError, ValidationError
from meterlink.stopping import bound_shutdown, stop_on_signals

from .service import make_server, stop_server
from .store import open_repository


@dataclass(frozen=True)
class HeadendConfig:
    listen: str
    database: str


def load_config(path: str) -> HeadendConfig:
    root = load_section(path)
    sec = root.section("headend", required=False)
    sec.check_known({"listen", "database"})
    return HeadendConfig(listen=sec.get("listen", str, "127.0.0.1:50051"),
                         database=sec.get("database", str, "sqlite:///var/headend.db"))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_NOT_FOR_REPLICAS = {"help", "processes", "listen", "metrics_listen", "replica", "func", "serve_parser", "no_rating"}


def _replica_argv(args, listen: str) -> list[str]:
    """The command line of a further `serve` process: this one's options, on the port `listen` this
    one already bound, without --processes, metrics and rating (the first process keeps those)."""
    argv = [sys.executable, "-m", "meterlink.headend.cli"] + (["-v"] if getattr(args, "verbose", False) else [])
    argv += ["serve", "--listen", listen, "--no-rating", "--replica"]
    for action in args.serve_parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in _NOT_FOR_REPLICAS or not action.option_strings or value == action.default:
            continue
        argv += [action.option_strings[0]] if isinstance(action, argparse._StoreTrueAction) else \
            [action.option_strings[0], str(value)]
    return argv


def _spawn_replica(args, listen: str):
    """Start one further `serve` process on `listen` (returns at once; _replica_listening waits for it)."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}   # systemd hears the first one only
    env[_PARENT_ENV] = str(os.getpid())
    return subprocess.Popen(_replica_argv(args, listen), stdout=subprocess.PIPE, text=True, env=env)


_PARENT_ENV = "METERLINK_SERVE_FIRST_PID"


def _stop_with_the_first_process() -> None:
    """In a further process (Linux): SIGTERM when the first process dies, even by SIGKILL, so no orphan keeps
    serving the port without supervision (prctl PR_SET_PDEATHSIG; the first process spawns each further one
    from a thread that lives until the head-end stops). A first process already gone: exit at once."""
    import ctypes
    import os
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):                        # not Linux: the supervisor's SIGTERM only
        return
    first = os.environ.get(_PARENT_ENV)
    if first and os.getppid() != int(first):
        raise SystemExit(f"serve --replica: the first process {first} has exited")


def _replica_listening(proc) -> bool:
    """Block until a further process prints its address (True: it listens) or exits first (False)."""
    started = proc.stdout.readline().strip()
    proc.stdout.close()
    if started:
        logging.getLogger("meterlink.headend").info("further serve process pid %d listening on %s", proc.pid, started)
    return bool(started)


def _start_replicas(args, n: int, listen: str) -> list:
    """`serve --processes N`: N further processes serving the same port (SO_REUSEPORT: the kernel
    spreads the incoming connections over the processes) and database; returns them once each
    listens. Their PAYG writes queue on the database's write lock (PaygStore: flock + BEGIN IMMEDIATE
    on SQLite, an advisory lock on PostgreSQL), so every rule (idempotency, reservations,
    balances) holds across processes as it does across threads. A failure to start stops them all
    (at start the cause is a configuration one); afterwards `_supervise_replicas` restarts one that exits."""
    procs = []
    try:
        for _ in range(n):
            proc = _spawn_replica(args, listen)
            procs.append(proc)
            if not _replica_listening(proc):
                raise MeterlinkError(f"serve --processes: a further process on {listen} did not start "
                                     f"(exit status {proc.wait(timeout=30)})")
    except BaseException:
        _stop_replicas(procs)
        raise
    return procs


def _supervise_replicas(args, procs: list, listen: str, stop, metrics):
    """Restart a further process that exits while the first one serves (kill -9, OOM, crash), on the same port,
    1 s after its exit doubling to 60 s for each exit in a row (reset once one has served 60 s); logged at
    WARNING, counted in the first process's metrics (meterlink_headend_process_exits_total / _restarts_total)."""
    from .supervise import Supervisor
    return Supervisor(procs, lambda: _spawn_replica(args, listen), _replica_listening, stopping=stop.is_set,
                      registry=metrics.registry if metrics is not None else None).start()


def _stop_replicas(procs: list) -> None:
    import signal
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            code = proc.wait(timeout=45)
        except Exception:
            proc.kill()
            code = proc.wait()
        if code != 0:
            logging.getLogger("meterlink.headend").warning("further serve process %d stopped with exit status %s",
                                                           proc.pid, code)


def cmd_serve(args) -> int:
    cfg = load_config(args.config)
    clock = clock_from_spec(args.clock)
    repo = open_repository(args.database or cfg.database)
    from .gatewayops import start_secure
    replica = getattr(args, "replica", False)
    if replica:
        _stop_with_the_first_process()
        args.metrics_listen = None
    metrics = None
    if getattr(args, "metrics_listen", None):   # Prometheus /metrics: records, duplicates, refusals, latency
        from meterlink.metrics import HeadendMetrics
        metrics = HeadendMetrics.create()
    if getattr(args, "payg", False):               # PAYG credit control + vending on the same server
        from . import service as _service
        from .payg_service import policy_from_args, serve_hook
        _service.SERVER_HOOKS.append(serve_hook(args.database or cfg.database, clock,
                                                token_key_path=args.payg_token_key, policy=policy_from_args(args)))
    workers = getattr(args, "rpc_workers", None) or 8   # the gRPC server's worker pool
    stop = stop_on_signals()                       # before the address is printed: an early SIGTERM stops cleanly
    secure = start_secure(args, args.listen or cfg.listen, repo, clock, metrics=metrics,
                          workers=workers)          # mTLS when [pki] is configured
    if secure is not None:
        server, port = secure.server, secure.port
    else:
        server, port = make_server(repo, clock, args.listen or cfg.listen, workers=workers, metrics=metrics)
        server.start()
    from .rating_worker import start_for_serve     # rate readings as they arrive (--no-rating: off)
    rating = start_for_serve(args, args.database or cfg.database, clock, repo)
    host = (args.listen or cfg.listen).rpartition(":")[0]
    supervisor = None
    if not replica and (getattr(args, "processes", None) or 1) > 1:
        try:
            supervisor = _supervise_replicas(args, _start_replicas(args, args.processes - 1, f"{host}:{port}"),
                                             f"{host}:{port}", stop, metrics)
        except BaseException:
            stop_server(server, grace=0)
            if rating is not None:
                rating.stop()
            raise
    print(f"{host}:{port}", flush=True)
    if replica:                                    # the first process read our address and closed the pipe
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    if secure is not None and not replica:
        print(f"enrol {secure.enrol_port} ca-sha256 {secure.keys.ca_fingerprint}", flush=True)
    if metrics is not None:
        from meterlink.metrics import serve_metrics
        mhost = args.metrics_listen.rpartition(":")[0] or "127.0.0.1"
        print(f"metrics http://{mhost}:{serve_metrics(metrics.registry, args.metrics_listen)}/metrics", flush=True)
    logging.getLogger("meterlink.headend").info("head-end listening on %s:%d, database %s", host, port,
                                                args.database or cfg.database)
    from meterlink.sdnotify import Notifier        # systemd Type=notify: ready once the ports listen
    notifier = Notifier()
    notifier.ready(f"listening on {host}:{port}")
    stop.wait()
    notifier.stopping()
    bound_shutdown(20)                             # a stop that hangs dumps every thread's stack and exits 1
    if supervisor is not None:                     # no restart from now on; they stop as this one does (SIGTERM)
        _stop_replicas(supervisor.stop())
    stop_server(server, grace=2)                   # every handler has returned before the stores close
    if rating is not None:
        rating.stop()
    if secure is not None:
        secure.enrol_server.stop(None)
        secure.registry.close()
    repo.close()
    return 0


def _database(args) -> str:
    if args.database:
        return args.database
    return load_config(args.config).database


def cmd_migrate(args) -> int:
    """Bring the database to this build's schema version (--check: only report; exit 1 if pending)."""
    repo = open_repository(_database(args), migrate=False)
    try:
        if args.check:
            pending = repo.pending_migrations()
            for m in pending:
                print(f"pending {m.label}")
            print(f"{repo.display_url}: schema version {repo.schema_version()}, {len(pending)} pending")
            return 1 if pending else 0
        applied = repo.migrate()
        for m in applied:
            print(f"applied {m.label} ({m.checksum})")
        print(f"{repo.display_url}: schema version {repo.schema_version()}"
              + ("" if applied else " (already up to date)"))
        return 0
    finally:
        repo.close()


def cmd_readings(args) -> int:
    repo = open_repository(_database(args))
    rows = repo.readings(args.meter, args.obis)
    repo.close()
    if args.json:
        print(json.dumps({"meter": args.meter, "readings": [
            {"obis": r.obis, "taken_at": r.taken_at.isoformat().replace("+00:00", "Z"), "value": r.value,
             "unit": r.unit, "quality": r.quality} for r in rows]}, indent=None))
        return 0
    if not rows:
        print(f"no readings for meter {args.meter}")
        return 0
    print(f"{'taken at (UTC)':25} {'OBIS':8} {'value':>14} unit")
    for r in rows:
        print(f"{r.taken_at.isoformat().replace('+00:00', 'Z'):25} {r.obis:8} {r.value:>14} {r.unit}")
    return 0


# --------------------------------------------------------------------------- PAYG (issue 6): settle, cards, vendors


def _payg_store(args):
    from .payg_store import PaygStore
    return PaygStore(_database(args))


def _payg_now(args):
    from meterlink.clock import parse_instant
    return parse_instant(args.at) if getattr(args, "at", None) else clock_from_spec(args.clock).now()


def cmd_settle(args) -> int:
    from . import settlement
    store = _payg_store(args)
    try:
        run = settlement.settle(store, settlement.parse_period(args.period, args.timezone), args.vendor)
    finally:
        store.close()
    print(json.dumps(settlement.to_json(run), indent=2) if args.json else settlement.render_text(run))
    return 0 if run.ok else 1


def cmd_over_usage(args) -> int:
    from . import settlement
    store = _payg_store(args)
    try:
        rows = settlement.over_usage_report(store, settlement.parse_period(args.period, args.timezone))
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
        return 0
    print(f"{'account':16} {'meter':16} {'events':>6} {'debt (minor)':>12} {'Wh':>10}")
    for r in rows:
        print(f"{r.account_id:16} {r.meter:16} {r.events:>6} {r.amount_minor:>12} {r.wh:>10}")
    return 0


def cmd_tokens(args) -> int:
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from meterlink.errors import ConfigError, ValidationError
    from . import payg_store
    store = _payg_store(args)
    try:
        if args.tokens_command == "issue":
            try:
                key = serialization.load_pem_private_key(Path(args.key).read_bytes(), None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"head-end signing key: {exc}", path=args.key) from None
            vendor, sep, sale = args.sale.partition("/")
            if not sep:
                raise ValidationError(f"--sale {args.sale!r}: expected VENDOR/SALE_ID")
            token = payg_store.token_for_sale(store, vendor, sale, args.meter, key, _payg_now(args))
            print(json.dumps({"token_id": token.token_id, "meter": token.meter, "counter": token.counter,
                              "amount_minor": token.amount_minor, "currency": token.currency,
                              "token": token.encode()}) if args.json else token.encode())
        else:
            for token_id, reference, amount in payg_store.unapplied_tokens(store, args.meter):
                print(f"{token_id:24} {reference:32} {amount:>10}")
    finally:
        store.close()
    return 0


def cmd_cards(args) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from meterlink.errors import ValidationError
    store = _payg_store(args)
    try:
        now = _payg_now(args)
        if args.cards_command == "issue":
            key = Ed25519PrivateKey.generate()
            pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if args.key_out:
                import os
                pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
                fd = os.open(args.key_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(pem)
            store.register_card(args.card, args.account, pub, now)
            print(json.dumps({"card": args.card, "account": args.account, "public_key": pub.hex(),
                              "private_key_file": args.key_out}))
        elif args.cards_command == "register":
            try:
                pub = bytes.fromhex(args.public_key)
            except ValueError:
                raise ValidationError(f"card {args.card}: public key {args.public_key!r} is not hex") from None
            store.register_card(args.card, args.account, pub, now)
            print(json.dumps({"card": args.card, "account": args.account, "public_key": pub.hex()}))
        elif args.cards_command == "blacklist":
            entry = store.blacklist_card(args.card, now.replace(microsecond=now.microsecond // 1000 * 1000),
                                         args.reason)
            print(json.dumps({"card": entry.card_id, "blacklisted_from":
                              entry.effective_at.isoformat(timespec="milliseconds"), "reason": entry.reason}))
        elif args.cards_command == "list":
            black = {e.card_id for e in store.blacklist() if e.applies(now)}
            for c in sorted(store.cards().values(), key=lambda c: c.card_id):
                print(f"{c.card_id:20} {c.account_id:16} {'active' if c.active else 'inactive':8} "
                      f"{'BLACKLISTED' if c.card_id in black else ''}")
    finally:
        store.close()
    return 0


def cmd_vendors(args) -> int:
    from decimal import Decimal
    from .vendors import VendorContract
    store = _payg_store(args)
    try:
        if args.vendors_command == "add":
            store.put_vendor(VendorContract(args.vendor, args.currency, Decimal(args.commission_percent),
                                            args.commission_fixed, Decimal(args.vat_on_commission),
                                            contract_id=args.contract or ""))
        if args.vendors_command == "account":
            store.put_account(args.account, args.currency, max_balance_minor=args.max_balance)
            return 0
        if args.vendors_command == "cert":
            from meterlink import pki
            from .gatewayops import _pki_config
            from .payg_service import write_vendor_identity
            if args.vendor not in store.vendors():
                raise ValidationError(f"vendor {args.vendor} has no contract: add it first with `vendors add`")
            now = clock_from_spec(args.clock).now()
            pcfg = _pki_config(args)
            keys = pki.ensure_headend_pki(pcfg.dir, list(pcfg.server_names), now)
            out = write_vendor_identity(store, keys, args.vendor, args.out, now)
            serial, _ = store.vendor_cert(args.vendor)
            print(f"vendor {args.vendor}: client certificate {serial} written to {out} (vendor.key, vendor.crt, "
                  f"ca.crt); any earlier certificate of this vendor is refused from now on")
            return 0
        if args.vendors_command == "revoke-cert":
            store.revoke_vendor_cert(args.vendor, clock_from_spec(args.clock).now())
            print(f"vendor {args.vendor}: client certificate revoked; its sales are refused from the next call on")
            return 0
        for v in store.vendors().values():
            print(f"{v.vendor_id:16} {v.contract_id:12} {v.currency} {v.commission_percent}% + "
                  f"{v.commission_fixed_minor} minor, VAT on commission {v.vat_rate_on_commission}")
    finally:
        store.close()
    return 0


def cmd_arrears(args) -> int:
    store = _payg_store(args)
    try:
        acct = store.account(args.account)
        if acct is None:
            raise ValidationError(f"account {args.account} is not a PAYG account")
        if args.arrears_command == "register":
            if args.amount_minor <= 0:
                raise ValidationError(f"arrears of account {args.account}: amount {args.amount_minor} must be > 0")
            store.register_arrears(args.account, args.reference, args.amount_minor, _payg_now(args), args.reason)
        print(f"account {args.account}: arrears outstanding {store.arrears(args.account, acct.currency)} "
              f"{acct.currency} minor units (recovered from top-ups at the gateway, reported on sync)")
    finally:
        store.close()
    return 0


def cmd_balances(args) -> int:
    from .payg_store import check_balances
    store = _payg_store(args)
    try:
        return check_balances(store, rebuild=args.balances_command == "rebuild")
    finally:
        store.close()


def _register_payg(sub) -> None:
    st = sub.add_parser("settle", help="per-vendor settlement statements for a period, reconciled to the ledger",
                        description="Gross sales, refused and reversed sales, commission by contract, VAT on "
                                    "commission and net payable per vendor; exit 1 if any statement does not "
                                    "reconcile to the ledger to the cent.",
                        epilog="example: meterlink-headend settle --period 2026-03 --database sqlite:///var/headend.db")
    st.add_argument("--period", required=True, help="YYYY-MM, YYYY-MM-DD or START/END ISO instants")
    st.add_argument("--timezone", default="UTC", help="zone of the period's calendar boundaries (default UTC)")
    st.add_argument("--vendor", help="only this vendor")
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.add_argument("--config", default="headend.toml")
    st.add_argument("--database", help="sqlite:///PATH, overrides the config")
    st.set_defaults(func=cmd_settle)

    ou = sub.add_parser("over-usage", help="over-usage booked as debt in a period, per account and meter",
                        epilog="example: meterlink-headend over-usage --period 2026-03 --database sqlite:///var/headend.db")
    ou.add_argument("--period", required=True, help="YYYY-MM, YYYY-MM-DD or START/END ISO instants")
    ou.add_argument("--timezone", default="UTC")
    ou.add_argument("--json", action="store_true")
    ou.add_argument("--config", default="headend.toml")
    ou.add_argument("--database", help="sqlite:///PATH, overrides the config")
    ou.set_defaults(func=cmd_over_usage)

    tk = sub.add_parser("tokens", help="signed top-up tokens delivering authorised sales to meters",
                        epilog="example: meterlink-headend tokens issue --sale SHOP1/S-0001 --meter MTR-0001 "
                               "--key headend-signing.pem")
    tsub = tk.add_subparsers(dest="tokens_command", required=True)
    ti = tsub.add_parser("issue", help="print the token of an authorised sale (the same token if asked again)",
                         epilog="example: meterlink-headend tokens issue --sale SHOP1/S-0001 --meter MTR-0001 "
                                "--key headend-signing.pem --json")
    ti.add_argument("--sale", required=True, help="VENDOR/SALE_ID")
    ti.add_argument("--key", required=True, help="head-end Ed25519 signing key (PEM)")
    ti.add_argument("--json", action="store_true")
    ti.add_argument("--clock", default="system", help="system | sim:ISO")
    ti.add_argument("--at", help="ISO instant to use instead of the clock")
    tp = tsub.add_parser("pending", help="tokens of a meter no gateway has reported applied",
                         epilog="example: meterlink-headend tokens pending --meter MTR-0001")
    for p in (ti, tp):
        p.add_argument("--meter", required=True)
        p.add_argument("--config", default="headend.toml")
        p.add_argument("--database", help="sqlite:///PATH, overrides the config")
    tk.set_defaults(func=cmd_tokens)

    cards = sub.add_parser("cards", help="issue, register, blacklist and list customer top-up cards",
                           epilog="example: meterlink-headend cards blacklist --card CARD-0001 --reason stolen "
                                  "--database sqlite:///var/headend.db")
    csub = cards.add_subparsers(dest="cards_command", required=True)
    issue = csub.add_parser("issue", help="generate a card key pair and register its public key",
                            epilog="example: meterlink-headend cards issue --card CARD-0001 --account ACC-0001 "
                                   "--key-out card-0001.pem --database sqlite:///var/headend.db")
    issue.add_argument("--key-out", help="write the card's private key (PEM, mode 0600) for personalisation")
    reg = csub.add_parser("register", help="register a card personalised elsewhere by its public key",
                          epilog="example: meterlink-headend cards register --card CARD-0002 --account ACC-0001 "
                                 "--public-key 3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
    reg.add_argument("--public-key", required=True, help="raw Ed25519 public key, 64 hex digits")
    for p in (issue, reg):
        p.add_argument("--card", required=True)
        p.add_argument("--account", required=True, help="PAYG account the card tops up")
    bl = csub.add_parser("blacklist", help="blacklist a card from now (or --at), to the millisecond",
                         epilog="example: meterlink-headend cards blacklist --card CARD-0001 --reason 'reported stolen'")
    bl.add_argument("--card", required=True)
    bl.add_argument("--reason", default="")
    ls = csub.add_parser("list", help="list registered cards", epilog="example: meterlink-headend cards list")
    for p in (issue, reg, bl, ls):
        p.add_argument("--config", default="headend.toml")
        p.add_argument("--database", help="sqlite:///PATH, overrides the config")
        p.add_argument("--clock", default="system", help="system | sim:ISO")
        p.add_argument("--at", help="ISO instant to use instead of the clock")
    cards.set_defaults(func=cmd_cards)

    vendors = sub.add_parser("vendors", help="vendor contracts and PAYG accounts",
                             epilog="example: meterlink-headend vendors add --vendor SHOP1 --currency GBP "
                                    "--commission-percent 2.5 --commission-fixed 10 --vat-on-commission 0.20")
    vsub = vendors.add_subparsers(dest="vendors_command", required=True)
    add = vsub.add_parser("add", help="add or replace a vendor's contract",
                          epilog="example: meterlink-headend vendors add --vendor SHOP1 --currency GBP "
                                 "--commission-percent 2.5 --commission-fixed 10 --vat-on-commission 0.20")
    add.add_argument("--vendor", required=True)
    add.add_argument("--currency", required=True)
    add.add_argument("--commission-percent", default="0")
    add.add_argument("--commission-fixed", type=int, default=0, help="minor units per sale")
    add.add_argument("--vat-on-commission", default="0", help="rate, e.g. 0.20")
    add.add_argument("--contract", help="contract id printed on statements")
    acc = vsub.add_parser("account", help="create or update a PAYG account cards can top up",
                          epilog="example: meterlink-headend vendors account --account ACC-0001 --currency GBP")
    acc.add_argument("--account", required=True)
    acc.add_argument("--currency", required=True)
    acc.add_argument("--max-balance", type=int, default=100_000, help="minor units")
    vls = vsub.add_parser("list", help="list vendor contracts", epilog="example: meterlink-headend vendors list")
    cert = vsub.add_parser("cert", help="issue a vendor's mutual-TLS client certificate (Vending accepts only "
                           "these); supersedes the vendor's earlier one",
                           epilog="example: meterlink-headend vendors cert --vendor SHOP1 --out shop1-identity "
                                  "--config headend.toml")
    cert.add_argument("--vendor", required=True)
    cert.add_argument("--out", required=True, help="directory for vendor.key (0600), vendor.crt and ca.crt")
    cert.add_argument("--pki-dir", help="head-end CA directory, overrides [pki] dir")
    rev = vsub.add_parser("revoke-cert", help="refuse a vendor's client certificate from now on",
                          epilog="example: meterlink-headend vendors revoke-cert --vendor SHOP1")
    rev.add_argument("--vendor", required=True)
    for p in (cert, rev):
        p.add_argument("--clock", default="system", help=argparse.SUPPRESS)
    for p in (add, acc, vls, cert, rev):
        p.add_argument("--config", default="headend.toml")
        p.add_argument("--database", help="sqlite:///PATH, overrides the config")
    vendors.set_defaults(func=cmd_vendors)

    arrears = sub.add_parser("arrears", help="register a PAYG account's arrears for recovery from its top-ups; show "
                             "what is outstanding",
                             epilog="example: meterlink-headend arrears register --account ACC-0001 --reference "
                                    "OLD-SUPPLY-2025 --amount-minor 1000 --reason 'final bill of the previous supply'")
    asub = arrears.add_subparsers(dest="arrears_command", required=True)
    areg = asub.add_parser("register", help="book arrears (idempotent on --reference); the next credit-control "
                           "answer carries them to the gateway",
                           epilog="example: meterlink-headend arrears register --account ACC-0001 --reference R1 "
                                  "--amount-minor 1000 --reason 'previous supply'")
    areg.add_argument("--account", required=True)
    areg.add_argument("--reference", required=True, help="business reference; the same one books once")
    areg.add_argument("--amount-minor", type=int, required=True, help="minor units, > 0")
    areg.add_argument("--reason", required=True)
    ashow = asub.add_parser("show", help="arrears outstanding for an account",
                            epilog="example: meterlink-headend arrears show --account ACC-0001")
    ashow.add_argument("--account", required=True)
    balances = sub.add_parser("balances", help="check the PAYG running balances against the ledger's postings",
                              epilog="example: meterlink-headend balances verify --database sqlite:///var/headend.db")
    bsub = balances.add_subparsers(dest="balances_command", required=True)
    bver = bsub.add_parser("verify", help="recompute every customer balance from its postings; exit 1 on a mismatch",
                           epilog="example: meterlink-headend balances verify")
    breb = bsub.add_parser("rebuild", help="derive every running balance from the postings again",
                           epilog="example: meterlink-headend balances rebuild")
    for p in (areg, ashow, bver, breb):
        p.add_argument("--config", default="headend.toml")
        p.add_argument("--database", help="sqlite:///PATH or postgresql://..., overrides the config")
        p.add_argument("--clock", default="system", help="system | sim:ISO")
        p.add_argument("--at", help="ISO instant to use instead of the clock")
    arrears.set_defaults(func=cmd_arrears)
    balances.set_defaults(func=cmd_balances)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterlink-headend", description=__doc__,
                                     epilog="example: meterlink-headend serve --config headend.toml")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each batch")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC service (prints HOST:PORT when listening)",
                           epilog="example: meterlink-headend serve --config headend.toml --listen 127.0.0.1:50051")
    serve.add_argument("--config", default="headend.toml", help="config file (default headend.toml)")
    serve.add_argument("--listen", help="HOST:PORT, overrides the config (port 0 picks a free one)")
    serve.add_argument("--database", help="sqlite:///PATH or postgresql://USER@HOST:PORT/DBNAME, overrides the "
                       "config (PostgreSQL: run `migrate` first)")
    serve.add_argument("--clock", default="system", help="system | sim:ISO | scaled:ISO,SPEED[,ANCHOR_UNIX]")
    serve.add_argument("--payg", action="store_true",
                       help="also serve PAYG credit control (gateways) and vending (docs/payg.md)")
    serve.add_argument("--payg-token-key", help="Ed25519 PEM signing the top-up tokens delivered in answers")
    serve.add_argument("--payg-grant-validity-s", type=int, help="grant validity time in seconds (default 6 h)")
    serve.add_argument("--payg-min-grant", type=int, help="smallest grant, minor units (default 100)")
    serve.add_argument("--payg-max-grant", type=int, help="largest grant, minor units (default 5000)")
    serve.add_argument("--payg-burn-rate", help="initial burn rate, minor units per hour (default 20)")
    serve.add_argument("--rpc-workers", type=_positive_int, metavar="N",
                       help="worker threads of the gRPC server (default 8); fewer threads switch less: with --payg, 3 "
                            "cost less server CPU per credit-control request at 1000/s (docs/payg.md, Benchmark)")
    serve.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                       help="serve the port from N processes (default 1) on the one database: the kernel spreads "
                            "the gateways' connections over them (SO_REUSEPORT), so the gRPC and PAYG work uses "
                            "more than one core; the first process alone rates, serves --metrics-listen and "
                            "prints the addresses, and restarts a further one that exits (after 1 s, doubling to "
                            "60 s while they keep exiting; logged, counted in the metrics) (docs/payg.md, "
                            "Several serve processes)")
    serve.add_argument("--replica", action="store_true", help=argparse.SUPPRESS)   # one of --processes' further ones
    serve.add_argument("--pki-dir", help="serve mutual TLS with the head-end CA in this directory (or [pki] dir)")
    serve.add_argument("--enrol-listen", help="HOST:PORT of the server-TLS enrolment port, overrides [pki]")
    serve.add_argument("--metrics-listen", help="HOST:PORT of a Prometheus /metrics endpoint, e.g. 127.0.0.1:9109 "
                                                "(port 0 picks one; printed as 'metrics URL')")
    from .rating_worker import add_serve_arguments
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve, serve_parser=serve)
    mg = sub.add_parser("migrate", help="apply pending schema migrations (versioned, checksummed, one transaction)",
                        epilog="example: meterlink-headend migrate --database postgresql://postgres@127.0.0.1:5432/meterlink")
    mg.add_argument("--config", default="headend.toml", help="config file (default headend.toml)")
    mg.add_argument("--database", help="sqlite:///PATH or postgresql://USER@HOST:PORT/DBNAME, overrides the config")
    mg.add_argument("--check", action="store_true", help="only list pending migrations; exit 1 if there are any")
    mg.set_defaults(func=cmd_migrate)
    rd = sub.add_parser("readings", help="list the readings held for a meter",
                        epilog="example: meterlink-headend readings --meter MTR-0001 --json")
    rd.add_argument("--meter", required=True, help="meter id")
    rd.add_argument("--obis", help="only this register, e.g. 1.8.0")
    rd.add_argument("--config", default="headend.toml")
    rd.add_argument("--database", help="sqlite:///PATH, overrides the config")
    rd.add_argument("--json", action="store_true", help="print one JSON object")
    rd.set_defaults(func=cmd_readings)
    from . import cli_insights, cli_sources
    cli_sources.register(sub)
    cli_insights.register(sub)
    _register_payg(sub)
    from .gatewayops import add_gateways_parser
    add_gateways_parser(sub)
    from . import cli_chain   # trust-gateway, chain
    cli_chain.register(sub)
    from . import cli_billing   # bindings, process, quote, bill, export, reconcile, exceptions
    cli_billing.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except MeterlinkError as exc:
        print(f"meterlink-headend: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
