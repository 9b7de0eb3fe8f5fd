"""`meterlink-headend trust-gateway` / `chain`: seed a gateway's Ed25519 key and show chain heads; thin calls into the chain store."""

from __future__ import annotations

import json
from pathlib import Path

from meterlink.clock import clock_from_spec, to_ms
from meterlink.errors import ConfigError

from .chainstore import open_chain_store
from .cli import _database   # the one --database/--config resolution


def read_public_key(path: str) -> bytes:
    """A raw Ed25519 public key from a file: 64 hex digits (what `meterlink-gateway signing-key` writes) or PEM."""
    data = Path(path).read_bytes()
    text = data.decode("ascii", "replace").strip()
    if text.startswith("-----BEGIN"):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
        key = load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path}: not an Ed25519 public key")
        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path}: expected 64 hex digits or a PEM public key") from None
    if len(raw) != 32:
        raise ConfigError(f"{path}: an Ed25519 public key is 32 bytes, got {len(raw)}")
    return raw


def cmd_trust(args) -> int:
    store = open_chain_store(_database(args))
    try:
        store.trust(args.name, read_public_key(args.public_key), to_ms(clock_from_spec(args.clock).now()))
    finally:
        store.close()
    print(f"gateway {args.name}: chain heads must now be signed by the key in {args.public_key}")
    return 0


def cmd_chain(args) -> int:
    store = open_chain_store(_database(args))
    try:
        seq, h = store.head(args.name)
        key = store.public_key(args.name)
    finally:
        store.close()
    out = {"gateway": args.name, "head_seq": seq, "head_hash": h.hex(), "public_key": key.hex() if key else None}
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def register(sub) -> None:
    tr = sub.add_parser("trust-gateway", help="register the Ed25519 key a gateway signs its chain heads with",
                        epilog="example: meterlink-headend trust-gateway gw-0001 --public-key gw-0001.pub "
                               "--database sqlite:///var/headend.db")
    tr.add_argument("name", help="gateway id")
    tr.add_argument("--public-key", required=True, help="file: 64 hex digits (meterlink-gateway signing-key) or PEM")
    tr.add_argument("--config", default="headend.toml")
    tr.add_argument("--database", help="sqlite:///PATH, overrides the config")
    tr.add_argument("--clock", default="system", help="system | sim:ISO | scaled:ISO,SPEED[,ANCHOR_UNIX]")
    tr.set_defaults(func=cmd_trust)
    ch = sub.add_parser("chain", help="a gateway's chain head as held by the head-end",
                        epilog="example: meterlink-headend chain gw-0001 --json --database sqlite:///var/headend.db")
    ch.add_argument("name", help="gateway id")
    ch.add_argument("--config", default="headend.toml")
    ch.add_argument("--database", help="sqlite:///PATH, overrides the config")
    ch.add_argument("--json", action="store_true")
    ch.set_defaults(func=cmd_chain)
