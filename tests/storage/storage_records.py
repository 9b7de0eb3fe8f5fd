"""Records as a gateway pushes them, for the storage tests (plain data, no fixtures)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from meterlink.headend.store import StoredRecord
from meterlink.readings import Reading

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
HASH = bytes(range(32))


def record(gateway: str, seq: int, meter: str = "MTR-0001", obis: str = "1.8.0", value: int | None = None,
           minutes: int | None = None) -> StoredRecord:
    """Record `seq` of `gateway`: by default a 15-minute register reading that grows with seq."""
    at = T0 + timedelta(minutes=15 * seq if minutes is None else minutes)
    return StoredRecord(gateway, seq, HASH, Reading(meter, obis, at, 1_000 * seq if value is None else value, "Wh"))


def batch(gateway: str, first: int, last: int, **kw) -> list[StoredRecord]:
    return [record(gateway, s, **kw) for s in range(first, last + 1)]
