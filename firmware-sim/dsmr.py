"""A simulated DSMR P1 port: telegrams (2.2, 4, 5) with a correct CRC from the clock-driven meter.

`P1Meter` turns the `MeterModel`'s registers into a telegram snapshot (tariff 1/2 split by Dutch
local time, gas on its own capture grid) and `format_telegram` writes it the way each DSMR version
does; both are pure given the clock. `P1PtyServer` is the wire: it writes the telegrams on the
master side of a pty, with the faults asked for (bad CRC every Nth, truncation, garbage between).
"""

from __future__ import annotations

import errno
import os
import select
import threading
import tty
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from meterlink.clock import Clock, to_ms
from meterlink.gateway.dsmr import crc16_arc, version_settings

from .meter import MeterModel

UTC = timezone.utc
NL = ZoneInfo("Europe/Amsterdam")
GAS_GRID_MIN = {"2.2": 60, "4": 60, "5": 5}     # gas capture period per version, minutes


@dataclass(frozen=True)
class Snapshot:
    """What the meter says in one telegram, in exact base units."""

    at: datetime
    equipment_id: str
    tariff: int                     # 1 = low (night, weekend), 2 = normal
    import_wh: tuple[int, int]      # tariff 1, tariff 2
    export_wh: tuple[int, int]
    power_w: int
    export_power_w: int
    voltage_mv: tuple[int, int, int]
    current_ma: tuple[int, int, int]
    gas_id: str
    gas_dm3: int
    gas_at: datetime


def dutch_tariff(at: datetime) -> int:
    """Tariff indicator of a Dutch meter: 1 (low) from 23:00 to 07:00 local and all weekend, else 2."""
    local = at.astimezone(NL)
    return 1 if local.weekday() >= 5 or local.hour >= 23 or local.hour < 7 else 2


@dataclass
class P1Meter:
    """Tariff registers and gas on top of a `MeterModel` (which integrates the electricity)."""

    meter: MeterModel
    version: str = "5"
    gas_dm3_per_h: int = 150
    gas_start_dm3: int = 1_234_567
    _t1: int = 0
    _t2: int = 0
    _last_import: int = 0
    _start: datetime | None = None

    def __post_init__(self) -> None:
        self.version = _key(self.version)
        total = self.meter.import_wh
        self._t1, self._t2, self._last_import = total * 2 // 5, total - total * 2 // 5, total
        self._start = self.meter.clock.now()

    @property
    def equipment_id(self) -> str:
        return f"MLS{self.meter.serial_number:013d}"

    def snapshot(self) -> Snapshot:
        now = self.meter.clock.now()
        values = self.meter.values()
        total = values.get("1.8.0", self.meter.import_wh)
        tariff = dutch_tariff(now)
        delta, self._last_import = total - self._last_import, total
        if tariff == 1:
            self._t1 += delta
        else:
            self._t2 += delta
        power = values.get("1.7.0", self.meter.power_w(now))
        grid = timedelta(minutes=GAS_GRID_MIN[self.version])
        gas_at = datetime(1970, 1, 1, tzinfo=UTC) + (now - datetime(1970, 1, 1, tzinfo=UTC)) // grid * grid
        elapsed_ms = max(0, to_ms(gas_at) - to_ms(self._start))
        return Snapshot(
            at=now, equipment_id=self.equipment_id, tariff=tariff, import_wh=(self._t1, self._t2),
            export_wh=(0, values.get("2.8.0", 0)), power_w=power, export_power_w=0,
            voltage_mv=tuple(values.get(k, 230_000) for k in ("32.7.0", "52.7.0", "72.7.0")),  # type: ignore[arg-type]
            current_ma=tuple(values.get(k, 0) for k in ("31.7.0", "51.7.0", "71.7.0")),  # type: ignore[arg-type]
            gas_id=f"MLG{self.meter.serial_number:013d}",
            gas_dm3=self.gas_start_dm3 + elapsed_ms * self.gas_dm3_per_h // 3_600_000, gas_at=gas_at)


def _key(version: str) -> str:
    version_settings(version)   # refuses unknown versions
    return {"2": "2.2", "3": "2.2", "4.0": "4", "4.2": "4", "5.0": "5"}.get(str(version), str(version))


def _fixed(value: int, factor: int, decimals: int, width: int) -> str:
    """Exact base-unit integer -> fixed-point text (truncated to `decimals`), zero-padded to `width`."""
    unit_part, rest = divmod(value, factor)
    frac = str(rest).rjust(len(str(factor)) - 1, "0")[:decimals]
    return (f"{unit_part}.{frac}" if decimals else str(unit_part)).rjust(width, "0")


def _ts(at: datetime, flag: bool = True) -> str:
    local = at.astimezone(NL)
    return local.strftime("%y%m%d%H%M%S") + (("S" if local.dst() else "W") if flag else "")


def _hex(text: str) -> str:
    return text.encode("ascii").hex().upper()


def format_telegram(s: Snapshot, version: str = "5") -> bytes:
    """The telegram a DSMR `version` meter sends for `s`, with CRC-16/ARC for 4 and 5."""
    v = _key(version)
    kwh = lambda wh: _fixed(wh, 1000, 3, 10 if v != "2.2" else 9)   # noqa: E731
    kw = lambda w: _fixed(w, 1000, 3, 6) if v != "2.2" else _fixed(w, 1000, 2, 7)   # noqa: E731
    lines = [f"/MLS5\\2MeterlinkSim-{v}", ""]
    if v != "2.2":
        lines += [f"1-3:0.2.8({'42' if v == '4' else '50'})", f"0-0:1.0.0({_ts(s.at)})",
                  f"0-0:96.1.1({_hex(s.equipment_id)})"]
    else:
        lines += [f"0-0:96.1.1({s.equipment_id})"]
    lines += [f"1-0:1.8.1({kwh(s.import_wh[0])}*kWh)", f"1-0:1.8.2({kwh(s.import_wh[1])}*kWh)",
              f"1-0:2.8.1({kwh(s.export_wh[0])}*kWh)", f"1-0:2.8.2({kwh(s.export_wh[1])}*kWh)",
              f"0-0:96.14.0({s.tariff:04d})",
              f"1-0:1.7.0({kw(s.power_w)}*kW)", f"1-0:2.7.0({kw(s.export_power_w)}*kW)"]
    if v == "2.2":
        lines += ["0-0:17.0.0(0999.00*kW)", "0-0:96.3.10(1)", "0-0:96.13.1()", "0-0:96.13.0()",
                  "0-1:24.1.0(3)", f"0-1:96.1.0({s.gas_id})",
                  f"0-1:24.3.0({_ts(s.gas_at, flag=False)})(00)(60)(1)(0-1:24.2.1)(m3)",
                  f"({_fixed(s.gas_dm3, 1000, 3, 9)})", "0-1:24.4.0(1)"]
    else:
        lines += ["0-0:96.7.21(00003)", "0-0:96.7.9(00001)", "1-0:99.97.0(0)(0-0:96.7.19)",
                  "1-0:32.32.0(00000)", "1-0:52.32.0(00000)", "1-0:72.32.0(00000)", "0-0:96.13.0()"]
        if v == "5":
            lines += [f"1-0:{l}.7.0({_fixed(mv, 1000, 1, 6)}*V)" for l, mv in zip((32, 52, 72), s.voltage_mv)]
        lines += [f"1-0:{l}.7.0({_fixed(ma, 1000, 0, 3)}*A)" for l, ma in zip((31, 51, 71), s.current_ma)]
        per_phase = [s.power_w // 3] * 2 + [s.power_w - 2 * (s.power_w // 3)]
        lines += [f"1-0:{l}.7.0({kw(w)}*kW)" for l, w in zip((21, 41, 61), per_phase)]
        lines += [f"1-0:{l}.7.0({kw(0)}*kW)" for l in (22, 42, 62)]
        lines += ["0-1:24.1.0(003)", f"0-1:96.1.0({_hex(s.gas_id)})",
                  f"0-1:24.2.1({_ts(s.gas_at)})({_fixed(s.gas_dm3, 1000, 3, 9)}*m3)"]
    body = ("\r\n".join(lines) + "\r\n!").encode("ascii")
    if v == "2.2":
        return body + b"\r\n"
    return body + f"{crc16_arc(body):04X}\r\n".encode("ascii")


# ---------------------------------------------------------------- faults and the wire

@dataclass
class P1Faults:
    bad_crc_every: int = 0          # every Nth telegram has one digit changed after its CRC was computed
    truncate_every: int = 0         # every Nth telegram stops half-way (the line dropped out)
    garbage: bytes = b""            # junk sent between telegrams


def apply_faults(telegram: bytes, n: int, faults: P1Faults) -> bytes:
    """The bytes actually sent as the `n`th telegram (1-based)."""
    if faults.truncate_every and n % faults.truncate_every == 0:
        return faults.garbage + telegram[: len(telegram) // 2]
    if faults.bad_crc_every and n % faults.bad_crc_every == 0:
        i = telegram.index(b"1-0:1.8.1(") + len(b"1-0:1.8.1(")
        digit = telegram[i:i + 1]
        telegram = telegram[:i] + (b"1" if digit != b"1" else b"2") + telegram[i + 1:]
    return faults.garbage + telegram


class P1PtyServer:
    """Writes a telegram every `interval_s` (of the clock's time) on a pty; clients open `client_path`."""

    def __init__(self, meter: P1Meter, *, interval_s: float = 1.0, faults: P1Faults | None = None) -> None:
        self.meter, self.interval_s, self.faults = meter, interval_s, faults or P1Faults()
        self._master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(self._master, False)
        self.client_path = os.ttyname(slave)
        self._slave = slave                     # kept open so the pty survives clients closing it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-p1", daemon=True)
        self.sent = 0
        self.dropped_bytes = 0                  # nobody was reading: a meter does not wait

    def start(self) -> "P1PtyServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def emit_once(self) -> bytes:
        """Send one telegram now (with faults); returns the bytes written to the line."""
        self.sent += 1
        data = apply_faults(format_telegram(self.meter.snapshot(), self.meter.version), self.sent, self.faults)
        self._write(data)
        return data

    def _write(self, data: bytes, timeout_s: float = 0.5) -> None:
        view = memoryview(data)
        while view and not self._stop.is_set():
            _, writable, _ = select.select([], [self._master], [], timeout_s)
            if not writable:
                break
            try:
                view = view[os.write(self._master, view):]
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                return
        self.dropped_bytes += len(view)

    def _run(self) -> None:
        clock: Clock = self.meter.meter.clock
        step = timedelta(seconds=self.interval_s)
        due = clock.now()
        while not self._stop.is_set():
            self.emit_once()
            due += step
            # A simulated clock jumps; wait a little real time too so a SimClock does not flood the line.
            self._stop.wait(0.02)
            clock.sleep_until(due)


# ---------------------------------------------------------------- command line (meterlink-sim dsmr)

EPILOG = "example: meterlink-sim dsmr --version 5 --interval-s 1 --bad-crc-every 10 --garbage-bytes 16"


def add_subcommand(sub) -> None:
    p = sub.add_parser("dsmr", help="emit DSMR P1 telegrams on a pseudo-terminal; prints the client path first",
                       epilog=EPILOG)
    p.add_argument("--version", default="5", choices=["2.2", "4", "5"], help="DSMR version (default 5)")
    p.add_argument("--interval-s", type=float, default=None,
                   help="seconds of clock time between telegrams (default: 1 for DSMR 5, 10 before)")
    p.add_argument("--seed", type=int, default=1, help="load-profile seed")
    p.add_argument("--import-wh", type=int, default=1_000_000, help="initial import (tariff 1 + 2), Wh")
    p.add_argument("--bad-crc-every", type=int, default=0, metavar="N", help="every Nth telegram fails its CRC")
    p.add_argument("--truncate-every", type=int, default=0, metavar="N", help="every Nth telegram is cut in half")
    p.add_argument("--garbage-bytes", type=int, default=0, metavar="N", help="N junk bytes before each telegram")
    p.add_argument("--clock", default="system",
                   help="time source: system | sim:ISO | scaled:ISO,SPEED[,ANCHOR_UNIX] (default system)")


def garbage(n: int) -> bytes:
    """n junk bytes of line noise; never '/' (a telegram start), so the test of what is lost stays exact."""
    return bytes((0x80 + 37 * i) % 256 for i in range(n)).replace(b"/", b"\x00")


def serve(args) -> int:
    """`meterlink-sim dsmr`: print the client path, then emit telegrams until SIGTERM/Ctrl-C."""
    import sys

    from meterlink.clock import clock_from_spec
    from meterlink.gateway.profiles import load_profile
    from meterlink.stopping import stop_on_signals

    stop = stop_on_signals()

    try:
        clock = clock_from_spec(args.clock)
    except ValueError as exc:
        print(f"meterlink-sim: error: {exc}", file=sys.stderr)
        return 2
    meter = MeterModel.starting_at(load_profile("eastron_sdm630"), clock, seed=args.seed, import_wh=args.import_wh)
    interval = args.interval_s if args.interval_s is not None else (1.0 if args.version == "5" else 10.0)
    server = P1PtyServer(P1Meter(meter, version=args.version), interval_s=interval,
                         faults=P1Faults(args.bad_crc_every, args.truncate_every, garbage(args.garbage_bytes)))
    print(server.client_path, flush=True)
    print(f"emitting DSMR {args.version} telegrams every {interval:g} s; Ctrl-C stops", file=sys.stderr, flush=True)
    server.start()
    stop.wait()
    server.stop()
    return 0
