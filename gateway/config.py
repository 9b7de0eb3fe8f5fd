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
    binding_code: str | None = None   # customer binding code given at provisioning
    max_power_w: int | None = None    # plausibility limit; None: the profile's max_power_w


@dataclass(frozen=True)
class BusConfig:
    port: str                    # serial device path or tcp://HOST:PORT
    baud: int = 9600
    parity: str = "N"
    stopbits: int = 1
    timeout_s: float = 1.0
    meters: tuple[MeterConfig, ...] = ()
    stagger_s: float = 0.0            # spread the meters' start times over this many seconds (scheduler)
    backoff_base_s: float = 2.0       # first retry delay after a failed poll (doubles per failure)
    backoff_max_s: float | None = None  # longest retry delay; None: the poll interval


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "meterlink"
    queue_size: int = 10_000


@dataclass(frozen=True)
class P1Config:
    """A DSMR P1 port: the meter sends, the gateway listens (gateway/p1.py)."""

    port: str
    version: str = "5"                 # 2.2 | 4 | 5: sets the serial line
    meter_id: str | None = None        # None: the equipment identifier in the telegram
    gas_meter_id: str | None = None    # M-Bus channel 1; None: its equipment identifier


@dataclass(frozen=True)
class GatewayConfig:
    id: str
    database: str
    poll_interval_s: int
    headend: str | None
    push_batch: int
    buses: tuple[BusConfig, ...] = field(default_factory=tuple)
    path: str = ""
    mqtt: MqttConfig | None = None
    p1: tuple[P1Config, ...] = ()
    headend_pki_dir: str | None = None      # [headend] pki_dir: enrolled identity -> mutual TLS (gateway/enrol.py)
    headend_server_name: str | None = None  # [headend] server_name: name checked in the head-end certificate
    metrics_listen: str | None = None       # [metrics] listen: HOST:PORT of the Prometheus /metrics endpoint
    serial_every: int = 96                  # [gateway] serial_every: read the serial number every Nth poll
    stall_after_s: float | None = None      # [gateway] stall_after_s: a bus busy this long is stuck (default WatchdogSec)
    config_pull_s: float = 3600.0           # [headend] config_pull_s: pull signed config deltas this often (enrolled)
    payg: tuple = ()                        # [[payg]]: PAYG meters (gateway/payg_sync.py PaygConfig)


def load_config(path: str) -> GatewayConfig:
    root = load_section(path)
    root.check_known({"gateway", "headend", "bus", "mqtt", "p1", "metrics", "payg"})
    gw = root.section("gateway")
    gw.check_known({"id", "database", "poll_interval_s", "push_batch", "serial_every", "stall_after_s"})
    stall_after_s = gw.get("stall_after_s", (int, float), None)
    if stall_after_s is not None and stall_after_s <= 0:
        raise gw.error("stall_after_s", "must be a positive number of seconds")
    serial_every = gw.get("serial_every", int, 96)
    if serial_every <= 0:
        raise gw.error("serial_every", "must be a positive number of polls")
    interval = gw.get("poll_interval_s", int, 900)
    if interval <= 0:
        raise gw.error("poll_interval_s", "must be a positive number of seconds")
    he = root.section("headend", required=False)
    he.check_known({"address", "pki_dir", "server_name", "config_pull_s"})
    config_pull_s = he.get("config_pull_s", (int, float), 3600)
    if config_pull_s <= 0:
        raise he.error("config_pull_s", "must be a positive number of seconds")
    buses = []
    seen: dict[str, str] = {}
    ports: set[str] = set()
    for bus in root.sections("bus"):
        bus.check_known({"port", "baud", "parity", "stopbits", "timeout_s", "meter", "stagger_s",
                         "backoff_base_s", "backoff_max_s"})
        port = bus.get("port", str)
        if port in ports:
            raise bus.error("port", f"port {port!r} is configured as two buses; one port is one bus "
                                    f"(put all its meters under one [[bus]])")
        ports.add(port)
        units_on_bus: set[int] = set()
        parity = bus.get("parity", str, "N").upper()
        if parity not in PARITIES:
            raise bus.error("parity", f"must be one of {', '.join(sorted(PARITIES))}")
        meters = []
        for m in bus.sections("meter"):
            m.check_known({"id", "unit", "profile", "binding_code", "max_power_w"})
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
            if unit in units_on_bus:
                raise m.error("unit", f"unit {unit} is used twice on bus {port}")
            units_on_bus.add(unit)
            max_power = m.get("max_power_w", int, None)
            if max_power is not None and max_power <= 0:
                raise m.error("max_power_w", "must be a positive number of watts")
            seen[mid] = mid
            meters.append(MeterConfig(mid, unit, profile, binding_code=m.get("binding_code", str, None),
                                      max_power_w=max_power))
        timeout = bus.get("timeout_s", (int, float), 1.0)
        sched = {}
        for key in ("stagger_s", "backoff_base_s", "backoff_max_s"):
            value = bus.get(key, (int, float), None)
            if value is not None:
                if value < 0 or (key != "stagger_s" and value == 0):
                    raise bus.error(key, "must be a positive number of seconds")
                if key == "stagger_s" and value >= interval:
                    raise bus.error(key, f"stagger {value} s must be shorter than poll_interval_s ({interval} s)")
                sched[key] = float(value)
        buses.append(BusConfig(port=port, baud=bus.get("baud", int, 9600), parity=parity,
                               stopbits=bus.get("stopbits", int, 1), timeout_s=float(timeout),
                               meters=tuple(meters), **sched))
    mqtt = None
    if "mqtt" in root.data:
        mq = root.section("mqtt")
        mq.check_known({"host", "port", "topic_prefix", "queue_size"})
        prefix = mq.get("topic_prefix", str, "meterlink")
        if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/"):
            raise mq.error("topic_prefix", "must be a non-empty MQTT topic without wildcards or leading '/'")
        mport = mq.get("port", int, 1883)
        if not 1 <= mport <= 65535:
            raise mq.error("port", f"port {mport} outside 1..65535")
        qsize = mq.get("queue_size", int, 10_000)
        if qsize <= 0:
            raise mq.error("queue_size", "must be positive")
        mqtt = MqttConfig(host=mq.get("host", str, "127.0.0.1"), port=mport, topic_prefix=prefix, queue_size=qsize)
    p1 = _load_p1(root, seen, ports)
    metrics_listen = None
    if "metrics" in root.data:
        me = root.section("metrics")
        me.check_known({"listen"})
        metrics_listen = me.get("listen", str)
        host, _, mport = metrics_listen.rpartition(":")
        if not host or not mport.isdigit() or not 0 <= int(mport) <= 65535:
            raise me.error("listen", f"{metrics_listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9108")
    config = GatewayConfig(id=gw.get("id", str), database=gw.get("database", str, "var/gateway.db"),
                           poll_interval_s=interval, headend=he.get("address", str, None),
                           push_batch=gw.get("push_batch", int, 5000), buses=tuple(buses), path=path,
                           mqtt=mqtt, p1=p1, headend_pki_dir=he.get("pki_dir", str, None),
                           headend_server_name=he.get("server_name", str, None), metrics_listen=metrics_listen,
                           config_pull_s=float(config_pull_s), serial_every=serial_every,
                           stall_after_s=None if stall_after_s is None else float(stall_after_s))
    if "payg" in root.data:                 # [[payg]] PAYG meters (docs/payg.md)
        from dataclasses import replace as _replace

        from .payg_sync import load_payg_sections
        config = _replace(config, payg=load_payg_sections(root, set(seen)))
    _check_bus_plans(config, root)
    return config


def _check_bus_plans(config: GatewayConfig, root) -> None:
    """Refuse a bus whose wire time per sweep exceeds the poll interval (readplan.check_bus_plan)."""
    try:
        from meterlink.gateway.readplan import check_bus  # check_bus_plan for a configured bus
    except ImportError:  # provided by the read-plan work (issue 3); skipped until it exists
        return
    for bus in config.buses:
        # the daemon's worst sweep: billing + instantaneous in one merged plan, plus the serial number
        check_bus(bus, config.poll_interval_s, path=config.path, split_priorities=False, with_serial=True)


def _load_p1(root, seen: dict[str, str], ports: set[str]) -> tuple[P1Config, ...]:
    """[[p1]] tables: port, version (2.2, 4, 5), optional meter_id and gas_meter_id."""
    from meterlink.gateway.dsmr import VERSIONS
    out = []
    for p in root.sections("p1"):
        p.check_known({"port", "version", "meter_id", "gas_meter_id"})
        port = p.get("port", str)
        if port in ports or port.startswith("tcp://"):
            raise p.error("port", f"port {port!r} is already a bus or not a serial P1 port")
        ports.add(port)
        version = str(p.get("version", (str, int, float), "5"))
        if version not in VERSIONS:
            raise p.error("version", f"DSMR version {version!r} unknown (use {', '.join(VERSIONS)})")
        ids = {}
        for key in ("meter_id", "gas_meter_id"):
            mid = p.get(key, str, None)
            if mid is not None and mid in seen:
                raise p.error(key, f"meter id {mid!r} is configured twice")
            if mid is not None:
                seen[mid] = mid
            ids[key] = mid
        out.append(P1Config(port=port, version=version, **ids))
    return tuple(out)
