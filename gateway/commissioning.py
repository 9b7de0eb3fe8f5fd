"""Commissioning for field engineers: scan a bus, identify meters, provision them, diagnose a bus.

The deciding parts are pure (`parse_units`, `plausible`, `rank_profiles`, `add_meter_to_config_text`,
`summarise`); `scan`, `identify` and `diagnose` drive a Modbus master they are given and report
progress through a callback, so the CLI can draw a progress bar and tests can call them directly.
Nothing here ever writes to a meter.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import termios
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from meterlink import modbus
from meterlink.errors import ConfigError, DeviceError, ProtocolError, ValidationError

from .profiles import Profile, known_profiles, load_profile
from .readplan import plan_reads

BAUD_RATES = (9600, 19200, 38400, 2400, 4800, 1200, 57600, 115200)   # most common first
PARITIES = ("N", "E", "O")
DEFAULT_SCAN_TIMEOUT_S = 0.2   # a meter answers in < 100 ms; 247 silent units then cost ~50 s


def parse_units(text: str) -> list[int]:
    """'1-247', '1,2,5-7' -> sorted unit ids; each in 1..247."""
    units: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValidationError(f"bad unit range {part!r}: expected N or N-M (e.g. 1-247)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 1 <= lo <= hi <= 247:
            raise ValidationError(f"unit range {part!r} outside 1..247")
        units.update(range(lo, hi + 1))
    if not units:
        raise ValidationError("no units to scan")
    return sorted(units)


# -- identification (pure) ----------------------------------------------------------------------

def plausible(unit: str, value: int, profile: Profile) -> bool:
    """Could a real meter of this profile show `value` (stored unit)? Wrong models decode garbage."""
    if unit == "mV":
        return value == 0 or 80_000 <= value <= 500_000
    if unit == "mHz":
        return 45_000 <= value <= 65_000
    if unit == "mA":
        return abs(value) <= 1_000_000
    if unit in ("W", "var"):
        limit = profile.max_power_w * 3 // 2 if profile.max_power_w else 10_000_000
        return abs(value) <= limit
    if unit in ("Wh", "varh"):
        return 0 <= value < 10 ** 12
    if unit == "permille":
        return -1000 <= value <= 1000
    return True


@dataclass(frozen=True)
class ProfileFit:
    profile: str
    ok: bool                 # every quantity read and plausible
    nonzero: int             # plausible non-zero values (more = more of the map is really there)
    zeros: int               # quantities that read as 0 (a smaller model's gaps read as zeros)
    reason: str = ""


def fit_profile(profile: Profile, values: dict[str, int], refused: int) -> ProfileFit:
    """How well a meter's answers under `profile` fit it (pure)."""
    units = {q.obis: q.unit for q in profile.quantities}
    bad = [o for o, v in values.items() if o in units and not plausible(units[o], v, profile)]
    billing = [q.obis for q in profile.quantities if q.billing]
    missing = [o for o in billing if o not in values]
    if bad:
        return ProfileFit(profile.name, False, 0, 0, f"implausible {', '.join(sorted(bad))}")
    if missing:
        return ProfileFit(profile.name, False, 0, 0, f"no {', '.join(missing)}")
    if not values:
        return ProfileFit(profile.name, False, 0, 0, "nothing readable")
    nonzero = sum(1 for v in values.values() if v != 0)
    return ProfileFit(profile.name, True, nonzero - refused, len(values) - nonzero)


def rank_profiles(fits: Iterable[ProfileFit]) -> list[ProfileFit]:
    """Fitting profiles, best first: most plausible non-zero values, then fewest zeros, then name."""
    return sorted((f for f in fits if f.ok), key=lambda f: (-f.nonzero, f.zeros, f.profile))


# -- the bus side ---------------------------------------------------------------------------------

@dataclass
class Found:
    unit: int
    baud: int | None
    parity: str | None
    profile: str | None                # best fitting profile, None if no profile fits
    also: list[str] = field(default_factory=list)   # other profiles that fit as well (ambiguous)
    serial: int | None = None
    values: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict:
        return {"unit": self.unit, "baud": self.baud, "parity": self.parity, "profile": self.profile,
                "also": self.also, "serial": self.serial, "values": self.values, "note": self.note}


def probe(master, unit: int, request: modbus.Request) -> str | None:
    """One short request: None if the unit is silent, else 'answer', 'exception' or 'garbled'."""
    try:
        master.execute(modbus.Request(unit, request.function, request.address, request.count))
    except modbus.ModbusException:
        return "exception"
    except DeviceError:
        return None
    except ProtocolError:
        return "garbled"
    return "answer"


def identify(master, unit: int, profiles: list[Profile], clock) -> Found:
    """Read `unit` under every profile and keep the best plausible fit."""
    from .poller import default_max_gap, read_meter

    fits, reads = [], {}
    for p in profiles:
        try:
            result = read_meter(master, unit, p, f"unit-{unit}", clock,
                                blocks=plan_reads(p, max_gap=default_max_gap(master, p)), with_serial=True)
        except (DeviceError, ProtocolError) as exc:
            fits.append(ProfileFit(p.name, False, 0, 0, str(exc)))
            continue
        values = {r.obis: r.value for r in result.readings}
        reads[p.name] = (values, result.serial)
        fits.append(fit_profile(p, values, len(result.refused)))
    ranked = rank_profiles(fits)
    baud, parity = getattr(master, "baud", None), getattr(master, "parity", None)
    if not ranked:
        why = "; ".join(f"{f.profile}: {f.reason}" for f in fits)
        return Found(unit, baud, parity, None, note=f"answers, but no profile fits ({why})")
    best = ranked[0]
    also = [f.profile for f in ranked[1:] if f.nonzero == best.nonzero and f.zeros == best.zeros]
    values, serial = reads[best.profile]
    return Found(unit, baud, parity, best.profile, also, serial, values,
                 note="ambiguous: " + ", ".join(also) + " fit equally" if also else "")


def probe_request(profiles: list[Profile]) -> modbus.Request:
    """The request used to ask 'is anybody there': the first profile's first billing register."""
    p = profiles[0]
    q = next((q for q in p.quantities if q.billing), p.quantities[0])
    return modbus.Request(1, q.function, q.address, q.count)


def scan(open_bus: Callable[[int, str], object], units: list[int], settings: list[tuple[int, str]],
         profiles: list[Profile], clock, *, progress: Callable[[str], None] | None = None,
         identify_timeout_s: float = 1.0) -> list[Found]:
    """Probe `units` under each (baud, parity) in turn; stop at the first setting where meters answer.

    `open_bus(baud, parity)` returns a master with a short timeout (the caller chooses it): silent
    units cost one such timeout each. Units that answered are then identified with at least
    `identify_timeout_s`, so a busy meter is not mistaken for another model. `progress(text)` is
    called after each probe.
    """
    req = probe_request(profiles)
    for baud, parity in settings:
        try:
            master = open_bus(baud, parity)
        except Exception as exc:  # noqa: BLE001 - e.g. termios refuses a parity the port cannot do
            if progress:
                for _ in units:
                    progress(f"{baud} 8{parity}1: port refuses this setting ({exc})")
            continue
        try:
            present = []
            for u in units:
                try:
                    state = probe(master, u, req)
                except (OSError, termios.error) as exc:  # the port cannot do this speed/parity
                    if progress:
                        progress(f"{baud} 8{parity}1: port refuses this setting ({exc})")
                    present = []
                    break
                if progress:
                    progress(f"{baud} 8{parity}1 unit {u}: {state or 'silent'}")
                if state is not None:
                    present.append((u, state))
            if not present or all(s == "garbled" for _, s in present):
                continue   # nobody, or only line noise: wrong speed/parity
            found = []
            if hasattr(master, "timeout"):
                master.timeout = max(master.timeout, identify_timeout_s)
            for u, state in present:
                f = identify(master, u, profiles, clock)
                if state == "garbled" and f.profile is None:
                    f.note = "garbled answers (CRC errors): another device or the wrong line settings"
                found.append(f)
            return found
        finally:
            master.close()
    return []


def settings_to_try(baud: str | int, parity: str) -> list[tuple[int, str]]:
    bauds = list(BAUD_RATES) if str(baud) == "auto" else [int(baud)]
    parities = list(PARITIES) if parity == "auto" else [parity.upper()]
    return [(b, p) for b in bauds for p in parities]


def all_profiles(names: list[str] | None = None) -> list[Profile]:
    return [load_profile(n) for n in (names or known_profiles())]


# -- provisioning: add a meter to gateway.toml, keeping the file as written ---------------------------

_BUS_HEADER = re.compile(r"^\s*\[\[\s*bus\s*\]\]\s*(#.*)?$")
_TABLE_HEADER = re.compile(r"^\s*\[")
_METER_HEADER = re.compile(r"^\s*\[\[\s*bus\.meter\s*\]\]\s*(#.*)?$")


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def add_meter_to_config_text(text: str, buses: list[dict], *, port: str, unit: int, profile: str,
                             meter_id: str, binding_code: str | None = None, baud: int = 9600,
                             parity: str = "N") -> str:
    """Return `text` with a `[[bus.meter]]` appended to the bus on `port` (a new `[[bus]]` if none).

    `buses` is the parsed `bus` array of `text`. Comments and layout are kept; nothing is reordered.
    """
    lines = ["[[bus.meter]]", f"id = {_toml_str(meter_id)}", f"unit = {unit}", f"profile = {_toml_str(profile)}"]
    if binding_code:
        lines.append(f"binding_code = {_toml_str(binding_code)}")
    block = "\n".join(lines) + "\n"
    index = next((i for i, b in enumerate(buses) if b.get("port") == port), None)
    src = text.splitlines(keepends=True)
    if index is None:
        head = ["[[bus]]", f"port = {_toml_str(port)}"]
        if not port.startswith("tcp://"):
            head += [f"baud = {baud}", f"parity = {_toml_str(parity)}"]
        sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + "\n".join(head) + "\n\n" + block
    headers = [i for i, l in enumerate(src) if _BUS_HEADER.match(l)]
    start = headers[index]
    end = len(src)
    for i in range(start + 1, len(src)):
        if _TABLE_HEADER.match(src[i]) and not _METER_HEADER.match(src[i]):
            end = i
            break
    # insert after the bus's last non-blank line, keeping the blank lines that separate tables
    insert_at = end
    while insert_at > start + 1 and not src[insert_at - 1].strip():
        insert_at -= 1
    before = src[:insert_at]
    if before and not before[-1].endswith("\n"):
        before[-1] += "\n"
    return "".join(before) + "\n" + block + "".join(src[insert_at:])


def provision(config_path: str, *, port: str, unit: int, profile: str, meter_id: str,
              binding_code: str | None = None, baud: int = 9600, parity: str = "N"):
    """Add a meter to `config_path` in place; the result is validated before it replaces the file."""
    import tomllib

    from .config import load_config

    path = Path(config_path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from None
    buses = data.get("bus", [])
    for b in buses:
        for m in b.get("meter", []):
            if m.get("id") == meter_id:
                raise ValidationError(f"{path}: meter id {meter_id!r} is already configured "
                                      f"(unit {m.get('unit')} on {b.get('port')})")
            if b.get("port") == port and m.get("unit") == unit:
                raise ValidationError(f"{path}: unit {unit} on {port} is already meter {m.get('id')!r}")
    load_profile(profile)   # unknown profile: a clear error before touching anything
    new_text = add_meter_to_config_text(text, buses, port=port, unit=unit, profile=profile, meter_id=meter_id,
                                        binding_code=binding_code, baud=baud, parity=parity)
    fd, tmp = tempfile.mkstemp(prefix=".provision-", suffix=".toml", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_text)
        try:
            config = load_config(tmp)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(tmp, str(path)) + " (configuration left unchanged)") from None
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return config


# -- diagnosis ---------------------------------------------------------------------------------------

@dataclass
class UnitDiagnosis:
    unit: int
    requests: int = 0
    ok: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exceptions: int = 0
    other_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_error: str = ""

    @property
    def error_rate(self) -> float:
        return (self.requests - self.ok) / self.requests if self.requests else 0.0

    def latency(self) -> dict[str, float | None]:
        xs = sorted(self.latencies_ms)
        if not xs:
            return {"min": None, "median": None, "p95": None, "max": None}
        return {"min": xs[0], "median": xs[len(xs) // 2], "p95": xs[min(len(xs) - 1, (95 * len(xs)) // 100)],
                "max": xs[-1]}

    def as_dict(self) -> dict:
        return {"unit": self.unit, "requests": self.requests, "ok": self.ok, "timeouts": self.timeouts,
                "crc_errors": self.crc_errors, "exceptions": self.exceptions, "other_errors": self.other_errors,
                "error_rate": round(self.error_rate, 4),
                "latency_ms": {k: (round(v, 2) if v is not None else None) for k, v in self.latency().items()},
                "last_error": self.last_error}


def classify(exc: Exception) -> str:
    if isinstance(exc, modbus.ModbusException):
        return "exceptions"
    if isinstance(exc, DeviceError):
        return "timeouts"
    if isinstance(exc, ProtocolError) and "CRC" in str(exc):
        return "crc_errors"
    return "other_errors"


def diagnose(master, units: list[int], profile: Profile, clock, *, rounds: int = 10,
             progress: Callable[[str], None] | None = None) -> list[UnitDiagnosis]:
    """Read every block of `profile` from each unit `rounds` times; count outcomes, time answers."""
    from .poller import default_max_gap

    blocks = plan_reads(profile, max_gap=default_max_gap(master, profile))
    out = []
    for u in units:
        d = UnitDiagnosis(u)
        for _ in range(rounds):
            for b in blocks:
                d.requests += 1
                t0 = clock.monotonic()
                try:
                    master.execute(modbus.read_request(u, b.function, b.address, b.count))
                except (DeviceError, ProtocolError) as exc:
                    kind = classify(exc)
                    setattr(d, kind, getattr(d, kind) + 1)
                    d.last_error = str(exc)
                    continue
                d.ok += 1
                d.latencies_ms.append((clock.monotonic() - t0) * 1000)
            if progress:
                progress(f"unit {u}")
        out.append(d)
    return out
