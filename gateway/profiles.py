"""Meter profiles as data: load the TOML files, decode/encode registers; never talks to a wire.

A profile names, for each quantity, function code, address, data type, word/byte order, scale,
stored unit and OBIS code, plus the model's largest accepted block and declared energy
resolution. `[[example]]` blocks (raw registers -> decoded values) are checked by the test suite
for every profile. Floats from the wire become exact integers here, once, and never again.
"""

from __future__ import annotations

import struct
import tomllib
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from importlib import resources
from pathlib import Path

from meterlink.config import toml_error
from meterlink.errors import ConfigError

TYPES = {  # name -> (registers, struct code)
    "u16": (1, "H"), "s16": (1, "h"), "u32": (2, "I"), "s32": (2, "i"),
    "u64": (4, "Q"), "s64": (4, "q"), "float32": (2, "f"), "float64": (4, "d"),
}
FUNCTIONS = {3: "holding", 4: "input"}


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
    byte_order: str = "big"
    resolution: int = 1       # stored value is rounded to a multiple of this
    billing: bool = False

    @property
    def count(self) -> int:
        return TYPES[self.type][0]


@dataclass(frozen=True)
class Example:
    registers: dict[int, list[int]]   # start address -> raw 16-bit words
    expect: dict[str, int]            # obis -> decoded value
    function: int


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    manufacturer: str
    max_block: int
    quantities: tuple[Quantity, ...]
    examples: tuple[Example, ...] = ()
    no_value: int | None = None       # raw marker meaning "not available" (e.g. ABB all 0xFF)
    max_power_w: int = 0
    response_delay_ms: int = 20
    relay_coil: int | None = None     # coil address that connects (1) / disconnects (0) the supply
    source: str = ""

    def quantity(self, obis: str) -> Quantity:
        for q in self.quantities:
            if q.obis == obis:
                return q
        raise KeyError(f"profile {self.name} has no quantity {obis}")


def profile_dir() -> Path:
    return Path(str(resources.files("meterlink.gateway") / "profiles"))


def known_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by name (shipped) or by path; errors name the file and key."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = profile_dir() / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(f"unknown meter profile {name_or_path!r}; known profiles: "
                              f"{', '.join(known_profiles())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(exc, str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read profile: {exc.strerror}", path=str(path)) from None
    return parse_profile(data, path.stem, str(path))


def _get(table: dict, key: str, path: str, ctx: str, kind=None, default=...):
    if key not in table:
        if default is not ...:
            return default
        raise ConfigError(f"missing {ctx}{key}", path=path, key=ctx + key)
    value = table[key]
    if kind is not None and not isinstance(value, kind):
        raise ConfigError(f"{ctx}{key} must be {getattr(kind, '__name__', kind)}, got {value!r}",
                          path=path, key=ctx + key)
    return value


def parse_profile(data: dict, name: str, path: str = "<profile>") -> Profile:
    meter = _get(data, "meter", path, "", dict)
    fc_default = meter.get("function", 4)
    word_default = meter.get("word_order", "big")
    byte_default = meter.get("byte_order", "big")
    quantities = []
    for i, q in enumerate(_get(data, "quantity", path, "", list)):
        ctx = f"quantity[{i}]."
        typ = _get(q, "type", path, ctx, str)
        if typ not in TYPES:
            raise ConfigError(f"unknown data type {typ!r} (known: {', '.join(TYPES)})", path=path, key=ctx + "type")
        fc = q.get("function", fc_default)
        if fc not in FUNCTIONS:
            raise ConfigError(f"function {fc} is not a register read (3 or 4)", path=path, key=ctx + "function")
        order = {}
        for key, default in (("word_order", word_default), ("byte_order", byte_default)):
            order[key] = q.get(key, default)
            if order[key] not in ("big", "little"):
                raise ConfigError(f"{key} must be 'big' or 'little'", path=path, key=ctx + key)
        try:
            scale = Decimal(str(q.get("scale", "1")))
        except ArithmeticError:
            raise ConfigError("scale must be a decimal number (write it as a string)", path=path,
                              key=ctx + "scale") from None
        if isinstance(q.get("scale"), float):
            raise ConfigError("scale must be a string or integer, not a float", path=path, key=ctx + "scale")
        obis = _get(q, "obis", path, ctx, str)
        quantities.append(Quantity(
            obis=obis, name=q.get("name", obis), function=fc,
            address=_get(q, "address", path, ctx, int), type=typ,
            unit=_get(q, "unit", path, ctx, str), scale=scale,
            word_order=order["word_order"], byte_order=order["byte_order"],
            resolution=q.get("resolution", meter.get("energy_resolution", 1) if q.get("unit") == "Wh" else 1),
            billing=obis in {"1.8.0", "1.8.1", "1.8.2", "2.8.0", "2.8.1", "2.8.2"},
        ))
    examples = []
    for i, ex in enumerate(data.get("example", [])):
        regs = {}
        for addr, words in _get(ex, "registers", path, f"example[{i}].", dict).items():
            regs[int(addr, 0)] = list(words)
        examples.append(Example(regs, dict(_get(ex, "expect", path, f"example[{i}].", dict)),
                                ex.get("function", fc_default)))
    no_value = meter.get("no_value")
    return Profile(
        name=name, model=_get(meter, "model", path, "meter.", str),
        manufacturer=meter.get("manufacturer", ""),
        max_block=_get(meter, "max_block", path, "meter.", int),
        quantities=tuple(quantities), examples=tuple(examples),
        no_value=int(no_value, 0) if isinstance(no_value, str) else no_value,
        max_power_w=meter.get("max_power_w", 0), response_delay_ms=meter.get("response_delay_ms", 20),
        relay_coil=meter.get("relay_coil"), source=meter.get("source", ""),
    )


def _words_to_bytes(q: Quantity, words: list[int]) -> bytes:
    ws = list(words) if q.word_order == "big" else list(reversed(words))
    raw = b"".join(struct.pack(">H", w) for w in ws)
    if q.byte_order == "little":  # bytes swapped inside each word
        raw = b"".join(raw[i + 1:i + 2] + raw[i:i + 1] for i in range(0, len(raw), 2))
    return raw


def decode(q: Quantity, words: list[int], no_value: int | None = None) -> int | None:
    """Raw register words -> exact integer in the stored unit (None for the 'no value' marker)."""
    if len(words) != q.count:
        raise ValueError(f"{q.obis}: expected {q.count} registers, got {len(words)}")
    if no_value is not None and all(w == (no_value & 0xFFFF) for w in words):
        return None
    raw = struct.unpack(">" + TYPES[q.type][1], _words_to_bytes(q, words))[0]
    if q.type.startswith("float"):
        if raw != raw or raw in (float("inf"), float("-inf")):
            return None
        exact = Decimal(raw)  # exact binary value of the float, no decimal-repr guess
    else:
        exact = Decimal(raw)
    value = exact * q.scale
    step = Decimal(q.resolution)
    return int((value / step).quantize(Decimal(1), rounding=ROUND_HALF_EVEN) * step)


def encode(q: Quantity, value: int) -> list[int]:
    """Stored-unit integer -> raw register words (the simulator's side of `decode`)."""
    raw_value = Decimal(value) / q.scale
    code = TYPES[q.type][1]
    if q.type.startswith("float"):
        raw = struct.pack(">" + code, float(raw_value))  # the wire format IS a float
    else:
        raw = struct.pack(">" + code, int(raw_value.to_integral_value(rounding=ROUND_HALF_EVEN)))
    if q.byte_order == "little":
        raw = b"".join(raw[i + 1:i + 2] + raw[i:i + 1] for i in range(0, len(raw), 2))
    words = [struct.unpack(">H", raw[i:i + 2])[0] for i in range(0, len(raw), 2)]
    return words if q.word_order == "big" else list(reversed(words))


def decode_example(profile: Profile, example: Example) -> dict[str, int | None]:
    """Decode an example's raw registers with the profile; used by the test suite for every profile."""
    out = {}
    for q in profile.quantities:
        if q.function != example.function:
            continue
        for start, words in example.registers.items():
            if start <= q.address and q.address + q.count <= start + len(words):
                off = q.address - start
                out[q.obis] = decode(q, words[off:off + q.count], profile.no_value)
    return out
