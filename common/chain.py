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

On the wire (PushRequest.chain_records) a reading or event travels as exactly its canonical bytes, so
the head-end hashes what it received; a tombstone, which has no canonical bytes, travels as

    tombstone = "MLT1" | seq u64 | prev_hash 32 bytes | first_seq u64 | record_hash 32 bytes

`decode_wire` is strict (every byte consumed, valid UTF-8, known kind): a record it accepts
re-encodes to the very bytes received, so SHA-256 of the received bytes is the record's hash.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meterlink.clock import to_ms
from meterlink.readings import BILLING_OBIS, UNITS, Reading

GENESIS = bytes(32)
RECORD_MAGIC = b"MLR1"
HEAD_MAGIC = b"MLH1"
TOMBSTONE_MAGIC = b"MLT1"
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


def _reading_struct(lengths: tuple[int, int, int]) -> struct.Struct:
    """The struct of a reading record with these string lengths (cached; the cache stays small whatever arrives)."""
    st = _READING_STRUCTS.get(lengths)
    if st is None:
        st = struct.Struct(f">4sQ32sBH{lengths[0]}sH{lengths[1]}sqqH{lengths[2]}sI")
        if len(_READING_STRUCTS) < 512:
            _READING_STRUCTS[lengths] = st
    return st


def _reading_bytes(seq: int, prev_hash: bytes, r: Reading) -> bytes | None:
    """Fast path for the common case (ASCII ids, in-range values): one struct.pack; None -> use the general path."""
    return reading_record_bytes(seq, prev_hash, r.meter_id, r.obis, (r.taken_at - _EPOCH) // _MS, r.value, r.unit,
                                r.quality)


def reading_record_bytes(seq: int, prev_hash: bytes, meter_id: str, obis: str, taken_at_ms: int, value: int,
                         unit: str, quality: int) -> bytes | None:
    """The canonical bytes of a reading record from its stored columns (ASCII strings, values in range,
    seq >= 1, 32-byte prev_hash: one struct.pack); None -> build the Reading and use `canonical_bytes`."""
    try:
        m, o, u = meter_id.encode("ascii"), obis.encode("ascii"), unit.encode("ascii")
        lengths = (len(m), len(o), len(u))
        if seq < 1 or len(prev_hash) != 32 or max(lengths) > 0xFFFF:
            return None
        return _reading_struct(lengths).pack(RECORD_MAGIC, seq, prev_hash, KIND_READING, lengths[0], m, lengths[1],
                                             o, taken_at_ms, value, lengths[2], u, quality)
    except (UnicodeEncodeError, struct.error, TypeError, AttributeError):
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


def wire_bytes(rec: ChainRecord) -> bytes:
    """A record as it travels in PushRequest.chain_records: its canonical bytes, or a tombstone's wire layout."""
    b = rec.body
    if isinstance(b, Tombstone):
        if len(rec.prev_hash) != 32 or len(b.record_hash) != 32:
            raise EncodingError(f"tombstone seq {rec.seq}: hashes must be 32 bytes")
        return TOMBSTONE_MAGIC + struct.pack(">Q32sQ32s", rec.seq, rec.prev_hash, b.first_seq, b.record_hash)
    return canonical_bytes(rec.seq, rec.prev_hash, b)


_TOMBSTONE = struct.Struct(">4sQ32sQ32s")
_EVENT_HEAD = struct.Struct(">4sQ32sB")


class _Cursor:
    """Strict reader over one wire record (general path: events, non-ASCII readings)."""

    __slots__ = ("b", "p")

    def __init__(self, b: bytes, p: int) -> None:
        self.b, self.p = b, p

    def take(self, n: int) -> bytes:
        if self.p + n > len(self.b):
            raise EncodingError("record truncated")
        out = self.b[self.p:self.p + n]
        self.p += n
        return out

    def str(self) -> str:
        return self.take(int.from_bytes(self.take(2), "big")).decode("utf-8")

    def int(self, n: int, signed: bool) -> int:
        return int.from_bytes(self.take(n), "big", signed=signed)


def decode_wire(b: bytes, instants: dict | None = None) -> tuple[ChainRecord, bytes]:
    """One wire record -> (record, its hash); EncodingError (naming the seq when known) if not well-formed.

    Strict: canonical_bytes(decoded) == b for readings and events, so the hash is SHA-256 of `b`.
    `instants` caches taken_at_ms -> datetime across a batch (a poll shares one instant).
    """
    seq = None
    try:
        st = None
        if b[:4] == RECORD_MAGIC and len(b) > 47 and b[44] == KIND_READING:
            try:
                ml = (b[45] << 8) | b[46]
                ol = (b[47 + ml] << 8) | b[48 + ml]
                p = 65 + ml + ol
                st = _reading_struct((ml, ol, (b[p] << 8) | b[p + 1]))
            except IndexError:
                st = None       # truncated: the general path says where
            if st is not None and len(b) == st.size:     # else the general path says what is wrong
                _, seq, prev, _, _, m, _, o, ms, value, _, u, quality = st.unpack(b)
                at = instants.get(ms) if instants is not None else None
                if at is None:
                    at = _EPOCH + ms * _MS
                    if instants is not None:
                        instants[ms] = at
                if seq < 1:
                    raise EncodingError("seq 0")
                return (ChainRecord(seq, prev, Reading(m.decode("utf-8"), o.decode("utf-8"), at, value,
                                                       u.decode("utf-8"), quality)),
                        hashlib.sha256(b).digest())
        if b[:4] == TOMBSTONE_MAGIC:
            if len(b) != _TOMBSTONE.size:
                raise EncodingError(f"tombstone is {len(b)} bytes, not {_TOMBSTONE.size}")
            _, seq, prev, first, h = _TOMBSTONE.unpack(b)
            if not 1 <= first <= seq:
                raise EncodingError(f"tombstone first_seq {first} outside 1..{seq}")
            return ChainRecord(seq, prev, Tombstone(first, h)), h
        if b[:4] != RECORD_MAGIC or len(b) < _EVENT_HEAD.size:
            raise EncodingError("not a record (magic MLR1 or MLT1)")
        _, seq, prev, kind = _EVENT_HEAD.unpack_from(b)
        if seq < 1:
            raise EncodingError("seq 0")
        c = _Cursor(b, _EVENT_HEAD.size)
        if kind == KIND_READING:
            meter, obis = c.str(), c.str()
            ms, value = c.int(8, True), c.int(8, True)
            body: Reading | Event = Reading(meter, obis, _EPOCH + ms * _MS, value, c.str(), c.int(4, False))
        elif kind == KIND_EVENT:
            ekind, meter = c.str(), c.str()
            ms = c.int(8, True)
            body = Event(ekind, meter, _EPOCH + ms * _MS, c.take(c.int(4, False)))
        else:
            raise EncodingError(f"unknown record kind {kind}")
        if c.p != len(b):
            raise EncodingError(f"{len(b) - c.p} bytes after the record")
        return ChainRecord(seq, prev, body), hashlib.sha256(b).digest()
    except EncodingError as exc:
        raise EncodingError(f"record {'seq ' + str(seq) if seq else 'on the wire'}: {exc}") from None
    except (IndexError, ValueError, TypeError, OverflowError, struct.error) as exc:
        # bytes that end early, invalid UTF-8, an instant outside the calendar, a unit Reading refuses
        raise EncodingError(f"record {'seq ' + str(seq) if seq else 'on the wire'}: {exc}") from None


def _reading_layout(b: bytes):
    """(struct, (meter, obis, unit) byte lengths) of the reading record `b` seems to be, sniffed from its length
    fields, if its size fits that layout; None otherwise (the record-by-record path names what is wrong).
    The unpacked magic, kind and length fields still have to be checked."""
    if not (b[:4] == RECORD_MAGIC and len(b) > 47 and b[44] == KIND_READING):
        return None
    try:
        ml = (b[45] << 8) | b[46]
        ol = (b[47 + ml] << 8) | b[48 + ml]
        p = 65 + ml + ol
        ul = (b[p] << 8) | b[p + 1]
        st = _reading_struct((ml, ol, ul))
    except IndexError:
        return None
    return (st, (ml, ol, ul)) if st.size == len(b) else None


def _uniform_reading_struct(blobs: Sequence[bytes]):
    """(struct, (meter, obis, unit) byte lengths) of the first blob's reading layout, if every blob is a
    reading record of exactly that size; None otherwise (the caller takes the record-by-record path, which
    names the offender). The unpacked magic, kind and length fields still have to be checked per record."""
    layout = _reading_layout(blobs[0])
    return layout if layout is not None and set(map(len, blobs)) == {layout[0].size} else None


# At most this many record sizes (layouts) in one batch take the column path (a poll round has a few).
_MAX_LAYOUTS = 32


def _unpack_readings(blobs: Sequence[bytes]) -> tuple[tuple, ...] | None:
    """Every blob unpacked as a reading record, as columns (one tuple per struct field), or None when one is
    not a well-formed reading record of the layout its size suggests. One layout: one iter_unpack over the
    joined bytes; several (a poll round of registers whose OBIS codes and units differ in length): one
    unpack per record with the struct of its size, sniffed once per size. Each record's unpacked magic, kind and string lengths are checked
    against the layout it was unpacked with, so two layouts of the same size cannot be confused: when they
    differ, every record is unpacked again with the layout sniffed from its own length fields."""
    sizes = list(map(len, blobs))
    sample = dict(zip(sizes, blobs))
    if len(sample) > _MAX_LAYOUTS:
        return None
    layouts = {}
    for size, b in sample.items():
        layout = _reading_layout(b)
        if layout is None:
            return None
        layouts[size] = layout
    if len(layouts) == 1:
        st, lens = layout
        rows = list(st.iter_unpack(b"".join(blobs)))
    else:
        unpack = {size: st.unpack for size, (st, _) in layouts.items()}
        rows = [unpack[len(b)](b) for b in blobs]
    cols = tuple(zip(*rows))
    if set(cols[0]) != {RECORD_MAGIC} or set(cols[3]) != {KIND_READING}:
        return None
    if not set(zip(sizes, cols[4], cols[6], cols[10])) <= {(size, *lens) for size, (_, lens) in layouts.items()}:
        # two layouts of the same size (e.g. meter ids of different lengths): sniff every record's own layout
        each = list(map(_reading_layout, blobs))
        if None in each:
            return None
        cols = tuple(zip(*[st.unpack(b) for (st, _), b in zip(each, blobs)]))
        if (set(cols[0]) != {RECORD_MAGIC} or set(cols[3]) != {KIND_READING}
                or list(zip(cols[4], cols[6], cols[10])) != [lens for _, lens in each]):
            return None
    return cols


def decode_wire_batch(blobs: Sequence[bytes]) -> tuple[list[ChainRecord], list[bytes]]:
    """`decode_wire` over a batch -> (records, hashes), EncodingError on the first bad record.

    Fast path when every record is a reading with the same string lengths (a poll round of one meter
    model: the usual catch-up batch): one struct.iter_unpack over the joined bytes, whose unpacked magic,
    kind and length fields are then checked for every record, so a record of any other layout falls
    back to the record-by-record path. Both paths accept exactly the same bytes.
    """
    if not blobs:
        return [], []
    layout = _uniform_reading_struct(blobs)
    if layout is None:
        return _decode_each(blobs)
    st, (ml, ol, ul) = layout
    rows = list(st.iter_unpack(b"".join(blobs)))
    if {(r[0], r[3], r[4], r[6], r[10]) for r in rows} != {(RECORD_MAGIC, KIND_READING, ml, ol, ul)}:
        return _decode_each(blobs)
    strings: dict[bytes, str] = {}
    instants: dict[int, datetime] = {}
    out: list[ChainRecord] = []
    append = out.append
    seq = None
    try:
        for _, seq, prev, _, _, m, _, o, ms, value, _, u, quality in rows:
            if seq < 1:
                raise EncodingError("seq 0")
            at = instants.get(ms)
            if at is None:
                at = instants[ms] = _EPOCH + ms * _MS
            meter, obis, unit = strings.get(m), strings.get(o), strings.get(u)
            if meter is None:
                meter = strings[m] = m.decode("utf-8")
            if obis is None:
                obis = strings[o] = o.decode("utf-8")
            if unit is None:
                unit = strings[u] = u.decode("utf-8")
            append(ChainRecord(seq, prev, Reading(meter, obis, at, value, unit, quality)))
    except EncodingError as exc:
        raise EncodingError(f"record seq {seq}: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise EncodingError(f"record seq {seq}: {exc}") from None
    sha = hashlib.sha256
    return out, [sha(b).digest() for b in blobs]


class ReadingColumns:
    """A decoded batch of readings as columns (the catch-up fast path, `decode_wire_columns`).

    Carries what the head-end verifies and stores (seq, prev_hash, the reading's stored fields, each
    record's hash) without building a ChainRecord/Reading per record. It is also a read-only sequence
    of ChainRecord (built on first use), so code that does not know the columns still sees the records.
    """

    __slots__ = ("seqs", "prevs", "meters", "obis", "taken_at_ms", "values", "units", "qualities", "hashes",
                 "_records")

    def __init__(self, seqs, prevs, meters, obis, taken_at_ms, values, units, qualities, hashes) -> None:
        self.seqs, self.prevs, self.meters, self.obis = list(seqs), list(prevs), list(meters), list(obis)
        self.taken_at_ms, self.values, self.units, self.qualities = list(taken_at_ms), list(values), list(units), \
            list(qualities)
        self.hashes = list(hashes)
        self._records: list[ChainRecord] | None = None

    def tail(self, start: int) -> ReadingColumns:
        """The records from index `start` on, as columns."""
        return ReadingColumns(self.seqs[start:], self.prevs[start:], self.meters[start:], self.obis[start:],
                              self.taken_at_ms[start:], self.values[start:], self.units[start:],
                              self.qualities[start:], self.hashes[start:])

    def records(self) -> list[ChainRecord]:
        """The same batch as ChainRecords (what `decode_wire_batch` returns for these bytes)."""
        if self._records is None:
            instants: dict[int, datetime] = {}
            out = []
            for seq, prev, m, o, ms, v, u, q in zip(self.seqs, self.prevs, self.meters, self.obis, self.taken_at_ms,
                                                    self.values, self.units, self.qualities):
                at = instants.get(ms)
                if at is None:
                    at = instants[ms] = _EPOCH + ms * _MS
                out.append(ChainRecord(seq, prev, Reading(m, o, at, v, u, q)))
            self._records = out
        return self._records

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i):
        return self.records()[i]

    def __iter__(self):
        return iter(self.records())


def decode_wire_columns(blobs: Sequence[bytes]) -> ReadingColumns | None:
    """The batch as ReadingColumns when every record is a well-formed reading (a poll round or a catch-up
    batch; string lengths may differ between records, up to _MAX_LAYOUTS record sizes); None otherwise ->
    `decode_wire_batch` (which decodes the generic batch, or names the record that is malformed). Accepts
    only bytes `decode_wire_batch` accepts, with the same records and hashes (SHA-256 of each record's
    received bytes)."""
    if not blobs:
        return None
    cols = _unpack_readings(blobs)
    if cols is None:
        return None
    magic, seqs, prevs, kinds, mls, ms_, ols, os_, times, values, uls, us, qualities = cols
    if min(seqs) < 1:
        return None
    try:
        text = {b: b.decode("utf-8") for b in set(ms_) | set(os_) | set(us)}
        for ms in set(times):
            _EPOCH + ms * _MS                       # an instant outside the calendar: the generic path refuses it
    except (ValueError, OverflowError):
        return None
    get = text.__getitem__
    units = list(map(get, us))
    if not set(units) <= UNITS.keys():
        return None                                 # Reading refuses the unit: the generic path says which record
    sha = hashlib.sha256
    return ReadingColumns(seqs, prevs, map(get, ms_), map(get, os_), times, values, units, qualities,
                          [sha(b).digest() for b in blobs])


def _decode_each(blobs: Sequence[bytes]) -> tuple[list[ChainRecord], list[bytes]]:
    records, hashes, instants = [], [], {}
    for b in blobs:
        rec, h = decode_wire(b, instants)
        records.append(rec)
        hashes.append(h)
    return records, hashes


def wire_meter_id(b: bytes) -> str | None:
    """The meter id a wire record speaks for, read without decoding the rest (access checks); None for a
    tombstone or bytes that are not a record (which `decode_wire` then refuses)."""
    try:
        if b[:4] != RECORD_MAGIC:
            return None
        p = 47
        if b[44] == KIND_EVENT:        # the event's kind comes before its meter id
            p += (b[45] << 8) | b[46]
            p += 2
        elif b[44] != KIND_READING:
            return None
        n = (b[p - 2] << 8) | b[p - 1]
        if p + n > len(b):
            return None
        return b[p:p + n].decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        return None


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
