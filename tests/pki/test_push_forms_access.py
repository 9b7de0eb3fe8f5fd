"""The access check covers every push form: records as canonical bytes (chain_records) and each batch of a
PushStream are checked for the gateway's provisioned meters, like the per-record form (real mTLS, loopback)."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from meterlink.errors import DeviceError
from meterlink.gateway.enrol import channel_credentials, secure_channel
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import Pusher, to_proto
from meterlink.headend.gatewayauth import refusal_of, request_meters
from meterlink.readings import Reading
from meterlink.v1 import sync_pb2_grpc

from .test_enrolment_and_mtls import enrolled


def readings(clock, meters, count):
    return [Reading(m, "1.8.0", clock.now() + timedelta(minutes=15 * i), 1000 + i, "Wh", 0)
            for i in range(count) for m in meters]


def test_the_meters_of_canonical_bytes_records_are_what_the_access_check_reads(tmp_path, clock):
    journal = Journal(tmp_path / "gw.db")
    records = journal.append(readings(clock, ["MTR-1", "MTR-2"], 2))
    assert request_meters(to_proto("gw-0001", records)) == ["MTR-1", "MTR-2"]
    assert request_meters(to_proto("gw-0001", records, per_record=True)) == ["MTR-1", "MTR-2"]


def test_a_compact_push_for_an_unprovisioned_meter_is_refused(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    journal = Journal(tmp_path / "gw.db")
    records = journal.append(readings(headend.clock, ["MTR-1", "MTR-X"], 2))
    channel = secure_channel(headend.address, identity)
    try:
        with pytest.raises(grpc.RpcError) as err:
            sync_pb2_grpc.GatewaySyncStub(channel).Push(to_proto("gw-0001", records, identity.signing_key),
                                                        timeout=10)
    finally:
        channel.close()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusal_of(err.value) == "ACCESS_REFUSAL_METER_NOT_PROVISIONED"
    assert headend.repo.readings("MTR-1") == [] and headend.repo.readings("MTR-X") == []


def test_a_streamed_batch_for_an_unprovisioned_meter_ends_the_drain_after_the_allowed_batches(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    journal = Journal(tmp_path / "gw.db")
    journal.append(readings(headend.clock, ["MTR-1"], 8))                 # seq 1..8: allowed
    journal.append(readings(headend.clock, ["MTR-X"], 1))                 # seq 9: another gateway's meter
    journal.append(readings(headend.clock, ["MTR-1"], 4))
    pusher = Pusher("gw-0001", headend.address, journal, batch=4, key=identity.signing_key,
                    credentials=channel_credentials(identity), window=3)
    try:
        with pytest.raises(DeviceError, match="PERMISSION_DENIED.*METER_NOT_PROVISIONED"):
            pusher.drain()
    finally:
        pusher.close()
    # the batches before the refused one may or may not have committed before the call was aborted (the
    # check runs as each batch is read); whole batches only, never past the refused one, acked <= held
    held = [r.value for r in headend.repo.readings("MTR-1")]
    assert held in ([], list(range(1000, 1004)), list(range(1000, 1008)))
    assert journal.acked_seq() <= len(held)
    assert headend.repo.readings("MTR-X") == []
