"""Tampering with the gateway's journal or the wire is refused by the head-end, each with its own reason code,
while an identical re-send is acknowledged without duplicates. Real gRPC, real SQLite journal."""

from __future__ import annotations

import sqlite3

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import Event
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import Pusher, Refused, to_proto
from meterlink.v1 import sync_pb2, sync_pb2_grpc

from .conftest import GW, START, assert_chain_verifies, readings


def reason(ack) -> str:
    return sync_pb2.Refusal.Name(ack.refused)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "gw.db")
    yield j
    j.close()


@pytest.fixture
def stub(headend):
    channel = grpc.insecure_channel(headend.addr)
    yield sync_pb2_grpc.GatewaySyncStub(channel)
    channel.close()


def sql(journal: Journal, statement: str, *args) -> None:
    con = sqlite3.connect(journal.path, isolation_level=None)
    con.execute(statement, args)
    con.close()


def test_an_identical_re_send_is_acknowledged_again_without_duplicates(journal, headend, stub, key):
    records = journal.append(readings(10))
    first = stub.Push(to_proto(GW, records, key), timeout=5)
    again = stub.Push(to_proto(GW, records, key), timeout=5)
    assert (first.refused, first.accepted, first.duplicates, first.acked_seq) == (0, 10, 0, 10)
    assert (again.refused, again.accepted, again.duplicates, again.acked_seq) == (0, 0, 10, 10)
    # a re-send that overlaps what is held and carries new records: only the new ones are stored
    more = journal.append(readings(4, start=START.replace(day=25)))
    overlap = stub.Push(to_proto(GW, records[5:] + more, key), timeout=5)
    assert (overlap.refused, overlap.accepted, overlap.duplicates, overlap.acked_seq) == (0, 4, 5, 14)
    assert len(headend.repo.readings("M1")) == 14
    assert_chain_verifies(headend.path, GW)


def test_a_record_edited_in_the_gateway_database_is_refused_as_altered(journal, headend, key):
    journal.append(readings(20))
    sql(journal, "UPDATE journal SET value = value + 1000 WHERE seq = 7")   # someone "corrects" a register
    from meterlink.metrics import GatewayMetrics
    metrics = GatewayMetrics.create()
    pusher = Pusher(GW, headend.addr, journal, key=key, metrics=metrics)
    with pytest.raises(Refused) as err:
        pusher.drain()
    assert err.value.reason == "REFUSAL_ALTERED" and "seq 7" in err.value.detail
    assert journal.unacked_count() == 20 and headend.repo.readings("M1") == []
    assert headend.refusals("ALTERED") == 1
    assert metrics.registry.get_sample_value("meterlink_gateway_push_refusals_total",
                                             {"reason": "REFUSAL_ALTERED"}) == 1


def test_the_last_record_of_a_batch_edited_is_refused_as_altered_not_as_a_bad_signature(journal, headend, key):
    journal.append(readings(6))
    sql(journal, "UPDATE journal SET value = 1 WHERE seq = 6")
    with pytest.raises(Refused, match="REFUSAL_ALTERED.*seq 6"):
        Pusher(GW, headend.addr, journal, key=key).drain()


def test_a_record_deleted_from_the_gateway_database_is_refused_as_a_gap(journal, headend, key):
    journal.append(readings(12))
    sql(journal, "DELETE FROM journal WHERE seq = 5")
    with pytest.raises(Refused) as err:
        Pusher(GW, headend.addr, journal, key=key).drain()
    assert err.value.reason == "REFUSAL_GAP" and "seq 5" in err.value.detail
    assert headend.refusals("GAP") == 1 and headend.repo.readings("M1") == []


def test_two_records_swapped_in_the_gateway_database_are_refused_as_reordered(journal, headend, key):
    journal.append(readings(12))
    sql(journal, "UPDATE journal SET seq = -1 WHERE seq = 5")
    sql(journal, "UPDATE journal SET seq = 5 WHERE seq = 6")
    sql(journal, "UPDATE journal SET seq = 6 WHERE seq = -1")
    with pytest.raises(Refused) as err:
        Pusher(GW, headend.addr, journal, key=key).drain()
    assert err.value.reason == "REFUSAL_REORDERED"
    assert headend.refusals("REORDERED") == 1


@pytest.mark.parametrize("form", ["chain_records", "records"])
def test_records_reordered_on_the_wire_are_refused_as_reordered(journal, headend, stub, key, form):
    records = journal.append(readings(8))
    req = to_proto(GW, records, key, per_record=form == "records")
    field = getattr(req, form)
    wire = list(field)
    wire[2], wire[3] = wire[3], wire[2]
    del field[:]
    field.extend(wire)
    ack = stub.Push(req, timeout=5)
    assert reason(ack) == "REFUSAL_REORDERED" and ack.acked_seq == 0


def test_an_old_batch_from_another_life_of_the_journal_is_refused_as_a_replay(tmp_path, journal, headend, stub,
                                                                               key):
    # a batch the gateway signed before its journal was reset (same key, seq 1..5, other readings)
    old_life = Journal(tmp_path / "old.db")
    old = old_life.append(readings(5, first_value=1))
    captured = to_proto(GW, old, key)
    old_life.close()
    held = journal.append(readings(10))
    assert stub.Push(to_proto(GW, held, key), timeout=5).acked_seq == 10
    ack = stub.Push(captured, timeout=5)      # the attacker replays the captured batch
    assert reason(ack) == "REFUSAL_REPLAY" and ack.acked_seq == 10
    assert [r.value for r in headend.repo.readings("M1", "1.8.0")] == [1000 + i for i in range(0, 10, 2)]
    assert headend.refusals("REPLAY") == 1


def test_a_batch_signed_with_another_key_is_refused_as_a_bad_signature(journal, headend, stub):
    records = journal.append(readings(4))
    ack = stub.Push(to_proto(GW, records, Ed25519PrivateKey.generate()), timeout=5)
    assert reason(ack) == "REFUSAL_BAD_SIGNATURE" and ack.acked_seq == 0
    unsigned = stub.Push(to_proto(GW, records), timeout=5)
    assert reason(unsigned) == "REFUSAL_BAD_SIGNATURE"
    assert headend.refusals("BAD_SIGNATURE") == 2


def test_a_gateway_without_a_registered_key_is_refused_as_unknown(journal, headend, stub, key):
    ack = stub.Push(to_proto("gw-stranger", journal.append(readings(3)), key), timeout=5)
    assert reason(ack) == "REFUSAL_UNKNOWN_GATEWAY" and "gw-stranger" in ack.detail


def test_a_batch_that_skips_past_the_held_head_is_refused_as_a_gap(journal, headend, stub, key):
    records = journal.append(readings(10))
    assert stub.Push(to_proto(GW, records[:4], key), timeout=5).acked_seq == 4
    ack = stub.Push(to_proto(GW, records[6:], key), timeout=5)
    assert reason(ack) == "REFUSAL_GAP" and ack.acked_seq == 4


def test_after_a_refusal_is_cleared_the_chain_continues_and_verifies_end_to_end(journal, headend, key):
    journal.append(readings(6))
    journal.append([Event("relay.open", "M1", START, b"\x01")])
    journal.append(readings(6, start=START.replace(day=25)))
    Pusher(GW, headend.addr, journal, batch=4, key=key).drain()
    assert journal.unacked_count() == 0
    recs = assert_chain_verifies(headend.path, GW)
    assert [r.seq for r in recs] == list(range(1, 14))
    assert headend.chain.events(GW) == [(7, "relay.open", "M1", 1795478400000, b"\x01", "")]


def test_a_pipelined_drain_stores_the_batches_before_an_altered_record_and_stops_at_its_refusal(journal, headend,
                                                                                                  key):
    journal.append(readings(40))
    sql(journal, "UPDATE journal SET value = value + 1 WHERE seq = 23")       # in the 6th batch of 4
    pusher = Pusher(GW, headend.addr, journal, batch=4, key=key, window=4)    # up to 4 batches in flight
    with pytest.raises(Refused) as err:
        pusher.drain()
    assert err.value.reason == "REFUSAL_ALTERED" and "seq 23" in err.value.detail
    # batches 1..5 committed and acknowledged in order; the refused one and everything sent after it not
    assert journal.acked_seq() == 20 and headend.chain.head(GW)[0] == 20
    assert len(headend.repo.readings("M1")) == 20
    assert headend.refusals("ALTERED") == 1 and headend.refusals("GAP") == 0   # the stream ended at the refusal
    assert_chain_verifies(headend.path, GW)


def test_a_batch_carrying_records_in_both_wire_forms_is_refused_as_malformed(journal, headend, stub, key):
    records = journal.append(readings(4))
    req = to_proto(GW, records, key)
    req.records.extend(to_proto(GW, records, key, per_record=True).records)
    ack = stub.Push(req, timeout=5)
    assert reason(ack) == "REFUSAL_MALFORMED" and "both forms" in ack.detail and ack.acked_seq == 0


def test_garbage_in_the_canonical_bytes_form_is_refused_as_malformed_naming_the_record(journal, headend, stub, key):
    records = journal.append(readings(4))
    req = to_proto(GW, records, key)
    req.chain_records[2] = req.chain_records[2] + b"\x00"
    ack = stub.Push(req, timeout=5)
    assert reason(ack) == "REFUSAL_MALFORMED" and "seq 3" in ack.detail and ack.acked_seq == 0
