"""The head-end's gRPC service: decode pushed batches and hand them to the repository; no SQL here."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc

from meterlink.clock import Clock, from_ms, to_ms
from meterlink.errors import MeterlinkError
from meterlink.readings import Reading
from meterlink.v1 import sync_pb2, sync_pb2_grpc

from .store import ReadingRepository, StoredRecord

log = logging.getLogger("meterlink.headend")


def records_from_proto(request: sync_pb2.PushRequest) -> list[StoredRecord]:
    out = []
    for rec in request.records:
        if rec.WhichOneof("body") != "reading":
            raise ValueError(f"record seq {rec.seq}: unsupported body {rec.WhichOneof('body')!r}")
        r = rec.reading
        out.append(StoredRecord(request.gateway_id, rec.seq, rec.prev_hash,
                                Reading(r.meter_id, r.obis, from_ms(r.taken_at_ms), r.value, r.unit, r.quality)))
    return out


class GatewaySyncService(sync_pb2_grpc.GatewaySyncServicer):
    def __init__(self, repo: ReadingRepository, clock: Clock) -> None:
        self.repo, self.clock = repo, clock

    def Push(self, request, context):
        if not request.gateway_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "gateway_id is empty")
        try:
            records = records_from_proto(request)
        except (ValueError, TypeError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gateway {request.gateway_id}: {exc}")
        try:
            result = self.repo.ingest(request.gateway_id, records, to_ms(self.clock.now()))
        except MeterlinkError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("gateway %s: %d new, %d duplicate, acked seq %d", request.gateway_id,
                 result.accepted, result.duplicates, result.acked_seq)
        return sync_pb2.PushAck(acked_seq=result.acked_seq, accepted=result.accepted,
                                duplicates=result.duplicates)


def make_server(repo: ReadingRepository, clock: Clock, listen: str, workers: int = 8) -> tuple[grpc.Server, int]:
    """Build (not start) the gRPC server; returns it and the bound port (listen 'HOST:0' picks one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    sync_pb2_grpc.add_GatewaySyncServicer_to_server(GatewaySyncService(repo, clock), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise MeterlinkError(f"cannot listen on {listen}")
    return server, port
