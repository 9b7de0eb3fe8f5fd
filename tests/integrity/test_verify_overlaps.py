"""Head-end verification when a batch overlaps what is held: identical prefixes, and a tombstone run pruned
on the gateway after part of it was delivered (ack lost) is trimmed to what the head-end lacks."""

from __future__ import annotations

from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import (ChainRecord, Tombstone, chain_head, first_break, hash_of, link, prune_run,
                             public_bytes, sign_head)
from meterlink.headend.verify import Refusal, verify_batch
from meterlink.readings import Reading

from .conftest import START

KEY = Ed25519PrivateKey.generate()
RECS = link([Reading("M1", "32.7.0", START + timedelta(minutes=i), 230_000 + i, "mV") for i in range(14)])
HASHES = {r.seq: hash_of(r) for r in RECS}


def decide(batch: list[ChainRecord], held_up_to: int):
    seq, h = chain_head(batch)
    return verify_batch("gw", batch, h, sign_head(KEY, "gw", seq, h), public_bytes(KEY), held_up_to,
                        HASHES[held_up_to], HASHES.get)


def test_a_run_pruned_after_part_of_it_was_delivered_is_trimmed_to_the_missing_part():
    # held: 1..10 (the ack for 6..10 was lost); the gateway, acked up to 5, pruned 6..12 under disk pressure
    batch = [prune_run(RECS[5:12])] + RECS[12:]
    v = decide(batch, 10)
    assert v.accepted and v.duplicates == 0
    assert [(r.seq, r.body.first_seq if isinstance(r.body, Tombstone) else r.seq) for r in v.new] == \
        [(12, 11), (13, 13), (14, 14)]
    assert first_break(RECS[:10] + v.new) is None          # the held chain continues through the trimmed run


def test_a_held_prefix_followed_by_a_straddling_run_counts_the_prefix_as_duplicates():
    batch = RECS[2:5] + [prune_run(RECS[5:12])] + RECS[12:]
    v = decide(batch, 10)
    assert v.accepted and v.duplicates == 3 and [r.seq for r in v.new] == [12, 13, 14]
    assert first_break(RECS[:10] + v.new) is None


def test_a_straddling_run_that_does_not_link_to_what_is_held_is_a_replay():
    other = link([Reading("M1", "32.7.0", START, 1, "mV")] * 14)
    batch = [prune_run(other[5:12])] + other[12:]
    assert decide(batch, 10).refusal is Refusal.REPLAY


def test_a_batch_entirely_held_with_the_same_content_is_all_duplicates():
    v = decide(RECS[3:9], 10)
    assert v.accepted and v.duplicates == 6 and v.new == []
