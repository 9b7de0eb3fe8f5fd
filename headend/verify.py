"""Head-end verification of a pushed batch: continuity from the stored chain head, hashes, head signature; pure.

Never touches a database or the network: the service passes in the stored head, the gateway's
registered public key and a lookup for the hash of one already-held record. The result says which
records are new, how many are identical re-sends, or why the whole batch is refused (the reason
codes are the proto enum `meterlink.v1.Refusal`, documented in docs/integrity.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

from meterlink.chain import GENESIS, ChainRecord, ReadingColumns, Tombstone, first_seq, hash_of, verify_head


class Refusal(enum.IntEnum):
    """Mirrors `meterlink.v1.Refusal` (same numbers), without the proto prefix."""

    NONE = 0
    ALTERED = 1
    REORDERED = 2
    GAP = 3
    REPLAY = 4
    BAD_SIGNATURE = 5
    UNKNOWN_GATEWAY = 6
    MALFORMED = 7


@dataclass(frozen=True)
class Verdict:
    refusal: Refusal
    detail: str = ""
    new: list[ChainRecord] = field(default_factory=list)   # records after the stored head, in order
    duplicates: int = 0                                     # records identical to what is held
    new_hashes: list[bytes] = field(default_factory=list)  # hash of each record in `new`

    @property
    def accepted(self) -> bool:
        return self.refusal is Refusal.NONE


def _refuse(reason: Refusal, gateway_id: str, detail: str) -> Verdict:
    return Verdict(reason, f"gateway {gateway_id}: {detail}")


def verify_batch(gateway_id: str, records: list[ChainRecord], head_hash: bytes, signature: bytes,
                 public_key: bytes | None, stored_seq: int, stored_hash: bytes,
                 held_hash: Callable[[int], bytes | None], hashes: list[bytes] | None = None) -> Verdict:
    """Decide on one batch.

    `stored_seq`/`stored_hash` is the head-end's chain head for the gateway (0/GENESIS when none);
    `held_hash(seq)` returns the hash of an already-held record (seq <= stored_seq). Checks, in order:
    known gateway, seq order, links inside the batch, claimed head == last record's hash, signature,
    then continuity with what is held (gap, identical re-send, replay, altered link). A tombstone run
    that starts inside what is held (pruned after part of it was delivered) is trimmed to the part
    the head-end lacks.

    `hashes`: each record's hash when the caller already has them (SHA-256 of the canonical bytes that
    arrived on the wire, `meterlink.chain.decode_wire`); computed from the records otherwise.
    `records` may be `ReadingColumns` (a catch-up batch of readings decoded as columns): the same checks
    on its columns, and `new` is then columns too.
    """
    if public_key is None:
        return _refuse(Refusal.UNKNOWN_GATEWAY, gateway_id, "no public key registered for this gateway")
    if not records:
        return Verdict(Refusal.NONE)
    cols = records if type(records) is ReadingColumns else None    # readings only: no tombstone, no Python objects
    if cols is not None:
        seqs = starts = cols.seqs
        prevs = cols.prevs
        if hashes is None or len(hashes) != len(records):
            hashes = cols.hashes
    else:
        seqs = [r.seq for r in records]
        starts = [r.body.first_seq if type(r.body) is Tombstone else r.seq for r in records]   # first_seq(r), inlined
        prevs = [r.prev_hash for r in records]
    n = len(records)
    plain = starts[0] >= 1 and seqs == starts == list(range(starts[0], starts[0] + n))   # the usual batch
    for i in (() if plain else range(n)):     # find the first record that breaks the order, as before
        if starts[i] > seqs[i] or starts[i] < 1:
            return _refuse(Refusal.MALFORMED, gateway_id, f"seq {seqs[i]}: tombstone run starts at {starts[i]}")
        if i and starts[i] != seqs[i - 1] + 1:
            if starts[i] <= seqs[i - 1] or (seqs[i - 1] + 1) in starts[i + 1:]:
                return _refuse(Refusal.REORDERED, gateway_id,
                               f"seq {seqs[i]} follows seq {seqs[i - 1]} in the batch")
            return _refuse(Refusal.GAP, gateway_id, f"seq {seqs[i - 1] + 1} missing before seq {starts[i]}")
    if hashes is None or len(hashes) != len(records):
        hashes = [hash_of(r) for r in records]
    linked = prevs[1:] == hashes[:-1]     # every record links to the one before
    for i in (() if linked else range(1, n)):
        if prevs[i] != hashes[i - 1]:
            linked_elsewhere = hashes[i - 1] in prevs or prevs[i] in hashes or prevs[i] == stored_hash
            return _refuse(Refusal.REORDERED if linked_elsewhere else Refusal.ALTERED, gateway_id,
                           f"seq {seqs[i]} does not link to seq {seqs[i - 1]}"
                           + (" (records swapped)" if linked_elsewhere else
                              f": seq {seqs[i - 1]} was altered after it was chained"))
    last_seq = seqs[-1]
    if not signature or not head_hash:
        return _refuse(Refusal.BAD_SIGNATURE, gateway_id, f"batch up to seq {last_seq} is not signed")
    if head_hash != hashes[-1]:
        return _refuse(Refusal.ALTERED, gateway_id,
                       f"seq {last_seq} does not hash to the signed chain head (content altered)")
    if not verify_head(public_key, gateway_id, last_seq, head_hash, signature):
        return _refuse(Refusal.BAD_SIGNATURE, gateway_id,
                       f"head signature for seq {last_seq} not made by the registered key")
    first = starts[0]
    if first > stored_seq + 1:
        return _refuse(Refusal.GAP, gateway_id, f"seq {stored_seq + 1}..{first - 1} missing (head-end holds up "
                                                f"to {stored_seq})")
    if first == stored_seq + 1:
        if prevs[0] != stored_hash:
            return _refuse(Refusal.ALTERED, gateway_id, f"seq {first} does not link to held seq {stored_seq} "
                                                        f"(the gateway's record {stored_seq} differs from the "
                                                        f"one held)")
        return Verdict(Refusal.NONE, new=records if cols is not None else list(records), new_hashes=hashes)
    # The batch overlaps what is held. Its last record at or below the held head must be a record the
    # head-end holds with the same hash; by the chain, every record before it is then identical too.
    if seqs[0] <= stored_seq:
        idx = max(i for i in range(len(records)) if seqs[i] <= stored_seq)
        held = stored_hash if seqs[idx] == stored_seq else held_hash(seqs[idx])
        if held != hashes[idx]:
            return _refuse(Refusal.REPLAY, gateway_id, f"seq {first}..{seqs[idx]} already held with other "
                                                       f"content (replayed or forked batch)")
        duplicates = idx + 1
        if cols is not None:       # readings only: the rest starts at seqs[idx] + 1 <= stored_seq + 1
            if idx + 1 < n and seqs[idx + 1] != stored_seq + 1:
                return _refuse(Refusal.REPLAY, gateway_id, f"seq {seqs[idx + 1]} overlaps held seq {stored_seq}")
            return Verdict(Refusal.NONE, new=cols.tail(idx + 1), duplicates=duplicates, new_hashes=hashes[idx + 1:])
        rest = list(records[idx + 1:])
    else:   # the first record is a tombstone run that starts inside what is held
        held = GENESIS if first == 1 else held_hash(first - 1)
        if held != records[0].prev_hash:
            return _refuse(Refusal.REPLAY, gateway_id, f"seq {first}..{seqs[0]} does not link to held seq "
                                                       f"{first - 1} (replayed or forked batch)")
        rest, duplicates = list(records), 0
    if rest and first_seq(rest[0]) != stored_seq + 1:
        r = rest[0]
        if not isinstance(r.body, Tombstone):
            return _refuse(Refusal.REPLAY, gateway_id, f"seq {r.seq} overlaps held seq {stored_seq}")
        # a run pruned after part of it was delivered: keep only the part the head-end lacks
        rest[0] = ChainRecord(r.seq, stored_hash, Tombstone(stored_seq + 1, r.body.record_hash))
    return Verdict(Refusal.NONE, new=rest, duplicates=duplicates, new_hashes=hashes[len(records) - len(rest):])
