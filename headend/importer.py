"""Readings from other sources (CSV/JSONL files, MQTT payloads) -> the head-end's one ingest path; parsing is pure, the shell is thin.

Accepted columns / keys (docs/import.md):

  meter       meter id as provisioned (required)
  obis        register, e.g. 1.8.0 (alias: register)
  timestamp   ISO 8601 instant WITH offset or Z (alias: taken_at); a naive time is refused
  value       decimal number as text (never parsed through float)
  unit        Wh or kWh for energy (also W/kW, ...; see meterlink.readings.UNITS); kWh -> Wh exactly,
              a value finer than 1 Wh is rounded half-even to the Wh (the resolution of the store)

Every imported reading goes through the same repository `ingest` as gateway pushes. Its record key
is (source "import:<meter>:<obis>", seq = taken_at in ms), so the repository's unique
(gateway_id, seq) makes the same reading arriving twice (same file re-imported, an overlapping
export, MQTT redelivery) a duplicate: re-importing a file changes nothing. A second, different
value for the same meter, register and instant is kept out and reported as a conflict.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterable, Iterator

from meterlink.clock import parse_instant, to_ms
from meterlink.errors import ValidationError
from meterlink.readings import UNITS, Reading

ALIASES = {"register": "obis", "taken_at": "timestamp", "meter_id": "meter"}
REQUIRED = ("meter", "obis", "timestamp", "value", "unit")
# display units accepted on input -> (base unit, factor)
INPUT_UNITS = {base: (base, 1) for base in UNITS} | {disp: (base, f) for base, (disp, f) in UNITS.items() if disp}
IMPORT_PREFIX = "import:"


@dataclass(frozen=True)
class RowError:
    file: str
    line: int
    field: str
    message: str
    raw: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: field {self.field!r}: {self.message}"


@dataclass
class ImportSummary:
    read: int = 0
    new: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected: int = 0
    errors: list[RowError] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"read": self.read, "new": self.new, "duplicate": self.duplicate, "conflict": self.conflict,
                "rejected": self.rejected}


class RowRejected(ValidationError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def _norm(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if k is None:
            raise RowRejected("(extra)", f"more values than columns: {v!r}")
        key = ALIASES.get(k.strip().lower(), k.strip().lower())
        out[key] = v
    return out


def parse_row(row: dict) -> Reading:
    """One CSV/JSON row -> a Reading with an exact integer value, or RowRejected naming the field."""
    r = _norm(row)
    for name in REQUIRED:
        if r.get(name) in (None, ""):
            raise RowRejected(name, "missing")
    meter = str(r["meter"]).strip()
    obis = str(r["obis"]).strip()
    if not meter:
        raise RowRejected("meter", "empty")
    parts = obis.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise RowRejected("obis", f"not an OBIS register code like 1.8.0: {obis!r}")
    ts = r["timestamp"]
    if not isinstance(ts, str):
        raise RowRejected("timestamp", f"must be an ISO 8601 string, got {ts!r}")
    try:
        naive = datetime.fromisoformat(ts.strip().replace("Z", "+00:00")).tzinfo is None
        if naive:
            raise RowRejected("timestamp", f"no UTC offset in {ts!r} (write Z or +01:00)")
        taken = parse_instant(ts)
    except ValueError:
        raise RowRejected("timestamp", f"not an ISO 8601 instant: {ts!r}") from None
    raw = r["value"]
    if isinstance(raw, (bool, float)):
        raise RowRejected("value", f"not a number: {raw!r}")
    try:
        value = Decimal(str(raw).strip())
    except InvalidOperation:
        raise RowRejected("value", f"not a number: {raw!r}") from None
    if not value.is_finite():
        raise RowRejected("value", f"not a finite number: {raw!r}")
    unit = str(r["unit"]).strip()
    if unit not in INPUT_UNITS:
        raise RowRejected("unit", f"unknown unit {unit!r} (use one of {', '.join(sorted(INPUT_UNITS))})")
    base, factor = INPUT_UNITS[unit]
    scaled = (value * factor).to_integral_value(rounding=ROUND_HALF_EVEN)
    if base == "Wh" and scaled < 0:
        raise RowRejected("value", f"an energy register cannot be negative: {raw!r}")
    return Reading(meter, obis, taken, int(scaled), base)


def rows_csv(text: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, raw line, row dict) for each data row; the header is line 1."""
    lines = text.splitlines()
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return
    missing = [c for c in REQUIRED if c not in {ALIASES.get(f.strip().lower(), f.strip().lower())
                                                 for f in reader.fieldnames}]
    if missing:
        raise ValidationError(f"CSV header lacks column(s) {', '.join(missing)} (has: {', '.join(reader.fieldnames)})")
    for row in reader:
        line = reader.line_num
        yield line, lines[line - 1] if line - 1 < len(lines) else "", row


def rows_jsonl(text: str) -> Iterator[tuple[int, str, dict | Exception]]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_float=Decimal)   # exact: the number's text, never a float
        except json.JSONDecodeError as exc:
            yield i, line, RowRejected("(json)", f"not valid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(obj, dict):
            yield i, line, RowRejected("(json)", "each line must be one JSON object")
            continue
        yield i, line, obj


def parse_file(path: str | Path, fmt: str | None = None) -> tuple[list[tuple[int, Reading]], list[RowError]]:
    """Parse a whole file: good rows (with their line) and bad rows (file, line, field, message, raw)."""
    path = Path(path)
    fmt = fmt or ("jsonl" if path.suffix in (".jsonl", ".ndjson") else "csv")
    if fmt not in ("csv", "jsonl"):
        raise ValidationError(f"unknown import format {fmt!r} (csv or jsonl)")
    text = path.read_text(encoding="utf-8-sig")
    good: list[tuple[int, Reading]] = []
    bad: list[RowError] = []
    rows = rows_csv(text) if fmt == "csv" else rows_jsonl(text)
    for line, raw, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            good.append((line, parse_row(row)))
        except RowRejected as exc:
            bad.append(RowError(str(path), line, exc.field, exc.message, raw))
    return good, bad


def import_key(reading: Reading) -> tuple[str, int]:
    """The ingest key of an imported reading: (source, seq) unique per meter, register and instant."""
    return f"{IMPORT_PREFIX}{reading.meter_id}:{reading.obis}", to_ms(reading.taken_at)


def write_rejects(errors: Iterable[RowError], out: str | Path) -> int:
    """CSV of rejected rows: file, line, field, error, raw row. Returns how many were written."""
    errors = list(errors)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "line", "field", "error", "raw"])
        for e in errors:
            w.writerow([e.file, e.line, e.field, e.message, e.raw])
    return len(errors)


def ingest_readings(repo, readings: list[Reading], received_at_ms: int) -> tuple[int, int, int]:
    """Send readings through the repository's one ingest path -> (new, duplicate, conflict)."""
    from .store import StoredRecord

    by_source: dict[str, list[StoredRecord]] = {}
    for r in readings:
        source, seq = import_key(r)
        by_source.setdefault(source, []).append(StoredRecord(source, seq, b"", r))
    new = dup = conflict = 0
    for source, records in by_source.items():
        meter, obis = source[len(IMPORT_PREFIX):].rsplit(":", 1)
        # only the stretch this batch covers: a batch never reads the meter's whole history
        first = min(r.reading.taken_at for r in records)
        last = max(r.reading.taken_at for r in records)
        held = {to_ms(x.taken_at): x.value
                for x in repo.readings(meter, obis, start=first, end=last + timedelta(milliseconds=1))}
        fresh = []
        seen: dict[int, int] = {}
        for rec in records:
            v = held.get(rec.seq, seen.get(rec.seq))
            if v is not None and v != rec.reading.value:
                conflict += 1
                continue
            seen[rec.seq] = rec.reading.value
            fresh.append(rec)
        if fresh:
            res = repo.ingest(source, fresh, received_at_ms)
            new += res.accepted
            dup += res.duplicates
    return new, dup, conflict


def import_files(repo, paths: Iterable[str | Path], received_at_ms: int, fmt: str | None = None,
                 rejects: str | Path | None = None, batch: int = 5000,
                 progress: Callable[[int], None] | None = None) -> ImportSummary:
    """Import files through the ingest path; bad rows go to `rejects` (CSV), good ones still load."""
    summary = ImportSummary()
    for path in paths:
        good, bad = parse_file(path, fmt)
        summary.read += len(good) + len(bad)
        summary.rejected += len(bad)
        summary.errors.extend(bad)
        for i in range(0, len(good), batch):
            chunk = [r for _, r in good[i:i + batch]]
            n, d, c = ingest_readings(repo, chunk, received_at_ms)
            summary.new += n
            summary.duplicate += d
            summary.conflict += c
            if progress:
                progress(len(chunk))
        if progress and bad:
            progress(len(bad))
    if rejects is not None and summary.errors:
        write_rejects(summary.errors, rejects)
    return summary
