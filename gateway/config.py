"""Gateway configuration (gateway.toml): buses, meters, head-end, journal; parsing only."""

from __future__ import annotations

from dataclasses import dataclass, field

from meterlink.config import load_section
from meterlink.errors import ConfigError
from meterlink.gateway.profiles import Profile, load_profile

PARITIES = {"N", "E", "O"}


@dataclass(frozen=True)
class MeterConfig:
    id: str
    unit: int
    profile: Profile


@dataclass(frozen=True)
class BusConfig:
    port: str                    # serial device path or tcp://HOST:PORT
    baud: int = 9600
    parity: str = "N"
    stopbits: int = 1
    timeout_s: float = 1.0
    meters: tuple[MeterConfig, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    id: str
    database: str
    poll_interval_s: int
    headend: str | None
    push_batch: int
    buses: tuple[BusConfig, ...] = field(default_factory=tuple)
    path: str = ""


def load_config(path: str) -> GatewayConfig:
    root = load_section(path)
    root.check_known({"gateway", "headend", "bus"})
    gw = root.section("gateway")
    gw.check_known({"id", "database", "poll_interval_s", "push_batch"})
    interval = gw.get("poll_interval_s", int, 900)
    if interval <= 0:
        raise gw.error("poll_interval_s", "must be a positive number of seconds")
    he = root.section("headend", required=False)
    he.check_known({"address"})
    buses = []
    seen: dict[str, str] = {}
    for bus in root.sections("bus"):
        bus.check_known({"port", "baud", "parity", "stopbits", "timeout_s", "meter"})
        parity = bus.get("parity", str, "N").upper()
        if parity not in PARITIES:
            raise bus.error("parity", f"must be one of {', '.join(sorted(PARITIES))}")
        meters = []
        for m in bus.sections("meter"):
            m.check_known({"id", "unit", "profile"})
            mid = m.get("id", str)
            if mid in seen:
                raise m.error("id", f"meter id {mid!r} is configured twice")
            unit = m.get("unit", int)
            if not 1 <= unit <= 247:
                raise m.error("unit", f"unit {unit} outside 1..247")
            try:
                profile = load_profile(m.get("profile", str))
            except ConfigError as exc:
                raise m.error("profile", str(exc)) from None
            seen[mid] = mid
            meters.append(MeterConfig(mid, unit, profile))
        timeout = bus.get("timeout_s", (int, float), 1.0)
        buses.append(BusConfig(port=bus.get("port", str), baud=bus.get("baud", int, 9600), parity=parity,
                               stopbits=bus.get("stopbits", int, 1), timeout_s=float(timeout),
                               meters=tuple(meters)))
    return GatewayConfig(id=gw.get("id", str), database=gw.get("database", str, "var/gateway.db"),
                         poll_interval_s=interval, headend=he.get("address", str, None),
                         push_batch=gw.get("push_batch", int, 5000), buses=tuple(buses), path=path)
