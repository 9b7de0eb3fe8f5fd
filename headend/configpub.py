"""Publishing configuration to gateways: signed deltas by version from the registry's change log; never decides what the configuration is.

A delta is the canonical JSON document (sorted keys, no spaces, UTF-8)::

    {"changes": [{"body": {...}, "kind": "meter.add", "version": 7}, ...],
     "gateway": "gw-0001", "issued_at_ms": 1764000000000, "since": 3, "version": 9}

``version`` is the head of the head-end's change log when the delta was made; ``changes`` are
every change for this gateway (or for all gateways) with ``since < version``. The signature is
Ed25519 over ``SIGNATURE_DOMAIN + payload`` with the head-end's configuration key.

Kinds published today: ``meter.add`` / ``meter.remove`` ({"meter"}), ``tariff.set``
({"name", "toml"}), ``blacklist.add`` / ``blacklist.remove`` ({"card"}), ``credit.grant``
(free-form body for issue 6), ``payg.tariff`` ({"account", "tariff", "vat_rate", "interval_minutes"}:
which published tariff prices a PAYG account's consumption offline at the gateway, the VAT rate the
PAYG ledger splits the gateway's gross charges with, and the market's VEE interval grid; "tariff":
null withdraws it, so the gateway falls back to its configured flat price).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from decimal import Decimal

import grpc

from meterlink import pki
from meterlink.clock import Clock, to_ms
from meterlink.v1 import config_pb2, config_pb2_grpc

from .registry import GatewayRegistry

log = logging.getLogger("meterlink.headend.config")

SIGNATURE_DOMAIN = b"meterlink.v1.config-delta\n"
KINDS = ("meter.add", "meter.remove", "tariff.set", "blacklist.add", "blacklist.remove", "credit.grant",
         "payg.tariff")


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_delta(registry: GatewayRegistry, gateway: str, since: int, now: datetime,
                signing_key) -> config_pb2.SignedConfigDelta:
    """The signed delta taking `gateway` from version `since` to the head of the change log."""
    latest, changes = registry.changes_since(gateway, since)
    if since > latest:
        raise ValueError(f"gateway {gateway} claims configuration version {since}, but this head-end's "
                         f"latest is {latest}")
    payload = canonical({"gateway": gateway, "since": since, "version": latest, "issued_at_ms": to_ms(now),
                         "changes": [{"version": c.version, "kind": c.kind, "body": c.body} for c in changes]})
    return config_pb2.SignedConfigDelta(payload=payload, signature=pki.sign(signing_key, SIGNATURE_DOMAIN + payload),
                                        key_id=pki.key_id(pki.raw_public_key(signing_key)))


def publish_tariff(registry: GatewayRegistry, name: str, toml_text: str, now: datetime, target: str = "*") -> int:
    """Publish a tariff file (for offline rating on the gateways) -> its configuration version."""
    return registry.publish(target, "tariff.set", {"name": name, "toml": toml_text}, now)


def publish_payg_tariff(registry: GatewayRegistry, account: str, tariff: str | None, now: datetime, *,
                        vat_rate: Decimal | str = "0", interval_minutes: int = 15, target: str = "*") -> int:
    """Tell the gateways which published tariff (`publish_tariff` name) prices PAYG `account` offline.

    `vat_rate` must be the rate the PAYG ledger splits gross consumption charges with
    (`ledger.PrepaidVat.rate`): the gateway charges ``net x (1 + vat_rate)``. `interval_minutes` is
    the market's VEE grid (headend/vee.py): the gateway apportions each reading's consumption over
    that grid exactly as the head-end does, so both price the same Wh in the same band. `tariff`
    None withdraws the assignment."""
    rate = Decimal(str(vat_rate))
    if not Decimal(0) <= rate < 1:
        raise ValueError(f"PAYG tariff for account {account}: VAT rate {rate} out of range [0, 1)")
    if not isinstance(interval_minutes, int) or interval_minutes <= 0 or 1440 % interval_minutes:
        raise ValueError(f"PAYG tariff for account {account}: interval_minutes {interval_minutes!r} must divide a day")
    return registry.publish(target, "payg.tariff", {"account": account, "tariff": tariff, "vat_rate": str(rate),
                                                    "interval_minutes": interval_minutes}, now)


def publish_blacklist(registry: GatewayRegistry, cards: list[str], now: datetime, remove: bool = False,
                      target: str = "*") -> int:
    version = 0
    for card in cards:
        version = registry.publish(target, "blacklist.remove" if remove else "blacklist.add", {"card": card}, now)
    return version


class ConfigService(config_pb2_grpc.ConfigServicer):
    """Serves Config.Pull on the mutual-TLS server (the GatewayAuthInterceptor has checked the peer)."""

    def __init__(self, registry: GatewayRegistry, signing_key, clock: Clock) -> None:
        self.registry, self.signing_key, self.clock = registry, signing_key, clock

    def Pull(self, request, context):
        if not request.gateway_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "gateway_id is empty")
        try:
            delta = build_delta(self.registry, request.gateway_id, request.since_version, self.clock.now(),
                                self.signing_key)
        except ValueError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("gateway %s pulled configuration since %d", request.gateway_id, request.since_version)
        return delta
