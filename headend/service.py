"""The head-end's gRPC service: decode pushed batches, verify the chain (headend/verify.py), hand them to the stores; no SQL here.

Push: decode -> verify against the gateway's stored chain head and registered key -> readings and
hashes/events/head stored by `chain.commit_with_readings` (one transaction when both share a SQLite
file, else the repository's idempotent `ingest` then the chain store's commit) -> ack the new head seq.
A refused batch stores nothing; the ack then carries the reason code and the unchanged head, and the
refusal is logged and counted by reason.

PushStream: the same for each batch of a stream, in the order sent, one ack each; the next batch is
decoded (and its records hashed) on a second thread while the current one is verified and committed.
The stream ends after a refused batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from typing import Callable

import grpc

from meterlink.chain import ChainRecord, EncodingError, Event, Tombstone, decode_wire_batch, decode_wire_columns
from meterlink.clock import Clock, from_ms, to_ms
from meterlink.errors import MeterlinkError
from meterlink.readings import Reading
from meterlink.v1 import sync_pb2, sync_pb2_grpc

from .chainstore import HeadMoved, SqliteChainStore, open_chain_store
from .store import ReadingRepository, StoredRecord
from .verify import Refusal, Verdict, verify_batch

log = logging.getLogger("meterlink.headend")


def chain_records_from_proto(request: sync_pb2.PushRequest) -> list[ChainRecord]:
    """Decode the wire records; ValueError/TypeError name the record seq that cannot be decoded."""
    out = []
    instants: dict[int, object] = {}      # a poll's readings share one instant: convert it once
    for rec in request.records:
        kind = rec.WhichOneof("body")
        if kind == "reading":
            r = rec.reading
            ms = r.taken_at_ms
            at = instants.get(ms)
            if at is None:
                at = instants[ms] = from_ms(ms)
            body = Reading(r.meter_id, r.obis, at, r.value, r.unit, r.quality)
        elif kind == "event":
            e = rec.event
            body = Event(e.kind, e.meter_id, from_ms(e.at_ms), bytes(e.payload))
        elif kind == "tombstone":
            t = rec.tombstone
            if len(t.record_hash) != 32:
                raise ValueError(f"record seq {rec.seq}: tombstone hash is {len(t.record_hash)} bytes, not 32")
            if not 1 <= t.first_seq <= rec.seq:
                raise ValueError(f"record seq {rec.seq}: tombstone first_seq {t.first_seq} outside 1..{rec.seq}")
            body = Tombstone(t.first_seq, bytes(t.record_hash))
        else:
            raise ValueError(f"record seq {rec.seq}: no body")
        if len(rec.prev_hash) != 32:
            raise ValueError(f"record seq {rec.seq}: prev_hash is {len(rec.prev_hash)} bytes, not 32")
        out.append(ChainRecord(rec.seq, bytes(rec.prev_hash), body))
    return out


def decode_push(request: sync_pb2.PushRequest) -> tuple[list[ChainRecord], list[bytes] | None]:
    """The records of a request and, for the canonical-bytes form, their hashes (SHA-256 of the bytes received).

    EncodingError/ValueError name the record that cannot be decoded (the batch is then malformed).
    """
    wire = request.chain_records
    if not wire:
        return chain_records_from_proto(request), None
    if len(request.records):
        raise ValueError("the batch carries records in both forms (records and chain_records)")
    return decode_wire_batch(list(wire))


def records_from_proto(request: sync_pb2.PushRequest) -> list[StoredRecord]:
    """The readings of a request as repository records (events and tombstones are the chain store's)."""
    return [StoredRecord(request.gateway_id, r.seq, r.prev_hash, r.body)
            for r in decode_push(request)[0] if isinstance(r.body, Reading)]


def chain_store_for(repo: ReadingRepository) -> SqliteChainStore:
    """The chain store beside a repository: the same database (SQLite file), its own tables."""
    url = getattr(repo, "url", None)
    if url:
        return open_chain_store(url)
    return SqliteChainStore(getattr(repo, "path"))


class GatewaySyncService(sync_pb2_grpc.GatewaySyncServicer):
    def __init__(self, repo: ReadingRepository, clock: Clock, chain: SqliteChainStore | None = None,
                 metrics=None, public_key: Callable[[str], bytes | None] | None = None) -> None:
        self.repo, self.clock = repo, clock
        self.chain = chain if chain is not None else chain_store_for(repo)
        # where gateways' Ed25519 keys come from: the enrolment registry when wired
        # (GatewayRegistry.signing_public_key), else keys trusted by hand in the chain store
        self._public_key = public_key
        self.metrics = metrics            # meterlink.metrics.HeadendMetrics or None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def public_key(self, gateway_id: str) -> bytes | None:
        if self._public_key is not None:
            key = self._public_key(gateway_id)
            if key is not None:
                return key
        return self.chain.public_key(gateway_id)

    def _lock(self, gateway_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(gateway_id, threading.Lock())

    def Push(self, request, context):
        return self._push(request, context, self._decode(request))

    def PushStream(self, requests, context):
        """Each batch of the stream as `Push`, in order; the next one is decoded while this one commits."""
        ahead: queue.Queue = queue.Queue(maxsize=2)
        done = threading.Event()

        def offer(item) -> bool:
            """Queue `item` for the committing side; False once the stream is over (nobody will take it)."""
            while not done.is_set():
                try:
                    ahead.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def decode_ahead() -> None:
            try:
                for request in requests:
                    if not offer((request, self._decode(request))):
                        return
                end = None
            except BaseException as exc:     # the call was cancelled or the client went away
                end = exc
            offer(end)

        threading.Thread(target=decode_ahead, name="push-stream-decode", daemon=True).start()
        try:
            while True:
                item = ahead.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    if isinstance(item, grpc.RpcError) or not context.is_active():
                        return    # the gateway cancelled the call or went away
                    raise item    # e.g. an access check that aborted the call: its status code stands
                ack = self._push(item[0], context, item[1])
                yield ack
                if ack.refused:
                    return        # later batches would only repeat the refusal (as a gap)
        finally:
            done.set()

    def _decode(self, request):
        """(records, hashes) of a request, or the Verdict refusing it as malformed.

        The usual batch (readings only, well-formed) comes as ReadingColumns, which verify_batch and the
        chain stores (SQLite, PostgreSQL) take as they are (no ChainRecord/Reading per record).
        """
        try:
            wire = request.chain_records
            if wire and not len(request.records) and getattr(self.chain, "accepts_columns", False):
                cols = decode_wire_columns(list(wire))
                if cols is not None:
                    return cols, cols.hashes
            return decode_push(request)
        except (ValueError, TypeError, EncodingError) as exc:
            return Verdict(Refusal.MALFORMED, f"gateway {request.gateway_id}: {exc}")

    def _push(self, request, context, decoded):
        gw = request.gateway_id
        if not gw:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "gateway_id is empty")
        if self.metrics:
            self.metrics.batches.inc()
        if isinstance(decoded, Verdict):
            return self._refused(gw, decoded)
        records, hashes = decoded
        t0 = time.monotonic()   # real elapsed time for the latency histogram (the clock may be simulated)
        with self._lock(gw):
            for _attempt in range(3):
                head_seq, head_hash = self.chain.head(gw)
                try:
                    verdict = verify_batch(gw, records, bytes(request.head_hash), bytes(request.head_signature),
                                           self.public_key(gw), head_seq, head_hash,
                                           lambda seq: self.chain.record_hash(gw, seq), hashes)
                except EncodingError as exc:
                    verdict = Verdict(Refusal.MALFORMED, f"gateway {gw}: {exc}")
                if not verdict.accepted:
                    return self._refused(gw, verdict, head_seq)
                now_ms = to_ms(self.clock.now())
                try:
                    store_both = getattr(self.chain, "commit_with_readings", None)
                    if store_both is not None:   # one transaction when both share a SQLite file
                        acked = store_both(self.repo, gw, head_seq, verdict.new, now_ms, verdict.new_hashes)
                    else:
                        readings = [StoredRecord(gw, r.seq, r.prev_hash, r.body) for r in verdict.new
                                    if isinstance(r.body, Reading)]
                        if readings:
                            self.repo.ingest(gw, readings, now_ms)
                        acked = self.chain.commit(gw, head_seq, verdict.new, now_ms, verdict.new_hashes)
                except HeadMoved:
                    continue      # another replica/request advanced the head: verify again
                except MeterlinkError as exc:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                break
            else:
                context.abort(grpc.StatusCode.ABORTED, f"gateway {gw}: chain head kept moving; retry")
        if self.metrics:
            self.metrics.records.inc(len(verdict.new))
            self.metrics.duplicates.inc(verdict.duplicates)
            self.metrics.ingest_latency.observe(time.monotonic() - t0)
        log.info("gateway %s: %d new, %d duplicate, acked seq %d", gw, len(verdict.new), verdict.duplicates, acked)
        return sync_pb2.PushAck(acked_seq=acked, accepted=len(verdict.new), duplicates=verdict.duplicates)

    def _refused(self, gw: str, verdict: Verdict, head_seq: int | None = None) -> sync_pb2.PushAck:
        if head_seq is None:
            head_seq = self.chain.head(gw)[0]
        log.warning("refused batch: %s (%s)", verdict.detail, verdict.refusal.name)
        if self.metrics:
            self.metrics.refusals.labels(reason=verdict.refusal.name).inc()
        return sync_pb2.PushAck(acked_seq=head_seq, refused=int(verdict.refusal), detail=verdict.detail)


# Callables (server, interceptors) -> None run by `make_server` before the server starts, e.g. the
# PAYG services of `meterlink-headend serve --payg` (headend/payg_service.py serve_hook).
SERVER_HOOKS: list = []


def make_server(repo: ReadingRepository, clock: Clock, listen: str, workers: int = 8,
                chain: SqliteChainStore | None = None, metrics=None,
                credentials: grpc.ServerCredentials | None = None,
                interceptors: tuple = (),
                public_key: Callable[[str], bytes | None] | None = None) -> tuple[grpc.Server, int]:
    """Build (not start) the gRPC server; returns it and the bound port (listen 'HOST:0' picks one).

    `chain` defaults to the chain store in the repository's database; `credentials` (TLS) makes the
    port secure, otherwise it is plaintext.
    """
    executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
    server = grpc.server(executor, interceptors=list(interceptors),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.executor = executor     # stop_server: handlers must have returned before the stores are closed
    server.metrics = metrics       # for SERVER_HOOKS that add their own (PAYG credit control)
    service = GatewaySyncService(repo, clock, chain, metrics, public_key)
    server.sync_service = service  # for callers that need the chain store (tests, CLI)
    sync_pb2_grpc.add_GatewaySyncServicer_to_server(service, server)
    for hook in SERVER_HOOKS:      # further services on the same server (PAYG credit control, ...)
        hook(server, tuple(interceptors))
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise MeterlinkError(f"cannot listen on {listen}")
    return server, port


def stop_server(server: grpc.Server, grace: float = 2.0) -> None:
    """Stop accepting calls, give running ones `grace` seconds, then wait until every handler has returned.

    `grpc.Server.stop` cancels calls still running after the grace period, but their handler threads go on
    until they return; closing a database under a handler that is still committing can crash the process
    (seen with SQLite) or block it. Call this before closing the stores the handlers use."""
    server.stop(grace).wait()
    executor = getattr(server, "executor", None)
    if executor is not None:
        executor.shutdown(wait=True)
    for drain in getattr(server, "drains", ()):     # work handed off by handlers (PAYG stream engine)
        drain()
