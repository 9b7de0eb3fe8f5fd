"""Meter profiles as data: load and validate the TOML files, decode/encode registers; never talks to a wire.

A profile names, for each quantity, function code, address, register count, data type, word/byte
order, scale, stored unit and OBIS code, plus the model's largest accepted block, its "no value"
marker, its declared energy resolution, an optional serial-number register and model variants.
`[[example]]` blocks (raw registers -> decoded values) are checked by the test suite for every
profile. Floats from the wire become exact integers here, once (the float's exact binary value,
rounded half-even to the declared resolution), and never again.
"""

from __future__ import annotations

import re
import struct
import tomllib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from importlib import resources
from pathlib import Path

from meterlink.config import key_line, toml_error
from meterlink.errors import ConfigError
from meterlink.readings import BILLING_OBIS, UNITS

TYPES = {  # name -> (registers, struct code)
    "u16": (1, "H"), "s16": (1, "h"), "u32": (2, "I"), "s32": (2, "i"),
    "u64": (4, "Q"), "s64": (4, "q"), "float32": (2, "f"), "float64": (4, "d"),
}
FUNCTIONS = {3: "holding", 4: "input"}
ORDERS = ("big", "little")
MAX_BLOCK_LIMIT = 125  # Modbus FC 3/4 protocol limit

METER_KEYS = {"model", "manufacturer", "function", "word_order", "byte_order", "max_block", "energy_resolution",
              "no_value", "max_power_w", "response_delay_ms", "relay_coil", "source"}
QUANTITY_KEYS = {"obis", "name", "function", "address", "count", "type", "word_order", "byte_order", "scale",
                 "unit", "resolution"}
SERIAL_KEYS = {"function", "address", "count", "type", "word_order", "byte_order"}
EXAMPLE_KEYS = {"registers", "expect", "missing", "function", "note"}
VARIANT_KEYS = {"name", "refuses", "no_value", "note"}
TOP_KEYS = {"meter", "quantity", "serial", "example", "variant"}


@dataclass(frozen=True)
class Quantity:
    obis: str
    name: str
    function: int
    address: int
    type: str
    unit: str                 # stored unit (meterlink.readings.UNITS)
    scale: Decimal            # raw * scale = value in stored unit
    word_order: str = "big"   # "big": high word first
    byte_order: str = "big"   # "little": bytes swapped inside each word
    resolution: int = 1       # stored value is rounded to a multiple of this
    billing: bool = False

    @property
    def count(self) -> int:
        return TYPES[self.type][0]

    @property
    def end(self) -> int:
        return self.address + self.count

    @property
    def registers(self) -> range:
        return range(self.address, self.address + self.count)


@dataclass(frozen=True)
class Example:
    registers: dict[int, list[int]]   # start address -> raw 16-bit words
    expect: dict[str, int]            # obis -> decoded value
    function: int
    missing: tuple[str, ...] = ()     # obis whose words are the "no value" marker (decode -> None)


@dataclass(frozen=True)
class Variant:
    """A firmware/ordering variant of the model that lacks some registers (the simulator serves it)."""

    name: str
    refuses: frozenset[int] = frozenset()   # addresses answered with exception 2 (illegal data address)
    no_value: tuple[str, ...] = ()          # obis answered with the "no value" marker
    note: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    manufacturer: str
    max_block: int
    quantities: tuple[Quantity, ...]
    examples: tuple[Example, ...] = ()
    no_value: int | None = None       # raw word meaning "not available" (e.g. ABB all 0xFF)
    max_power_w: int = 0
    response_delay_ms: int = 20
    relay_coil: int | None = None     # coil address that connects (1) / disconnects (0) the supply
    source: str = ""
    energy_resolution: int = 1        # Wh; energy registers are multiples of this
    serial: Quantity | None = None    # serial-number register, where the model has one (unit "")
    variants: tuple[Variant, ...] = ()

    def quantity(self, obis: str) -> Quantity:
        for q in self.quantities:
            if q.obis == obis:
                return q
        raise KeyError(f"profile {self.name} has no quantity {obis}")

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants) or "none"
        raise ConfigError(f"profile {self.name} has no variant {name!r} (variants: {known})")


def profile_dir() -> Path:
    return Path(str(resources.files("meterlink.gateway") / "profiles"))


def known_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.toml"))


def profile_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = profile_dir() / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(f"unknown meter profile {name_or_path!r}; known profiles: "
                              f"{', '.join(known_profiles())}")
    return path


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by name (shipped) or by path; every error names the file, line and key."""
    path = profile_path(name_or_path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read profile: {exc.strerror}", path=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(exc, str(path)) from None
    return parse_profile(data, path.stem, str(path), text)


def check_profile_file(path: str | Path) -> Profile:
    """The profile-file validator: load, validate and check every example; raises ConfigError (file, key)."""
    profile = load_profile(str(path))
    real = profile_path(str(path))
    ctx = _Ctx(str(real), real.read_text())
    if not profile.examples:
        raise ConfigError("a profile needs at least one [[example]] of raw registers -> values",
                          path=str(real), key="example")
    for i, ex in enumerate(profile.examples):
        got = decode_example(profile, ex)
        for obis, want in ex.expect.items():
            if got.get(obis) != want:
                raise ConfigError(f"{obis} decodes to {got.get(obis)!r}, the example expects {want}",
                                  path=str(real), line=ctx.line(f"example[{i}].expect"),
                                  key=f"example[{i}].expect.{obis}")
        for obis in ex.missing:
            if obis not in got or got[obis] is not None:
                raise ctx.error(f"example[{i}].missing",
                                f"{obis} should decode as 'no value' but gives {got.get(obis)!r}")
    return profile


class _Ctx:
    """Error helper: every error names the file, the line (best effort) and the dotted key."""

    def __init__(self, path: str, text: str | None) -> None:
        self.path, self.text = path, text

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, line=self.line(key), key=key)

    def line(self, key: str) -> int | None:
        """Line of a dotted key such as `quantity[3].type`: inside the 4th [[quantity]] table."""
        if not self.text:
            return None
        m = re.match(r"^(\w+)(?:\[(\d+)\])?(?:\.(\w+))?", key)
        if m is None:
            return key_line(self.text, key)
        table, index, leaf = m.group(1), int(m.group(2) or 0), m.group(3)
        lines = self.text.splitlines()
        headers = [i for i, ln in enumerate(lines) if re.match(rf"^\s*\[\[?\s*{table}\s*\]\]?", ln)]
        if not headers and leaf is None:
            return key_line(self.text, key)
        if len(headers) <= index:
            return None
        start = headers[index]
        if leaf is None:
            return start + 1
        for i in range(start + 1, len(lines)):
            if re.match(r"^\s*\[", lines[i]):
                break
            if re.match(rf"^\s*{re.escape(leaf)}\s*=", lines[i]):
                return i + 1
        return start + 1

    def get(self, table: dict, key: str, prefix: str, kind=None, default=...):
        if key not in table:
            if default is not ...:
                return default
            raise self.error(prefix + key, "required key is missing")
        value = table[key]
        if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            name = getattr(kind, "__name__", None) or " or ".join(k.__name__ for k in kind)
            raise self.error(prefix + key, f"must be {name}, got {value!r}")
        return value

    def known(self, table: dict, allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(prefix + key, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _register_spec(ctx: _Ctx, q: dict, prefix: str, defaults: dict) -> dict:
    typ = ctx.get(q, "type", prefix, str)
    if typ not in TYPES:
        raise ctx.error(prefix + "type", f"unknown data type {typ!r} (known: {', '.join(TYPES)})")
    fc = ctx.get(q, "function", prefix, int, defaults["function"])
    if fc not in FUNCTIONS:
        raise ctx.error(prefix + "function", f"function {fc} is not a register read (3 holding or 4 input)")
    address = ctx.get(q, "address", prefix, int)
    if not 0 <= address <= 0xFFFF:
        raise ctx.error(prefix + "address", f"address {address} outside 0..0xFFFF")
    count = ctx.get(q, "count", prefix, int, TYPES[typ][0])
    if count != TYPES[typ][0]:
        raise ctx.error(prefix + "count", f"{typ} occupies {TYPES[typ][0]} register(s), not {count}")
    if address + count > 0x10000:
        raise ctx.error(prefix + "address", "register range runs past 0xFFFF")
    order = {}
    for key in ("word_order", "byte_order"):
        order[key] = ctx.get(q, key, prefix, str, defaults[key])
        if order[key] not in ORDERS:
            raise ctx.error(prefix + key, f"{key} must be 'big' or 'little', got {order[key]!r}")
    return {"type": typ, "function": fc, "address": address, **order}


def parse_profile(data: dict, name: str, path: str = "<profile>", text: str | None = None) -> Profile:
    """Validate a parsed profile file; every error names file, line (best effort) and key."""
    ctx = _Ctx(path, text)
    ctx.known(data, TOP_KEYS, "")
    meter = ctx.get(data, "meter", "", dict)
    ctx.known(meter, METER_KEYS, "meter.")
    defaults = {"function": ctx.get(meter, "function", "meter.", int, 4),
                "word_order": ctx.get(meter, "word_order", "meter.", str, "big"),
                "byte_order": ctx.get(meter, "byte_order", "meter.", str, "big")}
    if defaults["function"] not in FUNCTIONS:
        raise ctx.error("meter.function", f"function {defaults['function']} is not a register read (3 or 4)")
    for key in ("word_order", "byte_order"):
        if defaults[key] not in ORDERS:
            raise ctx.error(f"meter.{key}", f"{key} must be 'big' or 'little', got {defaults[key]!r}")
    max_block = ctx.get(meter, "max_block", "meter.", int)
    if not 1 <= max_block <= MAX_BLOCK_LIMIT:
        raise ctx.error("meter.max_block", f"max_block {max_block} outside 1..{MAX_BLOCK_LIMIT}")
    energy_resolution = ctx.get(meter, "energy_resolution", "meter.", int, 1)
    if energy_resolution < 1:
        raise ctx.error("meter.energy_resolution", "energy_resolution must be a positive number of Wh")
    no_value = ctx.get(meter, "no_value", "meter.", (int, str), None)
    if isinstance(no_value, str):
        try:
            no_value = int(no_value, 0)
        except ValueError:
            raise ctx.error("meter.no_value", f"no_value must be a 16-bit word like \"0xFFFF\", got {no_value!r}") from None
    if no_value is not None and not 0 <= no_value <= 0xFFFF:
        raise ctx.error("meter.no_value", "no_value must be a 16-bit word (0..0xFFFF)")
    delay = ctx.get(meter, "response_delay_ms", "meter.", int, 20)
    if delay < 0:
        raise ctx.error("meter.response_delay_ms", "response_delay_ms must not be negative")

    quantities: list[Quantity] = []
    seen_obis: dict[str, int] = {}
    for i, q in enumerate(ctx.get(data, "quantity", "", list)):
        prefix = f"quantity[{i}]."
        if not isinstance(q, dict):
            raise ctx.error(f"quantity[{i}]", "each [[quantity]] must be a table")
        ctx.known(q, QUANTITY_KEYS, prefix)
        spec = _register_spec(ctx, q, prefix, defaults)
        if spec["function"] not in FUNCTIONS or TYPES[spec["type"]][0] > max_block:
            raise ctx.error(prefix + "type", f"{spec['type']} does not fit in max_block {max_block}")
        if isinstance(q.get("scale"), float):
            raise ctx.error(prefix + "scale", "scale must be a string or integer, not a float "
                                              "(write \"0.01\" so it stays exact)")
        try:
            scale = Decimal(str(ctx.get(q, "scale", prefix, (str, int), "1")))
        except ArithmeticError:
            raise ctx.error(prefix + "scale", "scale must be a decimal number (write it as a string)") from None
        if not scale.is_finite() or scale == 0:
            raise ctx.error(prefix + "scale", "scale must be a finite, non-zero number")
        unit = ctx.get(q, "unit", prefix, str)
        if unit not in UNITS:
            raise ctx.error(prefix + "unit", f"unknown unit {unit!r} (known: {', '.join(UNITS)})")
        obis = ctx.get(q, "obis", prefix, str)
        if obis in seen_obis:
            raise ctx.error(prefix + "obis", f"OBIS {obis} already used by quantity[{seen_obis[obis]}]")
        seen_obis[obis] = i
        resolution = ctx.get(q, "resolution", prefix, int, energy_resolution if unit == "Wh" else 1)
        if resolution < 1:
            raise ctx.error(prefix + "resolution", "resolution must be a positive integer")
        quantities.append(Quantity(
            obis=obis, name=ctx.get(q, "name", prefix, str, obis), function=spec["function"],
            address=spec["address"], type=spec["type"], unit=unit, scale=scale,
            word_order=spec["word_order"], byte_order=spec["byte_order"], resolution=resolution,
            billing=obis in BILLING_OBIS))
    if not quantities:
        raise ctx.error("quantity", "a profile needs at least one [[quantity]]")
    by_fc: dict[int, list[tuple[Quantity, int]]] = {}
    for i, q in enumerate(quantities):
        by_fc.setdefault(q.function, []).append((q, i))
    for items in by_fc.values():
        items.sort(key=lambda t: t[0].address)
        for (a, ia), (b, ib) in zip(items, items[1:]):
            if b.address < a.end:
                raise ctx.error(f"quantity[{ib}].address",
                                f"{b.obis} at {b.address:#06x} overlaps {a.obis} ({a.address:#06x}+{a.count})")

    serial = None
    if "serial" in data:
        s = ctx.get(data, "serial", "", dict)
        ctx.known(s, SERIAL_KEYS, "serial.")
        spec = _register_spec(ctx, s, "serial.", {**defaults, "function": 3})
        if spec["type"] not in ("u16", "u32", "u64"):
            raise ctx.error("serial.type", "a serial number is an unsigned integer (u16, u32 or u64)")
        serial = Quantity(obis="0.0.96.1.0", name="serial_number", function=spec["function"],
                          address=spec["address"], type=spec["type"], unit="", scale=Decimal(1),
                          word_order=spec["word_order"], byte_order=spec["byte_order"])

    obis_set = {q.obis for q in quantities}
    examples = []
    for i, ex in enumerate(data.get("example", [])):
        prefix = f"example[{i}]."
        ctx.known(ex, EXAMPLE_KEYS, prefix)
        regs: dict[int, list[int]] = {}
        for addr, words in ctx.get(ex, "registers", prefix, dict).items():
            try:
                start = int(addr, 0)
            except ValueError:
                raise ctx.error(prefix + "registers", f"register address {addr!r} is not a number") from None
            if not isinstance(words, list) or not all(isinstance(w, int) and 0 <= w <= 0xFFFF for w in words):
                raise ctx.error(prefix + "registers", f"registers at {addr} must be a list of 16-bit words")
            regs[start] = list(words)
        expect = ctx.get(ex, "expect", prefix, dict, {})
        missing = tuple(ctx.get(ex, "missing", prefix, list, []))
        for obis, value in expect.items():
            if obis not in obis_set:
                raise ctx.error(prefix + "expect", f"expects {obis}, which is no quantity of this profile")
            if not isinstance(value, int) or isinstance(value, bool):
                raise ctx.error(prefix + "expect", f"{obis}: expected values are integers in the stored unit")
        for obis in missing:
            if obis not in obis_set:
                raise ctx.error(prefix + "missing", f"lists {obis}, which is no quantity of this profile")
        if not expect and not missing:
            raise ctx.error(prefix + "expect", "an example must expect at least one value")
        fc = ctx.get(ex, "function", prefix, int, defaults["function"])
        examples.append(Example(regs, dict(expect), fc, missing))

    variants = []
    for i, v in enumerate(data.get("variant", [])):
        prefix = f"variant[{i}]."
        ctx.known(v, VARIANT_KEYS, prefix)
        refuses = ctx.get(v, "refuses", prefix, list, [])
        if not all(isinstance(a, int) and 0 <= a <= 0xFFFF for a in refuses):
            raise ctx.error(prefix + "refuses", "refuses must be a list of register addresses")
        nv = tuple(ctx.get(v, "no_value", prefix, list, []))
        for obis in nv:
            if obis not in obis_set:
                raise ctx.error(prefix + "no_value", f"lists {obis}, which is no quantity of this profile")
        if nv and no_value is None:
            raise ctx.error(prefix + "no_value", "the model declares no meter.no_value marker")
        variants.append(Variant(ctx.get(v, "name", prefix, str), frozenset(refuses), nv,
                                ctx.get(v, "note", prefix, str, "")))

    relay = ctx.get(meter, "relay_coil", "meter.", int, None)
    return Profile(
        name=name, model=ctx.get(meter, "model", "meter.", str),
        manufacturer=ctx.get(meter, "manufacturer", "meter.", str, ""),
        max_block=max_block, quantities=tuple(quantities), examples=tuple(examples),
        no_value=no_value, max_power_w=ctx.get(meter, "max_power_w", "meter.", int, 0),
        response_delay_ms=delay, relay_coil=relay, source=ctx.get(meter, "source", "meter.", str, ""),
        energy_resolution=energy_resolution, serial=serial, variants=tuple(variants),
    )


def _swap_bytes(raw: bytes) -> bytes:
    return b"".join(raw[i + 1:i + 2] + raw[i:i + 1] for i in range(0, len(raw), 2))


def _words_to_bytes(q: Quantity, words: list[int]) -> bytes:
    ws = list(words) if q.word_order == "big" else list(reversed(words))
    raw = b"".join(struct.pack(">H", w) for w in ws)
    return _swap_bytes(raw) if q.byte_order == "little" else raw


def raw_value(q: Quantity, words: list[int]) -> int | float:
    """The register words as the declared data type (int or float), before scaling."""
    if len(words) != q.count:
        raise ValueError(f"{q.obis}: expected {q.count} registers, got {len(words)}")
    return struct.unpack(">" + TYPES[q.type][1], _words_to_bytes(q, words))[0]


def decode(q: Quantity, words: list[int], no_value: int | None = None) -> int | None:
    """Raw register words -> exact integer in the stored unit (None for the 'no value' marker).

    Floats are taken at their exact binary value, scaled exactly (rational arithmetic) and rounded
    once, half-even, to a multiple of the quantity's resolution.
    """
    if len(words) != q.count:
        raise ValueError(f"{q.obis}: expected {q.count} registers, got {len(words)}")
    if no_value is not None and all(w == (no_value & 0xFFFF) for w in words):
        return None
    raw = raw_value(q, words)
    if isinstance(raw, float) and (raw != raw or raw in (float("inf"), float("-inf"))):
        return None
    # Fraction(float) is the float's exact binary value and Fraction(Decimal) the exact scale, so no
    # step rounds before the one below (Decimal arithmetic would round to 28 digits on the way).
    steps = Fraction(raw) * Fraction(q.scale) / q.resolution
    return round(steps) * q.resolution  # round() of a Fraction is half-even


def encode(q: Quantity, value: int) -> list[int]:
    """Stored-unit integer -> raw register words (the simulator's side of `decode`)."""
    raw_value_ = Decimal(value) / q.scale
    code = TYPES[q.type][1]
    if q.type.startswith("float"):
        raw = struct.pack(">" + code, float(raw_value_))  # the wire format IS a float
    else:
        raw = struct.pack(">" + code, int(raw_value_.to_integral_value(rounding=ROUND_HALF_EVEN)))
    if q.byte_order == "little":
        raw = _swap_bytes(raw)
    words = [struct.unpack(">H", raw[i:i + 2])[0] for i in range(0, len(raw), 2)]
    return words if q.word_order == "big" else list(reversed(words))


def decode_example(profile: Profile, example: Example) -> dict[str, int | None]:
    """Decode an example's raw registers with the profile; used by the test suite for every profile."""
    out = {}
    for q in profile.quantities:
        if q.function != example.function:
            continue
        for start, words in example.registers.items():
            if start <= q.address and q.end <= start + len(words):
                off = q.address - start
                out[q.obis] = decode(q, words[off:off + q.count], profile.no_value)
    return out


def add_parsers(sub) -> None:
    """`meterlink-gateway profiles list|check` and `bus-plan` (hooked into gateway/cli.py)."""
    pr = sub.add_parser("profiles", help="list the meter profiles or validate profile files",
                        epilog="example: meterlink-gateway profiles check gateway/profiles/abb_b23.toml my_meter.toml")
    prs = pr.add_subparsers(dest="profiles_command", required=True)
    ls = prs.add_parser("list", help="every shipped profile with its model, block limit and quantities",
                        epilog="example: meterlink-gateway profiles list")
    ls.set_defaults(func=_cmd_list)
    ck = prs.add_parser("check", help="validate profile files and their [[example]] blocks (exit 2 on the first error)",
                        epilog="example: meterlink-gateway profiles check my_meter.toml")
    ck.add_argument("files", nargs="*", help="profile TOML files or shipped names (default: every shipped profile)")
    ck.set_defaults(func=_cmd_check)
    bp = sub.add_parser("bus-plan", help="requests, bytes and modelled wire time per sweep of each configured bus",
                        epilog="example: meterlink-gateway bus-plan --config gateway.toml")
    bp.add_argument("--config", default="gateway.toml")
    bp.set_defaults(func=_cmd_bus_plan)


def _cmd_list(args) -> int:
    for name in known_profiles():
        p = load_profile(name)
        print(f"{name:22} {p.manufacturer} {p.model}: {len(p.quantities)} quantities, max_block {p.max_block}, "
              f"energy resolution {p.energy_resolution} Wh{', serial number' if p.serial else ''}"
              f"{', variants: ' + ', '.join(v.name for v in p.variants) if p.variants else ''}")
    return 0


def _cmd_check(args) -> int:
    for f in args.files or known_profiles():
        p = check_profile_file(f)
        print(f"{profile_path(f)}: ok ({len(p.quantities)} quantities, {len(p.examples)} example(s) decode as declared)")
    return 0


def _cmd_bus_plan(args) -> int:
    from meterlink.modbus import SerialLine

    from .config import load_config
    from .readplan import plan_meter, sweep_cost

    config = load_config(args.config)
    for bus in config.buses:
        if str(bus.port).startswith("tcp://"):
            print(f"{bus.port}: Modbus TCP, no serial wire to model")
            continue
        line = SerialLine(bus.baud, bus.parity, bus.stopbits)
        c = sweep_cost(line, [plan_meter(m.id, m.profile, line) for m in bus.meters])
        print(f"{bus.port} ({line.describe()}): {c.meters} meter(s), {c.requests} requests, {c.bytes_on_wire} bytes, "
              f"{c.wire_time_s:.3f} s wire time per sweep ({c.wire_time_s / config.poll_interval_s:.1%} of the "
              f"{config.poll_interval_s} s interval); minimum {c.min_wire_time_s:.3f} s; one request per value "
              f"would need {c.per_value_requests} requests, {c.per_value_wire_time_s:.3f} s")
    return 0
