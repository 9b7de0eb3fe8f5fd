"""The journal's hash chain: one canonical byte layout per record, SHA-256 links, signed chain heads; pure, no I/O.

Byte layout (version 1, every integer big-endian, `str` = u16 length + UTF-8, `blob` = u32 length
+ bytes), documented with examples in docs/integrity.md:

    record  = "MLR1" | seq u64 | prev_hash 32 bytes | kind u8 | body
    body    = reading (kind 1): meter_id str | obis str | taken_at_ms i64 | value i64 | unit str | quality u32
            | event   (kind 2): kind str | meter_id str | at_ms i64 | payload blob
    hash    = SHA-256(record)
    genesis = 32 zero bytes (the prev_hash of seq 1)
    head    = "MLH1" | gateway_id str | seq u64 | hash 32 bytes       (the message Ed25519 signs)

A tombstone stands in for a run of records first_seq..seq whose bodies were pruned on the gateway
before they were sent (disk nearly full, instantaneous readings only): its prev_hash is the run's
first prev_hash and it carries the hash of the run's last record, so the chain through it verifies.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meterlink.clock import to_ms
from meterlink.readings import BILLING_OBIS, Reading

GENESIS = bytes(32)
RECORD_MAGIC = b"MLR1"
HEAD_MAGIC = b"MLH1"
KIND_READING = 1
KIND_EVENT = 2
_I64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True, slots=True)
class Event:
    """A journaled event that is not a reading: relay action, credit event, card event, ...

    `kind` is a dotted name ("relay.open", "credit.topup", "card.inserted"); `payload` is opaque
    bytes owned by whoever journals the event (PAYG decides its own encoding).
    """

    kind: str
    meter_id: str
    at: datetime
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Tombstone:
    """Records first_seq..(the record's seq) pruned before they were sent; record_hash = hash of the last one."""

    first_seq: int
    record_hash: bytes


Body = Union[Reading, Event, Tombstone]


@dataclass(frozen=True, slots=True)
class ChainRecord:
    seq: int
    prev_hash: bytes
    body: Body


class EncodingError(ValueError):
    """A record that has no canonical encoding (value outside int64, string longer than 65535 bytes, ...)."""


def _str(s: str, what: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise EncodingError(f"{what} is {len(b)} bytes, more than 65535")
    return struct.pack(">H", len(b)) + b


def _i64(v: int, what: str) -> bytes:
    if not _I64[0] <= v <= _I64[1]:
        raise EncodingError(f"{what} {v} outside int64")
    return struct.pack(">q", v)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_READING_STRUCTS: dict[tuple[int, int, int], struct.Struct] = {}


def _reading_bytes(seq: int, prev_hash: bytes, r: Reading) -> bytes | None:
    """Fast path for the common case (ASCII ids, in-range values): one struct.pack; None -> use the general path."""
    try:
        m, o, u = r.meter_id.encode("ascii"), r.obis.encode("ascii"), r.unit.encode("ascii")
        lengths = (len(m), len(o), len(u))
        st = _READING_STRUCTS.get(lengths)
        if st is None:
            st = _READING_STRUCTS.setdefault(lengths, struct.Struct(
                f">4sQ32sBH{lengths[0]}sH{lengths[1]}sqqH{lengths[2]}sI"))
        return st.pack(RECORD_MAGIC, seq, prev_hash, KIND_READING, lengths[0], m, lengths[1], o,
                       (r.taken_at - _EPOCH) // _MS, r.value, lengths[2], u, r.quality)
    except (UnicodeEncodeError, struct.error, TypeError):
        return None


def body_bytes(body: Reading | Event) -> bytes:
    if isinstance(body, Reading):
        what = f"reading {body.meter_id}/{body.obis}"
        if not 0 <= body.quality <= 0xFFFFFFFF:
            raise EncodingError(f"{what}: quality {body.quality} outside u32")
        return (bytes([KIND_READING]) + _str(body.meter_id, f"{what} meter_id") + _str(body.obis, f"{what} obis")
                + _i64(to_ms(body.taken_at), f"{what} taken_at_ms") + _i64(body.value, f"{what} value")
                + _str(body.unit, f"{what} unit") + struct.pack(">I", body.quality))
    if isinstance(body, Event):
        what = f"event {body.kind} of {body.meter_id}"
        if len(body.payload) > 0xFFFFFFFF:
            raise EncodingError(f"{what}: payload too large")
        return (bytes([KIND_EVENT]) + _str(body.kind, f"{what} kind") + _str(body.meter_id, f"{what} meter_id")
                + _i64(to_ms(body.at), f"{what} at_ms") + struct.pack(">I", len(body.payload)) + body.payload)
    raise EncodingError(f"no canonical encoding for {type(body).__name__}")


def canonical_bytes(seq: int, prev_hash: bytes, body: Reading | Event) -> bytes:
    """The one byte string a record's hash is taken over (layout in the module docstring)."""
    if not 1 <= seq <= 0xFFFFFFFFFFFFFFFF:
        raise EncodingError(f"seq {seq} outside 1..2^64-1")
    if len(prev_hash) != 32:
        raise EncodingError(f"record seq {seq}: prev_hash is {len(prev_hash)} bytes, not 32")
    if type(body) is Reading and len(body.meter_id) < 0xFFFF and len(body.obis) < 0xFFFF and len(body.unit) < 0xFFFF:
        fast = _reading_bytes(seq, prev_hash, body)
        if fast is not None:
            return fast
    return RECORD_MAGIC + struct.pack(">Q", seq) + prev_hash + body_bytes(body)


def record_hash(seq: int, prev_hash: bytes, body: Body) -> bytes:
    """SHA-256 of the canonical bytes; a tombstone's hash is the one it carries."""
    if isinstance(body, Tombstone):
        return body.record_hash
    return hashlib.sha256(canonical_bytes(seq, prev_hash, body)).digest()


def hash_of(rec: ChainRecord) -> bytes:
    return record_hash(rec.seq, rec.prev_hash, rec.body)


def link(bodies: Iterable[Reading | Event], after_seq: int = 0, after_hash: bytes = GENESIS) -> list[ChainRecord]:
    """Chain bodies after (after_seq, after_hash): consecutive seq, each prev_hash = hash of the one before."""
    out, seq, prev = [], after_seq, after_hash
    for b in bodies:
        seq += 1
        rec = ChainRecord(seq, prev, b)
        out.append(rec)
        prev = hash_of(rec)
    return out


def first_seq(rec: ChainRecord) -> int:
    """The first seq a record covers: its own, or a tombstone's run start."""
    return rec.body.first_seq if isinstance(rec.body, Tombstone) else rec.seq


def is_prunable(body: Body) -> bool:
    """Only instantaneous readings (and runs of them) may be pruned unacknowledged; never billing registers or events."""
    return isinstance(body, Tombstone) or (isinstance(body, Reading) and body.obis not in BILLING_OBIS)


def prune_run(run: list[ChainRecord]) -> ChainRecord:
    """One tombstone for a contiguous run of prunable records (readings or earlier tombstones)."""
    if not run:
        raise ValueError("empty run")
    for a, b in zip(run, run[1:]):
        if first_seq(b) != a.seq + 1:
            raise ValueError(f"records seq {a.seq} and {b.seq} are not contiguous")
    for r in run:
        if not is_prunable(r.body):
            raise ValueError(f"record seq {r.seq} may not be pruned (billing register or event)")
    return ChainRecord(run[-1].seq, run[0].prev_hash, Tombstone(first_seq(run[0]), hash_of(run[-1])))


def head_message(gateway_id: str, seq: int, head_hash: bytes) -> bytes:
    """What the gateway signs for a batch: its id, the batch's last seq and that record's hash."""
    if len(head_hash) != 32:
        raise EncodingError(f"gateway {gateway_id}: head hash is {len(head_hash)} bytes, not 32")
    return HEAD_MAGIC + _str(gateway_id, "gateway_id") + struct.pack(">Q", seq) + head_hash


def sign_head(key: Ed25519PrivateKey, gateway_id: str, seq: int, head_hash: bytes) -> bytes:
    return key.sign(head_message(gateway_id, seq, head_hash))


def verify_head(public_key: bytes, gateway_id: str, seq: int, head_hash: bytes, signature: bytes) -> bool:
    """True when `signature` is the Ed25519 signature of the head by the raw 32-byte `public_key`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, head_message(gateway_id, seq, head_hash))
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True, slots=True)
class ChainBreak:
    seq: int            # the record at which verification failed
    reason: str         # "seq" (not the next number) or "prev_hash" (does not link to the record before)


def first_break(records: Iterable[ChainRecord], after_seq: int = 0, after_hash: bytes = GENESIS) -> ChainBreak | None:
    """Walk records from (after_seq, after_hash); the first record that does not continue the chain, or None."""
    seq, prev = after_seq, after_hash
    for rec in records:
        if first_seq(rec) != seq + 1 or rec.seq < first_seq(rec):
            return ChainBreak(rec.seq, "seq")
        if rec.prev_hash != prev:
            return ChainBreak(rec.seq, "prev_hash")
        seq, prev = rec.seq, hash_of(rec)
    return None


def chain_head(records: list[ChainRecord], after_seq: int = 0, after_hash: bytes = GENESIS) -> tuple[int, bytes]:
    """(seq, hash) of the last record, or the starting point for an empty list."""
    if not records:
        return after_seq, after_hash
    return records[-1].seq, hash_of(records[-1])


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
