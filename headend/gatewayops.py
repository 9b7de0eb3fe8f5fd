"""`meterlink-headend gateways ...` and the mutual-TLS part of `serve`: thin commands over the registry, meterlink.pki and the enrolment servers; no rules of their own.

headend.toml gains an optional ``[pki]`` table; when it is present, `serve` listens with mutual
TLS on ``[headend] listen`` and opens the server-TLS enrolment port::

    [pki]
    dir = "var/pki"                         # ca.key, ca.crt, server.key, server.crt, signing.key
    enrol_listen = "0.0.0.0:50052"          # server-TLS only: Enroll
    server_names = ["headend.example", "10.0.0.1", "localhost", "127.0.0.1"]   # SANs of the server certificate
    code_ttl_h = 24                         # validity of a one-time enrolment code
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from meterlink import pki
from meterlink.clock import clock_from_spec
from meterlink.config import load_section
from meterlink.errors import ConfigError

from .registry import RegistryError, open_registry

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class PkiConfig:
    dir: str = "var/pki"
    enrol_listen: str = "127.0.0.1:50052"
    server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES
    code_ttl_h: int = 24


def load_pki_config(path: str | None) -> PkiConfig | None:
    """The ``[pki]`` table of headend.toml, or None when the file has none (plaintext serve)."""
    if not path or not Path(path).exists():
        return None
    root = load_section(path)
    if "pki" not in root.data:
        return None
    sec = root.section("pki")
    sec.check_known({"dir", "enrol_listen", "server_names", "code_ttl_h"})
    names = sec.get("server_names", list, list(DEFAULT_SERVER_NAMES))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise sec.error("server_names", "must be a non-empty list of host names or addresses")
    ttl = sec.get("code_ttl_h", int, 24)
    if ttl <= 0:
        raise sec.error("code_ttl_h", "must be a positive number of hours")
    return PkiConfig(sec.get("dir", str, "var/pki"), sec.get("enrol_listen", str, "127.0.0.1:50052"),
                     tuple(names), ttl)


def _pki_config(args) -> PkiConfig:
    cfg = load_pki_config(getattr(args, "config", None)) or PkiConfig()
    if getattr(args, "pki_dir", None):
        cfg = PkiConfig(args.pki_dir, cfg.enrol_listen, cfg.server_names, cfg.code_ttl_h)
    return cfg


def _database(args) -> str:
    if getattr(args, "database", None):
        return args.database
    if not Path(args.config).exists():
        raise ConfigError(f"no --database given and config file {args.config} does not exist", path=args.config)
    return load_section(args.config).section("headend", required=False).get("database", str,
                                                                             "sqlite:///var/headend.db")


# ------------------------------------------------------------------------------------------ serve

def start_secure(args, cfg_listen: str, repo, clock, metrics=None, chain=None, workers: int = 8):
    """When headend.toml has ``[pki]`` (or --pki-dir is given): build and start the mTLS and
    enrolment servers and return them (a `SecureHeadend`); otherwise None (plaintext serve)."""
    pcfg = load_pki_config(getattr(args, "config", None))
    if pcfg is None and not getattr(args, "pki_dir", None):
        return None
    pcfg = _pki_config(args)
    from .enrolment import make_secure_servers
    keys = pki.ensure_headend_pki(pcfg.dir, list(pcfg.server_names), clock.now())
    registry = open_registry(getattr(args, "database", None) or _database(args))
    servers = make_secure_servers(repo, clock, keys, registry, cfg_listen,
                                  getattr(args, "enrol_listen", None) or pcfg.enrol_listen,
                                  metrics=metrics, chain=chain, workers=workers)
    servers.registry = registry
    servers.keys = keys
    return servers.start()


# ------------------------------------------------------------------------------------ gateways …

def cmd_gateways(args) -> int:
    clock = clock_from_spec(getattr(args, "clock", None))
    now = clock.now()
    pcfg = _pki_config(args)
    registry = open_registry(_database(args))
    try:
        if args.gateways_command in ("add", "code"):
            keys = pki.ensure_headend_pki(pcfg.dir, list(pcfg.server_names), now)
            ttl = timedelta(hours=args.ttl_h or pcfg.code_ttl_h)
            owners = {m: r.name for r in registry.list() for m in r.meters}
            for meter in args.meter or ():
                if owners.get(meter, args.name) != args.name:      # refuse before a code is made
                    raise RegistryError(f"meter {meter} is provisioned to gateway {owners[meter]}; remove it there first")
            code = (registry.add if args.gateways_command == "add" else registry.new_code)(args.name, now, ttl)
            if args.meter:
                registry.provision(args.name, list(args.meter), [], now)
            expires = (now + ttl).isoformat(timespec="seconds").replace("+00:00", "Z")
            if args.json:
                print(json.dumps({"gateway": args.name, "code": code, "expires": expires,
                                  "ca_fingerprint": keys.ca_fingerprint, "enrol_address": pcfg.enrol_listen}))
            else:
                print(f"gateway {args.name}: one-time enrolment code {code} (expires {expires})")
                print(f"head-end CA fingerprint (SHA-256): {keys.ca_fingerprint}")
                print(f"on the gateway: meterlink-gateway enroll --headend {pcfg.enrol_listen} --code {code} "
                      f"--ca-fingerprint {keys.ca_fingerprint}")
        elif args.gateways_command == "list":
            rows = registry.list()
            if args.json:
                print(json.dumps([{"gateway": r.name, "status": r.status, "cert_serial": r.cert_serial,
                                   "signing_key": pki.key_id(r.signing_public_key) if r.signing_public_key else None,
                                   "meters": list(r.meters)} for r in rows]))
            else:
                print(f"{'gateway':20} {'status':20} {'certificate serial':34} meters")
                for r in rows:
                    print(f"{r.name:20} {r.status:20} {r.cert_serial or '-':34} {', '.join(r.meters) or '-'}")
        elif args.gateways_command == "revoke":
            registry.revoke(args.name, now)
            print(f"gateway {args.name} revoked: its certificate is refused from the next call on")
        elif args.gateways_command == "meters":
            meters = registry.provision(args.name, args.add or [], args.remove or [], now)
            print(f"gateway {args.name}: {', '.join(meters) or 'no meters'}")
        elif args.gateways_command == "tariff":
            version = publish_tariff_file(registry, args.name, Path(args.file), now, args.gateway or "*")
            print(f"tariff {args.name} published to {args.gateway or 'every gateway'} as configuration version "
                  f"{version}")
        elif args.gateways_command == "payg-tariff":
            if bool(args.tariff) == bool(args.withdraw):
                raise RegistryError(f"PAYG account {args.account}: give exactly one of --tariff NAME or --withdraw")
            version = assign_payg_tariff(registry, args.account, None if args.withdraw else args.tariff, now,
                                         vat_rate=args.vat_rate, interval_minutes=args.interval_minutes,
                                         target=args.gateway or "*")
            what = "withdrawn" if args.withdraw else f"priced offline with tariff {args.tariff}"
            print(f"PAYG account {args.account}: {what} on {args.gateway or 'every gateway'} "
                  f"(configuration version {version})")
    finally:
        registry.close()
    return 0


def publish_tariff_file(registry, name: str, path: Path, now, target: str = "*") -> int:
    """Publish a tariff file for offline rating after checking it parses as a head-end tariff (the gateways
    rate with the same code: a file the head-end cannot read would only fail later, on every gateway)."""
    from .configpub import publish_tariff
    from .tariff import load_tariff
    if not path.exists():
        raise ConfigError(f"tariff file {path} does not exist", path=str(path))
    load_tariff(path)                               # TariffError names the file and the field
    return publish_tariff(registry, name, path.read_text(), now, target)


def assign_payg_tariff(registry, account: str, tariff: str | None, now, *, vat_rate: str, interval_minutes: int,
                       target: str = "*") -> int:
    """Tell gateways which published tariff prices PAYG `account` offline; refuses a tariff name that was
    never published to `target` (the gateways would fall back to their flat price)."""
    from .configpub import publish_payg_tariff
    if tariff is not None:
        _, changes = registry.changes_since(target, 0)     # '*': the changes every gateway receives
        published = {c.body.get("name") for c in changes if c.kind == "tariff.set"}
        if tariff not in published:
            raise RegistryError(f"tariff {tariff} was never published to {'every gateway' if target == '*' else target}"
                                f": publish it first with `meterlink-headend gateways tariff {tariff} --file FILE`")
    try:
        return publish_payg_tariff(registry, account, tariff, now, vat_rate=vat_rate,
                                   interval_minutes=interval_minutes, target=target)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def add_gateways_parser(sub) -> None:
    """Register `gateways add|code|list|revoke|meters|tariff|payg-tariff` on the head-end CLI's subparsers."""
    gw = sub.add_parser("gateways", help="enrol, list and revoke gateways; provision meters to them",
                        epilog="example: meterlink-headend gateways add gw-0001 --config headend.toml")
    gsub = gw.add_subparsers(dest="gateways_command", required=True)

    def common(p):
        p.add_argument("--config", default="headend.toml", help="config file (default headend.toml)")
        p.add_argument("--database", help="sqlite:///PATH or postgresql://..., overrides the config")
        p.add_argument("--pki-dir", help="head-end CA directory, overrides [pki] dir")
        p.add_argument("--clock", default="system", help=__import__("argparse").SUPPRESS)
        p.set_defaults(func=cmd_gateways)

    for name, helptext in (("add", "register a gateway and print its one-time enrolment code"),
                           ("code", "print a new one-time code for an existing gateway (re-enrolment)")):
        p = gsub.add_parser(name, help=helptext,
                            epilog=f"example: meterlink-headend gateways {name} gw-0001 --meter MTR-0001 "
                                   f"--config headend.toml")
        p.add_argument("name", help="gateway name (letters, digits, - _ .)")
        p.add_argument("--meter", action="append", help="provision this meter to it (repeatable)")
        p.add_argument("--ttl-h", type=int, help="hours the code stays valid (default [pki] code_ttl_h, 24)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        common(p)
    p = gsub.add_parser("list", help="every gateway with its status, certificate serial and meters",
                        epilog="example: meterlink-headend gateways list --json")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    common(p)
    p = gsub.add_parser("revoke", help="refuse a gateway's certificate from now on",
                        epilog="example: meterlink-headend gateways revoke gw-0001")
    p.add_argument("name")
    common(p)
    p = gsub.add_parser("meters", help="provision meters to a gateway or withdraw them",
                        epilog="example: meterlink-headend gateways meters gw-0001 --add MTR-0001 --remove MTR-0009")
    p.add_argument("name")
    p.add_argument("--add", action="append", help="meter id to provision (repeatable)")
    p.add_argument("--remove", action="append", help="meter id to withdraw (repeatable)")
    common(p)
    p = gsub.add_parser("tariff", help="publish a tariff file to the gateways for offline PAYG pricing "
                        "(signed configuration delta)",
                        epilog="example: meterlink-headend gateways tariff gb-economy7 --file tariffs/e7.toml")
    p.add_argument("name", help="the name gateways know the tariff by")
    p.add_argument("--file", required=True, help="tariff TOML (the head-end's tariff format; checked before publishing)")
    p.add_argument("--gateway", help="publish to this gateway only (default: every gateway)")
    common(p)
    p = gsub.add_parser("payg-tariff", help="which published tariff prices a PAYG account offline on the gateways",
                        epilog="example: meterlink-headend gateways payg-tariff ACC-0001 --tariff gb-economy7 "
                               "--vat-rate 0.05 --interval-minutes 30")
    p.add_argument("account")
    p.add_argument("--tariff", help="a tariff name published with `gateways tariff`")
    p.add_argument("--withdraw", action="store_true", help="withdraw the assignment (gateways fall back to their "
                   "configured flat price)")
    p.add_argument("--vat-rate", default="0", help="the rate the PAYG ledger splits gross charges with, e.g. 0.05")
    p.add_argument("--interval-minutes", type=int, default=15, help="the market's interval grid (default 15)")
    p.add_argument("--gateway", help="this gateway only (default: every gateway)")
    common(p)
