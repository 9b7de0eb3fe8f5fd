"""Customer segments as data: rules over behaviour features, evaluated for every account; pure, no I/O but the file load.

A segments file (TOML) holds `[[segment]]` tables; a segment matches an account when ALL its
`[[segment.rule]]` conditions hold (`feature`, `op` one of < <= > >= == !=, `value` a decimal
string or integer). A rule over a feature the account has no value for (e.g. no trend without a
previous period) does not hold. Every error names the file, line and key.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, Mapping

from meterlink.config import Section, load_section

from .insights import FEATURE_NAMES, Features

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
BUNDLED = Path(__file__).parent / "data" / "segments.toml"


@dataclass(frozen=True)
class Rule:
    feature: str
    op: str
    value: Decimal

    def holds(self, features: Features) -> bool:
        v = features.value(self.feature)
        if v is None:
            return False
        return OPS[self.op](Decimal(v), self.value)

    def __str__(self) -> str:
        return f"{self.feature} {self.op} {self.value}"


@dataclass(frozen=True)
class Segment:
    id: str
    description: str
    rules: tuple[Rule, ...]

    def matches(self, features: Features) -> bool:
        return all(r.holds(features) for r in self.rules)


def _rule(sec: Section) -> Rule:
    sec.check_known({"feature", "op", "value"})
    feature = sec.get("feature", str)
    if feature not in FEATURE_NAMES:
        raise sec.error("feature", f"unknown feature {feature!r} (known: {', '.join(sorted(FEATURE_NAMES))})")
    op = sec.get("op", str)
    if op not in OPS:
        raise sec.error("op", f"unknown operator {op!r} (use one of {' '.join(OPS)})")
    raw = sec.get("value", (str, int))
    if isinstance(raw, bool):
        raise sec.error("value", "must be a number or a decimal string")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise sec.error("value", f"not a decimal number: {raw!r}") from None
    if not value.is_finite():
        raise sec.error("value", f"not a finite number: {raw!r}")
    return Rule(feature, op, value)


def segments_from_section(root: Section) -> tuple[Segment, ...]:
    root.check_known({"segment"})
    out: list[Segment] = []
    seen: set[str] = set()
    for sec in root.sections("segment"):
        sec.check_known({"id", "description", "rule"})
        sid = sec.get("id", str)
        if sid in seen:
            raise sec.error("id", f"duplicate segment id {sid!r}")
        seen.add(sid)
        rules = tuple(_rule(r) for r in sec.sections("rule"))
        if not rules:
            raise sec.error("rule", f"segment {sid!r} has no rule")
        out.append(Segment(sid, sec.get("description", str, ""), rules))
    return tuple(out)


def load_segments(path: str | Path = BUNDLED) -> tuple[Segment, ...]:
    return segments_from_section(load_section(path))


def evaluate(segments: Iterable[Segment], features: Mapping[str, Features]) -> dict[str, tuple[str, ...]]:
    """Account id -> ids of the segments it belongs to (in file order)."""
    segs = tuple(segments)
    return {acc: tuple(s.id for s in segs if s.matches(f)) for acc, f in sorted(features.items())}
