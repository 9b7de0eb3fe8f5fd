"""Property tests of the hash chain: any edit, drop, reorder or insert breaks verification."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings, strategies as st

from meterlink.chain import (GENESIS, ChainRecord, Event, canonical_bytes, chain_head, first_break, hash_of,
                             head_message, link, prune_run, public_bytes, sign_head, verify_head)
from meterlink.headend.verify import Refusal, verify_batch
from meterlink.readings import Reading

from .conftest import START

texts = st.text(min_size=1, max_size=12)
readings_st = st.builds(
    Reading, meter_id=texts, obis=st.sampled_from(["1.8.0", "2.8.0", "32.7.0", "31.7.0", "1.7.0"]),
    taken_at=st.integers(0, 10**6).map(lambda m: START + timedelta(minutes=m)),
    value=st.integers(-(2**63), 2**63 - 1), unit=st.sampled_from(["Wh", "W", "mV", "mA"]),
    quality=st.integers(0, 63))
events_st = st.builds(Event, kind=st.sampled_from(["relay.open", "credit.topup", "card.inserted"]),
                      meter_id=texts, at=st.integers(0, 10**6).map(lambda m: START + timedelta(minutes=m)),
                      payload=st.binary(max_size=40))
bodies = st.lists(st.one_of(readings_st, events_st), min_size=2, max_size=25)
KEY = Ed25519PrivateKey.generate()
PUB = public_bytes(KEY)


def verdict(records: list[ChainRecord], gw: str = "gw") -> Refusal:
    seq, h = chain_head(records)
    return verify_batch(gw, records, h, sign_head(KEY, gw, seq, h) if records else b"", PUB, 0, GENESIS,
                        lambda s: None).refusal


@settings(max_examples=20, deadline=None)
@given(bodies)
def test_an_untouched_chain_verifies_and_its_signed_head_is_accepted(bs):
    recs = link(bs)
    assert first_break(recs) is None
    assert verdict(recs) is Refusal.NONE


@settings(max_examples=20, deadline=None)
@given(bodies, st.data())
def test_editing_any_field_of_any_record_breaks_the_chain_or_the_signed_head(bs, data):
    recs = link(bs)
    seq, h = chain_head(recs)
    sig = sign_head(KEY, "gw", seq, h)
    i = data.draw(st.integers(0, len(recs) - 1))
    body = recs[i].body
    if isinstance(body, Reading):
        field = data.draw(st.sampled_from(["meter_id", "obis", "value", "quality", "taken_at"]))
        new = {"meter_id": body.meter_id + "x", "obis": body.obis + ".1", "quality": body.quality ^ 1,
               "value": body.value + 1 if body.value < 2**63 - 1 else body.value - 1,
               "taken_at": body.taken_at + timedelta(milliseconds=1)}[field]
    else:
        field = data.draw(st.sampled_from(["kind", "meter_id", "payload", "at"]))
        new = {"kind": body.kind + "x", "meter_id": body.meter_id + "x", "payload": body.payload + b"\0",
               "at": body.at + timedelta(milliseconds=1)}[field]
    tampered = recs[:i] + [ChainRecord(recs[i].seq, recs[i].prev_hash, replace(body, **{field: new}))] + recs[i + 1:]
    broken = first_break(tampered)
    if i < len(recs) - 1:
        assert broken is not None and broken.seq == recs[i + 1].seq
    # the gateway signed the original head: the head-end refuses the tampered batch either way
    result = verify_batch("gw", tampered, h, sig, PUB, 0, GENESIS, lambda s: None)
    assert result.refusal is Refusal.ALTERED


@settings(max_examples=20, deadline=None)
@given(bodies, st.data())
def test_dropping_any_record_is_refused_as_a_gap_or_altered(bs, data):
    recs = link(bs)
    i = data.draw(st.integers(0, len(recs) - 1))
    dropped = recs[:i] + recs[i + 1:]
    if i < len(recs) - 1:
        assert first_break(dropped) is not None
        seq, h = chain_head(recs)
        assert verify_batch("gw", dropped, h, sign_head(KEY, "gw", seq, h), PUB, 0, GENESIS,
                            lambda s: None).refusal in (Refusal.GAP,)
    else:  # dropping the last record is only a shorter batch, but no longer the signed head
        seq, h = chain_head(recs)
        assert verify_batch("gw", dropped, h, sign_head(KEY, "gw", seq, h), PUB, 0, GENESIS,
                            lambda s: None).refusal is Refusal.ALTERED


@settings(max_examples=20, deadline=None)
@given(bodies, st.data())
def test_swapping_two_records_is_refused_as_reordered(bs, data):
    recs = link(bs)
    i = data.draw(st.integers(0, len(recs) - 2))
    j = data.draw(st.integers(i + 1, len(recs) - 1))
    swapped = list(recs)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert first_break(swapped) is not None
    seq, h = chain_head(recs)
    assert verify_batch("gw", swapped, h, sign_head(KEY, "gw", seq, h), PUB, 0, GENESIS,
                        lambda s: None).refusal is Refusal.REORDERED
    # swapping only the seq numbers (bodies and links stay in place) is caught by the links
    assume(recs[i].body != recs[j].body)
    relabelled = list(recs)
    relabelled[i] = ChainRecord(recs[j].seq, recs[j].prev_hash, recs[i].body)
    relabelled[j] = ChainRecord(recs[i].seq, recs[i].prev_hash, recs[j].body)
    relabelled.sort(key=lambda r: r.seq)
    assert first_break(relabelled) is not None
    assert verify_batch("gw", relabelled, h, sign_head(KEY, "gw", seq, h), PUB, 0, GENESIS,
                        lambda s: None).refusal in (Refusal.REORDERED, Refusal.ALTERED)


@settings(max_examples=20, deadline=None)
@given(bodies, st.one_of(readings_st, events_st), st.data())
def test_inserting_a_record_anywhere_breaks_the_chain(bs, extra, data):
    recs = link(bs)
    i = data.draw(st.integers(0, len(recs)))
    forged = ChainRecord(i + 1, recs[i - 1].seq and hash_of(recs[i - 1]) if i else GENESIS, extra)
    shifted = [ChainRecord(r.seq + 1, r.prev_hash, r.body) for r in recs[i:]]
    inserted = recs[:i] + [forged] + shifted
    if i < len(recs):
        assert first_break(inserted) is not None
    seq, h = chain_head(recs)
    assert verdict_with(inserted, recs) is not Refusal.NONE


def verdict_with(batch, original):
    seq, h = chain_head(original)
    return verify_batch("gw", batch, h, sign_head(KEY, "gw", seq, h), PUB, 0, GENESIS, lambda s: None).refusal


@settings(max_examples=20, deadline=None)
@given(bodies)
def test_a_head_signed_by_another_key_or_for_another_gateway_does_not_verify(bs):
    recs = link(bs)
    seq, h = chain_head(recs)
    other = Ed25519PrivateKey.generate()
    assert verify_head(PUB, "gw", seq, h, sign_head(KEY, "gw", seq, h))
    assert not verify_head(PUB, "gw", seq, h, sign_head(other, "gw", seq, h))
    assert not verify_head(PUB, "gw2", seq, h, sign_head(KEY, "gw", seq, h))
    assert not verify_head(PUB, "gw", seq + 1, h, sign_head(KEY, "gw", seq, h))


@settings(max_examples=20, deadline=None)
@given(st.lists(readings_st, min_size=3, max_size=20), st.data())
def test_a_pruned_run_of_instantaneous_readings_keeps_the_chain_verifiable(rs, data):
    rs = [replace(r, obis="32.7.0") for r in rs]
    recs = link(rs)
    i = data.draw(st.integers(0, len(recs) - 1))
    j = data.draw(st.integers(i, len(recs) - 1))
    tomb = prune_run(recs[i:j + 1])
    pruned = recs[:i] + [tomb] + recs[j + 1:]
    assert first_break(pruned) is None
    assert chain_head(pruned) == chain_head(recs)
    assert verdict(pruned) is Refusal.NONE


def test_canonical_bytes_follow_the_documented_layout():
    r = Reading("M1", "1.8.0", START, 1234, "Wh", 0)
    b = canonical_bytes(1, GENESIS, r)
    assert b == (b"MLR1" + (1).to_bytes(8, "big") + bytes(32) + b"\x01" + b"\x00\x02M1" + b"\x00\x051.8.0"
                 + (1795478400000).to_bytes(8, "big", signed=True) + (1234).to_bytes(8, "big", signed=True)
                 + b"\x00\x02Wh" + (0).to_bytes(4, "big"))
    assert head_message("gw", 7, bytes(32)) == b"MLH1\x00\x02gw" + (7).to_bytes(8, "big") + bytes(32)


def test_a_billing_register_or_event_cannot_be_pruned():
    recs = link([Reading("M1", "1.8.0", START, 1, "Wh"), Event("relay.open", "M1", START)])
    for r in recs:
        try:
            prune_run([r])
        except ValueError as exc:
            assert "may not be pruned" in str(exc)
        else:
            raise AssertionError(f"seq {r.seq} was pruned")


@settings(max_examples=60, deadline=None)
@given(readings_st, st.integers(1, 2**64 - 1), st.binary(min_size=32, max_size=32))
def test_the_fast_reading_encoding_is_byte_for_byte_the_documented_layout(r, seq, prev):
    import struct
    from meterlink.chain import RECORD_MAGIC, body_bytes
    assert canonical_bytes(seq, prev, r) == RECORD_MAGIC + struct.pack(">Q", seq) + prev + body_bytes(r)


# -- the wire form: canonical bytes (and the tombstone layout), decoded strictly -------------------------------
def _wire_records(bs, data):
    """A chain of readings/events, some runs of instantaneous readings pruned into tombstones."""
    from meterlink.chain import is_prunable
    recs = link(bs)
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(recs) - 1))
        j = i
        while j + 1 < len(recs) and is_prunable(recs[j + 1].body) and j - i < 3:
            j += 1
        if is_prunable(recs[i].body):
            recs = recs[:i] + [prune_run(recs[i:j + 1])] + recs[j + 1:]
    return recs


@settings(max_examples=40, deadline=None)
@given(bodies, st.data())
def test_a_record_decoded_from_its_wire_bytes_is_the_record_and_its_hash(bs, data):
    from meterlink.chain import decode_wire, decode_wire_batch, wire_bytes, wire_meter_id
    recs = _wire_records(bs, data)
    wire = [wire_bytes(r) for r in recs]
    for r, b in zip(recs, wire):
        assert decode_wire(b) == (r, hash_of(r))
        assert wire_meter_id(b) == getattr(r.body, "meter_id", None)
    assert decode_wire_batch(wire) == (recs, [hash_of(r) for r in recs])


@settings(max_examples=40, deadline=None)
@given(st.lists(readings_st.map(lambda r: replace(r, meter_id="MTR-00001")), min_size=1, max_size=20))
def test_a_batch_of_same_layout_readings_decodes_on_the_fast_path_like_record_by_record(rs):
    from meterlink.chain import _decode_each, decode_wire_batch, wire_bytes
    wire = [wire_bytes(r) for r in link(rs)]
    assert decode_wire_batch(wire) == _decode_each(wire)


@settings(max_examples=150, deadline=None)
@given(st.one_of(readings_st, events_st), st.data())
def test_changed_wire_bytes_are_refused_or_decode_to_exactly_those_bytes(body, data):
    # strictness: whatever is accepted re-encodes to the very bytes received, so SHA-256 of the received
    # bytes is the record's hash (the head-end never hashes one thing and stores another)
    import hashlib
    from meterlink.chain import EncodingError, decode_wire, decode_wire_batch, wire_bytes
    b = bytearray(wire_bytes(link([body])[0]))
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "insert"]))
    i = data.draw(st.integers(0, len(b) - 1))
    if how == "flip":
        b[i] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del b[i:]
    elif how == "extend":
        b += data.draw(st.binary(min_size=1, max_size=4))
    else:
        b[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    b = bytes(b)
    for decode in (decode_wire, lambda x: tuple(v[0] for v in decode_wire_batch([x]))):
        try:
            rec, h = decode(b)
        except EncodingError:
            continue
        assert wire_bytes(rec) == b and h == hashlib.sha256(b).digest() == hash_of(rec)
