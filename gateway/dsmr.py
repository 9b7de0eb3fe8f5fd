"""DSMR P1 telegrams: framing, CRC-16/ARC and the OBIS table that maps them to readings; never does I/O.

The telegram specification is data: `OBJECTS` maps each OBIS reference a P1 port sends to the
OBIS code we store and the parser of its value (after dsmr_parser). The code around it only
splits a telegram into objects, checks the CRC and looks each object up. Every number becomes
an exact integer in the reading's base unit via `Decimal` (kWh with 3 decimals -> Wh); a value
with more precision than the base unit holds is an error, never rounded.

A telegram is parsed completely before any reading is made from it: a bad CRC, a truncated or a
malformed telegram raises `ProtocolError` naming the problem, and yields no reading at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Callable, NamedTuple
from zoneinfo import ZoneInfo

from meterlink.errors import ProtocolError
from meterlink.modbus import crc16
from meterlink.readings import Reading

UTC = timezone.utc
# DSMR 2.2 timestamps carry no S/W flag: they are Dutch local time.
DSMR22_LOCAL_TIME = ZoneInfo("Europe/Amsterdam")
# S = summer time (CEST, UTC+2), W = winter time (CET, UTC+1): DSMR 4/5 §6.4 "TST".
DST_FLAG_OFFSET = {"S": timedelta(hours=2), "W": timedelta(hours=1)}


class TelegramError(ProtocolError):
    """A telegram refused whole; `kind` is 'crc', 'truncated' or 'malformed' (for the counters)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SerialSettings(NamedTuple):
    baud: int
    bytesize: int
    parity: str
    stopbits: int
    crc: bool          # the telegram ends in "!" + 4 hex digits of CRC-16/ARC


# P1 port settings per DSMR version (2.2: no CRC; 3 is the same as 2.2 on the wire).
VERSIONS: dict[str, SerialSettings] = {
    "2.2": SerialSettings(9600, 7, "E", 1, crc=False),
    "4": SerialSettings(115200, 7, "E", 1, crc=True),
    "5": SerialSettings(115200, 8, "N", 1, crc=True),
}


def version_settings(version: str) -> SerialSettings:
    key = {"2": "2.2", "3": "2.2", "4.0": "4", "4.2": "4", "5.0": "5"}.get(str(version), str(version))
    if key not in VERSIONS:
        raise ValueError(f"unknown DSMR version {version!r} (use {', '.join(VERSIONS)})")
    return VERSIONS[key]


# ---------------------------------------------------------------- CRC-16/ARC

def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (poly 0x8005 reflected = 0xA001, init 0, no final xor), as DSMR 4/5 use it:
    the Modbus CRC's table with another initial value."""
    return crc16(data, init=0)


# ---------------------------------------------------------------- value parsers
# Each takes the raw strings between the parentheses of one object and returns its value.

# Unit on the wire -> (base unit we store, factor).
WIRE_UNITS = {
    "kWh": ("Wh", 1000), "Wh": ("Wh", 1), "kW": ("W", 1000), "W": ("W", 1),
    "V": ("mV", 1000), "A": ("mA", 1000), "m3": ("dm3", 1000), "dm3": ("dm3", 1),
    "kvarh": ("varh", 1000), "varh": ("varh", 1), "kvar": ("var", 1000), "var": ("var", 1),
}


class Quantity(NamedTuple):
    value: int
    unit: str                      # base unit (Wh, W, mV, mA, dm3, varh, var)
    at: datetime | None = None     # the value's own capture time (M-Bus devices: gas)


def exact(number: str, wire_unit: str, want: str) -> Quantity:
    """'001581.123', 'kWh', 'Wh' -> Quantity(1581123, 'Wh'): exact, or ProtocolError."""
    base, factor = WIRE_UNITS.get(wire_unit, (None, 0))
    if base != want:
        raise ProtocolError(f"unit {wire_unit!r} where {want} was expected")
    if not re.fullmatch(r"\d+(\.\d+)?", number):
        raise ProtocolError(f"{number!r} is not a decimal number")
    try:
        scaled = Decimal(number) * factor
    except InvalidOperation:
        raise ProtocolError(f"{number!r} is not a decimal number") from None
    if scaled != scaled.to_integral_value():
        raise ProtocolError(f"{number}*{wire_unit} has more precision than whole {want}")
    return Quantity(int(scaled), want)


def quantity(want: str) -> Callable[[tuple[str, ...]], Quantity]:
    """Parser for one '(number*unit)' value in base unit `want`."""
    def parse(values: tuple[str, ...]) -> Quantity:
        _expect(values, 1)
        number, star, unit = values[0].partition("*")
        if not star:
            raise ProtocolError(f"value {values[0]!r} has no unit")
        return exact(number, unit, want)
    return parse


def timestamp(text: str) -> datetime:
    """'YYMMDDhhmmssX' (X = S summer / W winter; absent in DSMR 2.2: Dutch local time) -> aware UTC."""
    m = re.fullmatch(r"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})([SW]?)", text)
    if not m:
        raise ProtocolError(f"timestamp {text!r} is not YYMMDDhhmmss[S|W]")
    yy, mo, dd, hh, mi, ss = (int(g) for g in m.groups()[:6])
    try:
        local = datetime(2000 + yy, mo, dd, hh, mi, ss)
    except ValueError:
        raise ProtocolError(f"timestamp {text!r} is not a valid date and time") from None
    flag = m.group(7)
    if flag:
        return (local - DST_FLAG_OFFSET[flag]).replace(tzinfo=UTC)
    return local.replace(tzinfo=DSMR22_LOCAL_TIME).astimezone(UTC)


def clock(values: tuple[str, ...]) -> datetime:
    _expect(values, 1)
    return timestamp(values[0])


def text(values: tuple[str, ...]) -> str:
    _expect(values, 1)
    return values[0]


def integer(values: tuple[str, ...]) -> int:
    _expect(values, 1)
    if not values[0].isdigit():
        raise ProtocolError(f"{values[0]!r} is not an integer")
    return int(values[0])


def mbus_reading(want: str) -> Callable[[tuple[str, ...]], Quantity]:
    """DSMR 4/5 M-Bus value: '(capture time)(number*unit)'."""
    def parse(values: tuple[str, ...]) -> Quantity:
        _expect(values, 2)
        at = timestamp(values[0])
        return quantity(want)(values[1:])._replace(at=at)
    return parse


def dsmr22_gas(values: tuple[str, ...]) -> Quantity:
    """DSMR 2.2 gas: '(capture time)(status)(period)(count)(0-1:24.2.1)(m3)' then '(number)' on the next line."""
    _expect(values, 7)
    at = timestamp(values[0])
    return exact(values[6], values[5], "dm3")._replace(at=at)


def _expect(values: tuple[str, ...], n: int) -> None:
    if len(values) != n:
        raise ProtocolError(f"{len(values)} value(s) where {n} were expected")


# ---------------------------------------------------------------- the specification table

class Obj(NamedTuple):
    key: str                               # stored OBIS code, or a telegram attribute name
    name: str
    parse: Callable[[tuple[str, ...]], object]


# OBIS reference on the wire -> what it is. 'n' stands for any M-Bus channel 1..4.
OBJECTS: dict[str, Obj] = {
    "1-3:0.2.8": Obj("version", "DSMR version", text),
    "0-0:1.0.0": Obj("timestamp", "telegram time", clock),
    "0-0:96.1.1": Obj("equipment_id", "equipment identifier", text),
    "0-0:96.14.0": Obj("tariff", "tariff indicator", integer),
    "1-0:1.8.0": Obj("1.8.0", "import total", quantity("Wh")),
    "1-0:1.8.1": Obj("1.8.1", "import tariff 1", quantity("Wh")),
    "1-0:1.8.2": Obj("1.8.2", "import tariff 2", quantity("Wh")),
    "1-0:2.8.0": Obj("2.8.0", "export total", quantity("Wh")),
    "1-0:2.8.1": Obj("2.8.1", "export tariff 1", quantity("Wh")),
    "1-0:2.8.2": Obj("2.8.2", "export tariff 2", quantity("Wh")),
    "1-0:3.8.0": Obj("3.8.0", "reactive import total", quantity("varh")),
    "1-0:3.8.1": Obj("3.8.1", "reactive import tariff 1", quantity("varh")),
    "1-0:3.8.2": Obj("3.8.2", "reactive import tariff 2", quantity("varh")),
    "1-0:4.8.0": Obj("4.8.0", "reactive export total", quantity("varh")),
    "1-0:4.8.1": Obj("4.8.1", "reactive export tariff 1", quantity("varh")),
    "1-0:4.8.2": Obj("4.8.2", "reactive export tariff 2", quantity("varh")),
    "1-0:1.7.0": Obj("1.7.0", "import power", quantity("W")),
    "1-0:2.7.0": Obj("2.7.0", "export power", quantity("W")),
    "1-0:3.7.0": Obj("3.7.0", "reactive import power", quantity("var")),
    "1-0:4.7.0": Obj("4.7.0", "reactive export power", quantity("var")),
    "1-0:21.7.0": Obj("21.7.0", "L1 import power", quantity("W")),
    "1-0:41.7.0": Obj("41.7.0", "L2 import power", quantity("W")),
    "1-0:61.7.0": Obj("61.7.0", "L3 import power", quantity("W")),
    "1-0:22.7.0": Obj("22.7.0", "L1 export power", quantity("W")),
    "1-0:42.7.0": Obj("42.7.0", "L2 export power", quantity("W")),
    "1-0:62.7.0": Obj("62.7.0", "L3 export power", quantity("W")),
    "1-0:32.7.0": Obj("32.7.0", "L1 voltage", quantity("mV")),
    "1-0:52.7.0": Obj("52.7.0", "L2 voltage", quantity("mV")),
    "1-0:72.7.0": Obj("72.7.0", "L3 voltage", quantity("mV")),
    "1-0:31.7.0": Obj("31.7.0", "L1 current", quantity("mA")),
    "1-0:51.7.0": Obj("51.7.0", "L2 current", quantity("mA")),
    "1-0:71.7.0": Obj("71.7.0", "L3 current", quantity("mA")),
    "0-n:24.1.0": Obj("device_type", "M-Bus device type", integer),
    "0-n:96.1.0": Obj("equipment_id", "M-Bus equipment identifier", text),
    "0-n:24.2.1": Obj("24.2.1", "gas delivered", mbus_reading("dm3")),
    "0-n:24.2.3": Obj("24.2.1", "gas delivered (Belgium)", mbus_reading("dm3")),
    "0-n:24.3.0": Obj("24.2.1", "gas delivered (DSMR 2.2)", dsmr22_gas),
}

ELECTRICITY_NAMES = {o.key: o.name for o in OBJECTS.values() if o.key[0].isdigit()}

_LINE = re.compile(r"(\d+-\d+:\d+\.\d+\.\d+)((?:\([^()]*\))+)")
_VALUES = re.compile(r"\(([^()]*)\)")
_CHANNEL = re.compile(r"0-([1-9]):")


# ---------------------------------------------------------------- the parsed telegram

@dataclass(frozen=True)
class MBusDevice:
    channel: int
    device_type: int | None = None
    equipment_id: str | None = None
    value: Quantity | None = None


@dataclass(frozen=True)
class Telegram:
    header: str                                   # identification after '/', e.g. 'ISk5\2MT382-1000'
    crc: int | None                               # None for DSMR 2.2
    version: str | None = None                    # from 1-3:0.2.8 ('50'), absent in 2.2
    timestamp: datetime | None = None             # 0-0:1.0.0, aware UTC
    equipment_id: str | None = None               # 0-0:96.1.1 as sent (hex octets in 4/5)
    tariff: int | None = None
    values: dict[str, Quantity] = field(default_factory=dict)    # stored OBIS -> exact quantity
    mbus: tuple[MBusDevice, ...] = ()
    unknown: tuple[str, ...] = ()                 # OBIS references not in OBJECTS (kept, not used)

    @property
    def serial(self) -> str | None:
        return meter_serial(self.equipment_id)


def meter_serial(equipment_id: str | None) -> str | None:
    """DSMR 4/5 send the equipment id as hex octets: decode when they are printable ASCII."""
    if not equipment_id:
        return None
    if len(equipment_id) % 2 == 0 and re.fullmatch(r"[0-9A-Fa-f]+", equipment_id):
        raw = bytes.fromhex(equipment_id)
        if all(0x21 <= b <= 0x7E for b in raw):
            return raw.decode("ascii")
    return equipment_id


def parse_telegram(raw: bytes, *, version: str | None = None) -> Telegram:
    """Parse one telegram '/' .. '!CRC\\r\\n'; verifies the CRC (required for versions 4 and 5).

    `version` None accepts any version and checks a CRC whenever one is present.
    """
    crc_required = version_settings(version).crc if version is not None else False
    if not raw.startswith(b"/"):
        raise TelegramError("malformed", "telegram does not start with '/'")
    bang = raw.rfind(b"!")
    if bang < 0:
        raise TelegramError("truncated", f"truncated telegram: no '!' end marker in {len(raw)} bytes")
    tail = raw[bang + 1:]
    m = re.fullmatch(rb"([0-9A-Fa-f]{4})?\r?\n?", tail)
    if not m:
        raise TelegramError("truncated", f"truncated or malformed telegram end {tail[:12]!r} after '!'")
    crc = None
    if m.group(1):
        crc = int(m.group(1), 16)
        computed = crc16_arc(raw[:bang + 1])
        if computed != crc:
            raise TelegramError("crc", f"CRC mismatch: telegram says {crc:04X}, computed {computed:04X}")
    elif crc_required:
        raise TelegramError("truncated", f"truncated telegram: DSMR {version} requires a CRC after '!'")
    try:
        body = raw[1:bang].decode("ascii")
    except UnicodeDecodeError as exc:
        raise TelegramError("malformed", f"non-ASCII byte 0x{raw[1 + exc.start]:02X} at offset {1 + exc.start}") from None
    lines = body.split("\r\n") if "\r\n" in body else body.split("\n")
    header = lines[0]
    if len(header) < 5 or not header.isprintable():
        raise TelegramError("malformed", f"malformed identification line {header!r}")
    objects: list[tuple[int, str, list[str]]] = []
    for n, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        if line.startswith("(") and objects and _VALUES.sub("", line) == "":
            objects[-1][2].extend(_VALUES.findall(line))      # DSMR 2.2: value continued on a new line
            continue
        lm = _LINE.fullmatch(line)
        if not lm:
            raise TelegramError("malformed", f"line {n}: malformed object {line[:60]!r}")
        objects.append((n, lm.group(1), _VALUES.findall(lm.group(2))))
    if crc is None:
        _check_without_crc(objects)
    return _build(header, crc, objects)


# DSMR 2.2 has no CRC: its fixed value widths and mandatory objects are the only guard against a
# line that lost bytes or lines on the way ('00001.001' that arrives as '0001.001' is refused).
DSMR22_FORMATS: dict[str, str] = {
    "0-0:96.1.1": r".+",
    "1-0:1.8.1": r"\d{5}\.\d{3}\*kWh", "1-0:1.8.2": r"\d{5}\.\d{3}\*kWh",
    "1-0:2.8.1": r"\d{5}\.\d{3}\*kWh", "1-0:2.8.2": r"\d{5}\.\d{3}\*kWh",
    "0-0:96.14.0": r"\d{4}", "1-0:1.7.0": r"\d{4}\.\d{2}\*kW", "1-0:2.7.0": r"\d{4}\.\d{2}\*kW",
}


def _check_without_crc(objects: list[tuple[int, str, list[str]]]) -> None:
    seen = {}
    for n, ref, values in objects:
        fmt = DSMR22_FORMATS.get(ref)
        if fmt is not None:
            if len(values) != 1 or not re.fullmatch(fmt, values[0]):
                raise TelegramError("malformed", f"line {n}: {ref}: {values!r} is not the DSMR 2.2 format {fmt}")
            seen[ref] = n
    missing = [ref for ref in DSMR22_FORMATS if ref not in seen]
    if missing:
        raise TelegramError("truncated", f"telegram without CRC lacks {', '.join(missing)}")


def _build(header: str, crc: int | None, objects: list[tuple[int, str, list[str]]]) -> Telegram:
    attrs: dict[str, object] = {}
    values: dict[str, Quantity] = {}
    mbus: dict[int, dict[str, object]] = {}
    unknown = []
    for n, ref, raw_values in objects:
        cm = _CHANNEL.match(ref)
        key = _CHANNEL.sub("0-n:", ref, count=1) if cm else ref
        obj = OBJECTS.get(key)
        if obj is None:
            unknown.append(ref)
            continue
        try:
            value = obj.parse(tuple(raw_values))
        except ProtocolError as exc:
            raise TelegramError("malformed", f"line {n}: {ref}: {exc}") from None
        if cm:
            mbus.setdefault(int(cm.group(1)), {})["value" if isinstance(value, Quantity) else obj.key] = value
        elif isinstance(value, Quantity):
            values[obj.key] = value
        else:
            attrs[obj.key] = value
    devices = tuple(MBusDevice(channel=ch, **fields) for ch, fields in sorted(mbus.items()))  # type: ignore[arg-type]
    return Telegram(header=header, crc=crc, values=values, mbus=devices, unknown=tuple(unknown), **attrs)  # type: ignore[arg-type]


def to_readings(telegram: Telegram, *, received_at: datetime, meter_id: str | None = None,
                gas_meter_ids: dict[int, str] | None = None) -> list[Reading]:
    """Readings of one telegram; electricity at the telegram's own time (else `received_at`).

    The meter id is `meter_id`, else the decoded equipment identifier. Each M-Bus device (gas)
    is its own meter: `gas_meter_ids[channel]`, else its decoded equipment identifier, else
    '<meter id>-mbus<channel>'; its reading carries the device's own capture time.
    """
    mid = meter_id or telegram.serial
    if not mid:
        raise ProtocolError(f"telegram from {telegram.header!r} has no equipment identifier; configure a meter id")
    at = telegram.timestamp or received_at
    out = [Reading(mid, obis, at, q.value, q.unit) for obis, q in telegram.values.items()]
    for dev in telegram.mbus:
        if dev.value is None:
            continue
        gid = (gas_meter_ids or {}).get(dev.channel) or meter_serial(dev.equipment_id) or f"{mid}-mbus{dev.channel}"
        out.append(Reading(gid, "24.2.1", dev.value.at or at, dev.value.value, dev.value.unit))
    return out


# ---------------------------------------------------------------- streaming framer

_FRAME_END = re.compile(rb"!([0-9A-Fa-f]{4})?\r\n")


@dataclass
class FramerStats:
    telegrams: int = 0          # complete frames handed out
    truncated: int = 0          # a new '/' arrived before the previous telegram's end
    oversized: int = 0          # no end within max_bytes
    garbage_bytes: int = 0      # bytes outside any telegram, dropped


class TelegramFramer:
    """Finds telegrams ('/' .. '!' [CRC] CRLF) in a byte stream with garbage between them.

    The buffer never holds more than `max_bytes` after `feed` returns: the gateway runs for
    years, and a line that never ends a telegram must not grow memory. Frames are handed out raw;
    `parse_telegram` checks them.
    """

    def __init__(self, max_bytes: int = 16_384) -> None:
        self.max_bytes = max_bytes
        self.stats = FramerStats()
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        while True:
            start = self._buf.find(b"/")
            if start < 0:
                self.stats.garbage_bytes += len(self._buf)
                self._buf.clear()
                return frames
            if start:
                self.stats.garbage_bytes += start
                del self._buf[:start]
            nxt = self._buf.find(b"/", 1)
            end = _FRAME_END.search(self._buf, 1, nxt if nxt >= 0 else len(self._buf))
            if end is not None:
                frames.append(bytes(self._buf[:end.end()]))
                self.stats.telegrams += 1
                del self._buf[:end.end()]
                continue
            if nxt >= 0:                        # restarted before the end: the first one was cut off
                self.stats.truncated += 1
                del self._buf[:nxt]
                continue
            if len(self._buf) > self.max_bytes:
                self.stats.oversized += 1
                self.stats.garbage_bytes += len(self._buf)
                self._buf.clear()
            return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
