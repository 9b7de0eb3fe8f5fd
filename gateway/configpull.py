"""Pulling configuration from the head-end: verify each signed delta, then apply it to the local configuration state; nothing unverified is ever used.

`verify_delta` and `apply_delta` are pure; `ConfigPuller` is the shell (one gRPC call, one atomic
file write). The state file (``config-state.json`` in the PKI state directory) holds the applied
version and the resulting configuration: meters, tariffs (TOML text by name), blacklisted cards,
credit grants, and PAYG pricing per account (``payg.tariff``: which tariff prices an account's
consumption offline, the VAT rate and the VEE interval grid; read by gateway/pricing.py). Forged (bad signature, other key, other gateway) and replayed or out-of-order
deltas raise `ConfigDeltaRefused` and leave the state untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from meterlink import pki
from meterlink.errors import DeviceError, ValidationError
from meterlink.v1 import config_pb2, config_pb2_grpc

# Must equal meterlink.headend.configpub.SIGNATURE_DOMAIN (the gateway does not import head-end code).
SIGNATURE_DOMAIN = b"meterlink.v1.config-delta\n"
STATE_FILE = "config-state.json"


class ConfigDeltaRefused(ValidationError):
    """A configuration delta that must not be used: forged, for another gateway, replayed or out of order."""


@dataclass(frozen=True)
class Delta:
    gateway: str
    since: int
    version: int
    issued_at_ms: int
    changes: tuple[dict, ...]


@dataclass(frozen=True)
class ConfigState:
    version: int = 0
    meters: tuple[str, ...] = ()
    tariffs: dict = field(default_factory=dict)          # name -> TOML text
    blacklist: tuple[str, ...] = ()
    credit_grants: tuple[dict, ...] = ()
    payg_tariffs: dict = field(default_factory=dict)     # account -> {"tariff", "vat_rate", "interval_minutes", "version"}

    def to_json(self) -> dict:
        return {"version": self.version, "meters": list(self.meters), "tariffs": dict(self.tariffs),
                "blacklist": list(self.blacklist), "credit_grants": list(self.credit_grants),
                "payg_tariffs": dict(self.payg_tariffs)}

    @classmethod
    def from_json(cls, doc: dict) -> "ConfigState":
        return cls(int(doc["version"]), tuple(doc["meters"]), dict(doc["tariffs"]), tuple(doc["blacklist"]),
                   tuple(doc.get("credit_grants", ())), dict(doc.get("payg_tariffs", {})))


def verify_delta(signed: config_pb2.SignedConfigDelta, headend_key: bytes, gateway: str,
                 applied_version: int) -> Delta:
    """The delta, if it is signed by `headend_key`, addressed to `gateway` and starts at `applied_version`."""
    if signed.key_id and signed.key_id != pki.key_id(headend_key):
        raise ConfigDeltaRefused(f"configuration delta signed by key {signed.key_id}, not by the head-end's "
                                 f"key {pki.key_id(headend_key)} pinned at enrolment")
    try:
        pki.verify_signature(headend_key, SIGNATURE_DOMAIN + signed.payload, signed.signature,
                             "configuration delta")
    except pki.PkiError as exc:
        raise ConfigDeltaRefused(f"forged configuration delta refused: {exc}") from None
    try:
        doc = json.loads(signed.payload)
        delta = Delta(str(doc["gateway"]), int(doc["since"]), int(doc["version"]), int(doc["issued_at_ms"]),
                      tuple(doc["changes"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigDeltaRefused(f"configuration delta: signed but malformed ({exc})") from None
    if delta.gateway != gateway:
        raise ConfigDeltaRefused(f"configuration delta is for gateway {delta.gateway!r}, not {gateway!r}")
    if delta.version < applied_version or (delta.version == applied_version and delta.changes):
        raise ConfigDeltaRefused(f"configuration delta {delta.since}->{delta.version} is a replay: version "
                                 f"{applied_version} is already applied")
    if delta.since != applied_version:
        raise ConfigDeltaRefused(f"configuration delta starts at version {delta.since}, but version "
                                 f"{applied_version} is applied (out of order)")
    for c in delta.changes:
        if not (delta.since < int(c["version"]) <= delta.version):
            raise ConfigDeltaRefused(f"configuration delta {delta.since}->{delta.version}: change version "
                                     f"{c['version']} outside it")
    return delta


def apply_delta(state: ConfigState, delta: Delta) -> ConfigState:
    """The configuration after `delta` (verified) -- unknown change kinds are refused, not skipped."""
    meters, tariffs = list(state.meters), dict(state.tariffs)
    blacklist, grants = list(state.blacklist), list(state.credit_grants)
    payg = dict(state.payg_tariffs)
    for c in delta.changes:
        kind, body = c["kind"], c["body"]
        if kind == "meter.add":
            if body["meter"] not in meters:
                meters.append(body["meter"])
        elif kind == "meter.remove":
            meters = [m for m in meters if m != body["meter"]]
        elif kind == "tariff.set":
            tariffs[body["name"]] = body["toml"]
        elif kind == "blacklist.add":
            if body["card"] not in blacklist:
                blacklist.append(body["card"])
        elif kind == "blacklist.remove":
            blacklist = [b for b in blacklist if b != body["card"]]
        elif kind == "credit.grant":
            grants.append(dict(body, version=c["version"]))
        elif kind == "payg.tariff":
            if body.get("tariff") is None:
                payg.pop(body["account"], None)
            else:
                payg[body["account"]] = {"tariff": body["tariff"], "vat_rate": str(body.get("vat_rate", "0")),
                                         "interval_minutes": int(body.get("interval_minutes", 15)),
                                         "version": c["version"]}
        else:
            raise ConfigDeltaRefused(f"configuration change {c['version']}: unknown kind {kind!r} "
                                     f"(this gateway is older than the head-end)")
    return replace(state, version=delta.version, meters=tuple(sorted(meters)), tariffs=tariffs,
                   blacklist=tuple(sorted(blacklist)), credit_grants=tuple(grants), payg_tariffs=payg)


def load_state(path: str | Path) -> ConfigState:
    path = Path(path)
    if not path.exists():
        return ConfigState()
    try:
        return ConfigState.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"{path}: unreadable configuration state ({exc})") from None


def save_state(path: str | Path, state: ConfigState) -> None:
    """Write atomically and durably (temp file, fsync, rename, fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state.to_json(), f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ConfigPuller:
    """Pull, verify, apply, persist. `channel` is a mutual-TLS channel (gateway.enrol.secure_channel)."""

    def __init__(self, channel: grpc.Channel, gateway: str, headend_key: bytes, state_path: str | Path,
                 timeout_s: float = 10.0) -> None:
        self.stub = config_pb2_grpc.ConfigStub(channel)
        self.gateway, self.headend_key, self.state_path = gateway, headend_key, Path(state_path)
        self.timeout_s = timeout_s

    @classmethod
    def for_identity(cls, channel: grpc.Channel, identity, timeout_s: float = 10.0) -> "ConfigPuller":
        return cls(channel, identity.name, identity.headend_config_key, Path(identity.state_dir) / STATE_FILE,
                   timeout_s)

    def state(self) -> ConfigState:
        return load_state(self.state_path)

    def fetch(self, since: int) -> config_pb2.SignedConfigDelta:
        try:
            return self.stub.Pull(config_pb2.ConfigPullRequest(gateway_id=self.gateway, since_version=since),
                                  timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise DeviceError(f"configuration pull from head-end failed: {exc.code().name}: {exc.details()}") from None

    def apply(self, signed: config_pb2.SignedConfigDelta) -> ConfigState:
        """Verify `signed` against the applied state and persist the result (raises ConfigDeltaRefused)."""
        state = self.state()
        delta = verify_delta(signed, self.headend_key, self.gateway, state.version)
        new = apply_delta(state, delta)
        if new != state:
            save_state(self.state_path, new)
        return new

    def pull_once(self) -> ConfigState:
        return self.apply(self.fetch(self.state().version))
