"""A simulated meter: registers driven by a load profile over the injected clock; no I/O.

Energy is integrated exactly (integer millijoules = watts x milliseconds), so the
cumulative registers always rise consistently with the power the meter reports. An open relay
(coil = 0) stops consumption.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from meterlink.clock import Clock, to_ms
from meterlink.gateway.profiles import Profile, Variant, encode

# Household-like daily shape, watts per UTC hour (night base, morning and evening peaks).
DAILY_SHAPE_W = (320, 280, 260, 250, 250, 300, 650, 1400, 1200, 800, 700, 750,
                 900, 800, 700, 750, 1000, 1900, 2600, 2400, 1800, 1300, 800, 450)
MJ_PER_WH = 3_600_000  # millijoules per watt-hour


@dataclass
class Faults:
    """Faults the simulator can inject, per meter (CLI: `meterlink-sim ... --fault-*`).

    Instants (`absent`, `exchange_at`) are on the meter's injected clock, so tests move through a
    disappearance or a meter exchange by advancing a SimClock, never by sleeping.
    """

    silent: bool = False                 # does not answer at all (dead meter -> master times out)
    delay_s: float = 0.0                 # answers late (slow reply), real seconds
    exception_code: int | None = None    # answers every request with this exception (1, 2, 4, ...)
    refuse_addresses: frozenset[int] = frozenset()  # exception 2 for reads touching these
    corrupt_crc: bool = False            # flips a CRC byte in every answer
    corrupt_crc_every: int = 0           # flips a CRC byte in every Nth answer only (0 = never)
    garbage_before: bytes = b""          # junk bytes sent before each answer
    garbage_after: bytes = b""           # junk bytes sent after each answer (between frames)
    absent: tuple[tuple[datetime, datetime], ...] = ()  # silent while start <= now < end
    exchange_at: datetime | None = None  # from this instant the meter is another one:
    exchange_serial: int = 0             #   this serial number,
    exchange_import_wh: int = 0          #   registers starting here

    def present(self, now: datetime) -> bool:
        return not self.silent and not any(start <= now < end for start, end in self.absent)


@dataclass
class MeterModel:
    profile: Profile
    clock: Clock
    unit: int = 1
    seed: int = 1
    scale_pct: int = 100                 # this household's consumption relative to the shape
    import_mj: int = 0                   # cumulative import energy, millijoules (exact)
    export_mj: int = 0
    relay_closed: bool = True
    serial_number: int = 0
    faults: Faults = field(default_factory=Faults)
    variant: Variant | None = None       # a model variant from the profile (missing registers)
    answers: int = 0                     # answers sent (drives `corrupt_crc_every`)
    exchanged: bool = False
    _last_ms: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def starting_at(cls, profile: Profile, clock: Clock, unit: int = 1, seed: int = 1,
                    import_wh: int = 1_000_000, **kw) -> "MeterModel":
        m = cls(profile=profile, clock=clock, unit=unit, seed=seed, import_mj=import_wh * MJ_PER_WH,
                serial_number=10_000_000 + seed, **kw)
        m._last_ms = to_ms(clock.now())
        return m

    def power_w(self, at: datetime) -> int:
        """Active import power at an instant: shape x household scale x minute-level noise."""
        if not self.relay_closed:
            return 0
        minute = int(to_ms(at) // 60_000)
        h = hashlib.blake2b(f"{self.seed}:{minute}".encode(), digest_size=2).digest()
        noise_pct = 85 + int.from_bytes(h, "big") % 31          # 85..115 %
        return DAILY_SHAPE_W[at.hour] * self.scale_pct * noise_pct // 10_000

    def advance(self) -> None:
        """Integrate power up to the clock's now (piecewise constant per minute; path-independent)."""
        now_ms = to_ms(self.clock.now())
        with self._lock:
            last = self._last_ms if self._last_ms is not None else now_ms
            while last < now_ms:
                step_end = min(now_ms, (last // 60_000 + 1) * 60_000)
                at = datetime(1970, 1, 1, tzinfo=self.clock.now().tzinfo) + timedelta(milliseconds=last)
                self.import_mj += self.power_w(at) * (step_end - last)
                last = step_end
            self._last_ms = now_ms

    @property
    def import_wh(self) -> int:
        """The import register now (integrates up to the clock first)."""
        self.advance()
        return self.import_mj // MJ_PER_WH

    @property
    def export_wh(self) -> int:
        self.advance()
        return self.export_mj // MJ_PER_WH

    def _maybe_exchange(self, now: datetime) -> None:
        f = self.faults
        if f.exchange_at is not None and not self.exchanged and now >= f.exchange_at:
            self.advance()
            with self._lock:
                self.exchanged = True
                self.serial_number = f.exchange_serial or self.serial_number + 1
                self.import_mj = f.exchange_import_wh * MJ_PER_WH
                self.export_mj = 0

    def present(self) -> bool:
        """Whether the meter is on the bus now (not dead, not inside an `absent` window)."""
        return self.faults.present(self.clock.now())

    def values(self) -> dict[str, int]:
        """Current value of every quantity the simulator knows, in stored units (OBIS -> int)."""
        self._maybe_exchange(self.clock.now())
        self.advance()
        p = self.power_w(self.clock.now())
        phase_w = p // 3
        phase_ma = p * 1000 // (3 * 230)
        return {
            "32.7.0": 230_100, "52.7.0": 229_800, "72.7.0": 231_200,
            "31.7.0": phase_ma, "51.7.0": phase_ma, "71.7.0": phase_ma,
            "1.7.0": p, "21.7.0": p - 2 * phase_w, "41.7.0": phase_w, "61.7.0": phase_w,
            "14.7.0": 50_000, "1.8.0": self.import_wh, "2.8.0": self.export_wh,
            "0.0.96.1.0": self.serial_number,
        }

    def registers(self, function: int) -> dict[int, int]:
        """address -> word for every register this meter serves under `function`.

        Values are encoded with the profile (integer registers round half-even to their step);
        quantities the variant lacks show the profile's "no value" marker.
        """
        vals = self.values()
        missing = set(self.variant.no_value) if self.variant else set()
        out: dict[int, int] = {}
        specs = list(self.profile.quantities)
        if self.profile.serial is not None:
            specs.append(self.profile.serial)
        for q in specs:
            if q.function != function or q.obis not in vals:
                continue
            if q.obis in missing and self.profile.no_value is not None:
                words = [self.profile.no_value] * q.count
            else:
                words = encode(q, vals[q.obis])
            for i, w in enumerate(words):
                out[q.address + i] = w
        return out

    def refuses(self, address: int, count: int) -> bool:
        """Exception 2 for this read: a register of the variant or the fault list is touched."""
        bad = self.faults.refuse_addresses | (self.variant.refuses if self.variant else frozenset())
        return any(a in bad for a in range(address, address + count))

    def set_relay(self, closed: bool) -> None:
        self.advance()  # energy up to now was consumed with the old relay state
        self.relay_closed = closed


def add_fault_arguments(p) -> None:
    """The simulator CLI's fault-injection flags (argparse); `apply_fault_arguments` applies them."""
    g = p.add_argument_group("fault injection (applies to --fault-unit, default every unit)")
    g.add_argument("--variant", help="model variant from the profile's [[variant]] tables (e.g. import-only)")
    g.add_argument("--fault-unit", type=int, action="append", help="unit the faults apply to (repeatable)")
    g.add_argument("--fault-silent", action="store_true", help="never answer (timeouts)")
    g.add_argument("--fault-delay", type=float, default=0.0, metavar="S", help="answer S seconds late")
    g.add_argument("--fault-exception", type=int, metavar="CODE", help="answer every request with this exception code")
    g.add_argument("--fault-refuse", type=lambda s: int(s, 0), action="append", default=[], metavar="ADDR",
                   help="exception 2 for reads touching this register (repeatable, 0x.. allowed)")
    g.add_argument("--fault-corrupt-crc-every", type=int, default=0, metavar="N", help="corrupt the CRC of every Nth answer")
    g.add_argument("--fault-garbage", default="", metavar="HEX", help="send these bytes before and after each answer")
    g.add_argument("--fault-absent", action="append", default=[], metavar="FROM/UNTIL",
                   help="silent between two ISO-8601 instants of the meter's clock (repeatable)")
    g.add_argument("--fault-exchange-at", metavar="ISO", help="from this instant the meter is another one (new serial, register restarts)")
    g.add_argument("--fault-exchange-serial", type=int, default=0, help="serial number of the exchanged meter")


def apply_fault_arguments(meters: dict[int, "MeterModel"], args) -> None:
    """Apply the parsed `add_fault_arguments` flags to the simulated meters."""
    from meterlink.clock import parse_instant

    absent = []
    for span in getattr(args, "fault_absent", []) or []:
        start, _, end = span.partition("/")
        absent.append((parse_instant(start), parse_instant(end)))
    faults = Faults(
        silent=args.fault_silent, delay_s=args.fault_delay, exception_code=args.fault_exception,
        refuse_addresses=frozenset(args.fault_refuse), corrupt_crc_every=args.fault_corrupt_crc_every,
        garbage_before=bytes.fromhex(args.fault_garbage), garbage_after=bytes.fromhex(args.fault_garbage),
        absent=tuple(absent),
        exchange_at=parse_instant(args.fault_exchange_at) if args.fault_exchange_at else None,
        exchange_serial=args.fault_exchange_serial)
    targets = set(args.fault_unit or meters)
    for unit, meter in meters.items():
        if args.variant:
            meter.variant = meter.profile.variant(args.variant)
        if unit in targets:
            meter.faults = faults
