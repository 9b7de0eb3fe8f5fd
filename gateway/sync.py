"""Pushing journal records to the head-end over gRPC; records are marked acked only after the ack."""

from __future__ import annotations

import logging

import grpc

from meterlink.clock import to_ms
from meterlink.errors import DeviceError
from meterlink.v1 import sync_pb2, sync_pb2_grpc

from .journal import Journal, JournalRecord

log = logging.getLogger("meterlink.gateway.sync")


def to_proto(gateway_id: str, records: list[JournalRecord]) -> sync_pb2.PushRequest:
    return sync_pb2.PushRequest(gateway_id=gateway_id, records=[
        sync_pb2.Record(seq=r.seq, prev_hash=r.prev_hash, reading=sync_pb2.Reading(
            meter_id=r.reading.meter_id, obis=r.reading.obis, taken_at_ms=to_ms(r.reading.taken_at),
            value=r.reading.value, unit=r.reading.unit, quality=r.reading.quality))
        for r in records])


class Pusher:
    def __init__(self, gateway_id: str, address: str, journal: Journal, batch: int = 5000,
                 timeout_s: float = 10.0) -> None:
        self.gateway_id, self.address, self.journal = gateway_id, address, journal
        self.batch, self.timeout_s = batch, timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = sync_pb2_grpc.GatewaySyncStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def push_once(self) -> tuple[int, bool]:
        """Send one batch of unacked records -> (records sent, whole batch acknowledged)."""
        records = self.journal.unacked(self.batch)
        if not records:
            return 0, True
        try:
            ack = self._stub.Push(to_proto(self.gateway_id, records), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise DeviceError(f"push to head-end {self.address} failed: {exc.code().name}: {exc.details()}") from None
        self.journal.mark_acked(ack.acked_seq)
        return len(records), ack.acked_seq >= records[-1].seq

    def drain(self) -> int:
        """Push batches until nothing is unacked or the head-end stops advancing; returns records sent."""
        total = 0
        while True:
            sent, complete = self.push_once()
            total += sent
            if sent == 0 or not complete:
                return total
