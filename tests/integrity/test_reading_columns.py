"""The catch-up fast path (readings decoded as columns) verifies, refuses and stores exactly as the record path."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import (GENESIS, ChainRecord, Event, ReadingColumns, chain_head, decode_wire_batch,
                             decode_wire_columns, link, public_bytes, sign_head, wire_bytes)
from meterlink.headend.chainstore import SqliteChainStore
from meterlink.headend.repo_sqlite import SqliteReadingRepository
from meterlink.headend.verify import verify_batch
from meterlink.readings import Reading

from .conftest import START

KEY = Ed25519PrivateKey.generate()
PUB = public_bytes(KEY)


def batch(n: int = 12, after_seq: int = 0, after_hash: bytes = GENESIS) -> list[ChainRecord]:
    bodies = [Reading(f"MTR{i % 3:03d}", "1.8.0" if i % 2 else "2.8.0", START + timedelta(minutes=15 * (i // 3)),
                      1000 * i - 7, "Wh", i % 4) for i in range(n)]
    return link(bodies, after_seq, after_hash)


def test_columns_decode_to_the_same_records_and_hashes_as_the_record_path():
    recs = batch()
    wire = [wire_bytes(r) for r in recs]
    cols = decode_wire_columns(wire)
    assert type(cols) is ReadingColumns and len(cols) == len(recs)
    assert (cols.records(), cols.hashes) == decode_wire_batch(wire)
    assert cols.tail(5).records() == recs[5:] and cols.tail(5).hashes == cols.hashes[5:]


def test_a_poll_round_of_several_layouts_decodes_as_columns_too():
    """Registers whose OBIS codes, units and meter ids differ in length (1.8.0 Wh, 32.7.0 mV, 1.7.0 W, a longer
    meter id) in one batch: one column batch, the same records and hashes as the record path."""
    regs = [("1.8.0", "Wh"), ("32.7.0", "mV"), ("1.7.0", "W"), ("2.8.0", "Wh")]
    bodies = [Reading(f"MTR{i % 3:0{3 + i % 2}d}", regs[i % 4][0], START + timedelta(minutes=15 * (i // 8)), 10 * i - 3,
                      regs[i % 4][1], i % 3) for i in range(40)]
    wire = [wire_bytes(r) for r in link(bodies)]
    assert len(set(map(len, wire))) > 2
    cols = decode_wire_columns(wire)
    assert type(cols) is ReadingColumns
    assert (cols.records(), cols.hashes) == decode_wire_batch(wire)


def test_two_layouts_of_the_same_size_are_not_confused():
    """1.8.0 + Wh and 32.7.0 + W make records of the same size with different string boundaries: decoded
    right as columns (each record with its own layout), never mixed up."""
    bodies = [Reading("MTR001", "1.8.0", START, 5, "Wh"), Reading("MTR001", "32.7.0", START, 6, "W"),
              Reading("MTR001", "1.7.0", START, 7, "W")]
    wire = [wire_bytes(r) for r in link(bodies)]
    assert len(wire[0]) == len(wire[1])
    cols = decode_wire_columns(wire)
    assert cols is not None and (cols.records(), cols.hashes) == decode_wire_batch(wire)
    wire[1] = wire[1][:47] + b"\xff" + wire[1][48:]                 # and a bad byte in one of them still refuses
    assert decode_wire_columns(wire) is None


@pytest.mark.parametrize("layouts", ["one", "several"])
@pytest.mark.parametrize("spoil", ["event", "seq0", "utf8", "unit", "instant", "truncated", "magic", "kind"])
def test_anything_but_well_formed_readings_takes_the_record_path(spoil, layouts):
    recs = batch(4)
    if layouts == "several":      # a fifth record of another layout: the per-size unpack path
        recs = link([r.body for r in recs] + [Reading("MTR0001", "32.7.0", START, 230_000, "mV")])
    wire = [wire_bytes(r) for r in recs]
    if spoil == "event":
        wire[2] = wire_bytes(ChainRecord(3, recs[1].prev_hash, Event("relay.open", "MTR000", START, b"x")))
    elif spoil == "magic":
        wire[2] = b"MLR2" + wire[2][4:]
    elif spoil == "kind":
        wire[2] = wire[2][:44] + b"\x03" + wire[2][45:]
    elif spoil == "seq0":
        wire[0] = wire[0][:4] + bytes(8) + wire[0][12:]
    elif spoil == "utf8":
        wire[1] = wire[1][:47] + b"\xff" + wire[1][48:]
    elif spoil == "unit":
        wire[3] = wire[3].replace(b"Wh", b"Wx")
    elif spoil == "instant":
        p = 47 + 6 + 2 + 5
        wire[2] = wire[2][:p] + (2**62).to_bytes(8, "big") + wire[2][p + 8:]
    else:
        wire[1] = wire[1][:-1]
    assert decode_wire_columns(wire) is None


def verdicts(recs, stored_seq=0, stored_hash=GENESIS, held=lambda s: None, head=None, sig=None):
    seq, h = chain_head(recs)
    head = h if head is None else head
    sig = sign_head(KEY, "gw", seq, h) if sig is None else sig
    cols = decode_wire_columns([wire_bytes(r) for r in recs])
    assert cols is not None
    a = verify_batch("gw", recs, head, sig, PUB, stored_seq, stored_hash, held)
    b = verify_batch("gw", cols, head, sig, PUB, stored_seq, stored_hash, held, cols.hashes)
    return a, b


def test_verdicts_agree_on_new_overlapping_and_refused_batches():
    recs = batch(10)
    hashes = decode_wire_batch([wire_bytes(r) for r in recs])[1]
    cases = [
        verdicts(recs),                                                              # all new
        verdicts(recs, 4, hashes[3], lambda s: hashes[s - 1]),                       # 4 duplicates, 6 new
        verdicts(recs, 10, hashes[9], lambda s: hashes[s - 1]),                      # all duplicates
        verdicts(recs, 4, bytes(32), lambda s: bytes(32)),                           # replay
        verdicts(recs, 0, bytes(32)),                                                # first does not link
        verdicts(batch(5, 7, bytes(32))),                                            # gap
        verdicts(recs, head=bytes(32)),                                              # altered head
        verdicts(recs, sig=bytes(64)),                                               # bad signature
        verdicts(recs[:3] + recs[4:]),                                               # dropped record
        verdicts(recs[:3] + [recs[4], recs[3]] + recs[5:]),                          # swapped
        verdicts(recs[:3] + [ChainRecord(4, recs[2].prev_hash, recs[3].body)] + recs[4:]),   # altered link
    ]
    for a, b in cases:
        assert (b.refusal, b.detail, b.duplicates, b.new_hashes) == (a.refusal, a.detail, a.duplicates, a.new_hashes)
        assert list(b.new) == a.new


def test_columns_store_the_same_rows_hashes_and_head_and_fire_the_hooks(tmp_path):
    recs = batch(30)
    cols = decode_wire_columns([wire_bytes(r) for r in recs])
    dumps, fired = [], []
    for name, new, hashes in (("records", recs, None), ("columns", cols, cols.hashes)):
        path = tmp_path / f"{name}.db"
        repo, chain = SqliteReadingRepository(path), SqliteChainStore(path)
        repo.commit_hooks.append(lambda gw, result, name=name: fired.append((name, gw, result.accepted)))
        assert chain.commit_with_readings(repo, "gw", 0, new, 1234, hashes) == 30
        dump = [list(repo._db.execute(f"SELECT * FROM {t} ORDER BY 1, 2"))
                for t in ("gateway_record", "gateway_chain_hash", "gateway_chain_head", "gateway_sync")]
        dumps.append(dump)
        repo.close()
        chain.close()
    assert dumps[0] == dumps[1] and len(dumps[0][0]) == 30
    assert fired == [("records", "gw", 30), ("columns", "gw", 30)]
