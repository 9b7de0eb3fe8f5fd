"""Pushing journal records to the head-end over gRPC: signed chain heads, ack-driven resume, jittered back-off.

Records are marked acked only after the head-end's ack (the highest seq it committed), so after
any outage the next push starts right after the last ack. Every batch carries the hash of its last
record and an Ed25519 signature over (gateway id, seq, hash) with the key made on this device.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import Event, Tombstone, public_bytes, sign_head, wire_bytes
from meterlink.clock import to_ms
from meterlink.errors import ConfigError, DeviceError, MeterlinkError
from meterlink.v1 import sync_pb2, sync_pb2_grpc

from .journal import Journal, JournalRecord, WireBatch

log = logging.getLogger("meterlink.gateway.sync")


# -- the device key ----------------------------------------------------------------------------
def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The gateway's Ed25519 signing key (PKCS#8 PEM): created on first use with mode 0600, never overwritten."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_key(path)      # another process made it first
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return key
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: not an Ed25519 key")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"signing key {path}: readable by others (mode {path.stat().st_mode & 0o777:o}); "
                          f"chmod 600 it")
    return key


def write_public_key(key: Ed25519PrivateKey, path: str | Path) -> bytes:
    """Write the raw 32-byte public key as hex (what `meterlink-headend trust-gateway` reads); returns it."""
    raw = public_bytes(key)
    Path(path).write_text(raw.hex() + "\n")
    return raw


# -- wire ----------------------------------------------------------------------------------------
def record_to_proto(r: JournalRecord, ms: dict | None = None) -> sync_pb2.Record:
    """One wire record; `ms` caches datetime -> epoch ms across a batch (a poll shares one instant)."""
    b = r.body
    if isinstance(b, Event):
        return sync_pb2.Record(seq=r.seq, prev_hash=r.prev_hash, event=sync_pb2.Event(
            kind=b.kind, meter_id=b.meter_id, at_ms=to_ms(b.at), payload=b.payload))
    if isinstance(b, Tombstone):
        return sync_pb2.Record(seq=r.seq, prev_hash=r.prev_hash, tombstone=sync_pb2.Tombstone(
            first_seq=b.first_seq, record_hash=b.record_hash))
    at = ms.get(b.taken_at) if ms is not None else None
    if at is None:
        at = to_ms(b.taken_at)
        if ms is not None:
            ms[b.taken_at] = at
    return sync_pb2.Record(seq=r.seq, prev_hash=r.prev_hash, reading=sync_pb2.Reading(
        meter_id=b.meter_id, obis=b.obis, taken_at_ms=at, value=b.value, unit=b.unit, quality=b.quality))


def to_proto(gateway_id: str, records: list[JournalRecord], key: Ed25519PrivateKey | None = None,
             per_record: bool = False) -> sync_pb2.PushRequest:
    """A push request; with `key`, signed over the stored hash of the last record (the chain head).

    Records travel as their canonical bytes (`chain_records`), or with `per_record` as one Record
    message each (the older form the head-end still accepts).
    """
    if per_record:
        ms: dict = {}
        req = sync_pb2.PushRequest(gateway_id=gateway_id, records=[record_to_proto(r, ms) for r in records])
    else:
        req = sync_pb2.PushRequest(gateway_id=gateway_id, chain_records=[wire_bytes(r.chain_record())
                                                                          for r in records])
    if key is not None and records:
        last = records[-1]
        req.head_hash = last.hash
        req.head_signature = sign_head(key, gateway_id, last.seq, last.hash)
    return req


def batch_request(gateway_id: str, batch: WireBatch, key: Ed25519PrivateKey | None) -> sync_pb2.PushRequest:
    """A push request for a batch read with `Journal.wire_batch`, signed like `to_proto`."""
    req = sync_pb2.PushRequest(gateway_id=gateway_id, chain_records=batch.records)
    if key is not None:
        req.head_hash = batch.last_hash
        req.head_signature = sign_head(key, gateway_id, batch.last_seq, batch.last_hash)
    return req


class Refused(MeterlinkError):
    """The head-end refused a batch; `reason` is the proto enum name (e.g. REFUSAL_ALTERED)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"head-end refused the batch: {reason}: {detail}")
        self.reason, self.detail = reason, detail


# -- back-off ------------------------------------------------------------------------------------
@dataclass
class Backoff:
    """Exponential back-off with full jitter (AWS style): delay = uniform(0, min(cap, base * 2^failures)).

    Pure apart from the injected RNG; the caller decides when to sleep (on its clock).
    """

    base_s: float = 1.0
    cap_s: float = 300.0
    rng: random.Random | None = None
    failures: int = 0

    def next_delay(self) -> float:
        rng = self.rng or random.Random()
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        return rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0


# -- pusher --------------------------------------------------------------------------------------
class Pusher:
    def __init__(self, gateway_id: str, address: str, journal: Journal, batch: int = 5000,
                 timeout_s: float = 10.0, key: Ed25519PrivateKey | None = None,
                 credentials: grpc.ChannelCredentials | None = None, metrics=None,
                 server_name: str | None = None, window: int = 2) -> None:
        self.gateway_id, self.address, self.journal = gateway_id, address, journal
        self.batch, self.timeout_s = batch, timeout_s
        self.window = max(1, window)      # batches in flight during a drain (sent, not yet acked)
        self._streaming = True            # False once the head-end answered PushStream with UNIMPLEMENTED
        self.key = key
        self.metrics = metrics            # meterlink.metrics.GatewayMetrics or None
        self.last_refusal: Refused | None = None
        self._built: tuple | None = None
        # our own jittered back-off decides when to retry; keep gRPC's reconnect back-off short so a
        # head-end that is back is reached at the next try
        self._credentials = credentials
        self._server_name = server_name      # name checked in the head-end's certificate, if not the host
        self._connect()

    def _connect(self) -> None:
        opts = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        if self._credentials and self._server_name:
            opts.append(("grpc.ssl_target_name_override", self._server_name))
        self._channel = (grpc.secure_channel(self.address, self._credentials, options=opts) if self._credentials
                         else grpc.insecure_channel(self.address, options=opts))
        self._stub = sync_pb2_grpc.GatewaySyncStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def push_once(self) -> tuple[int, bool]:
        """Send one batch of unacked records -> (records sent, whole batch acknowledged).

        Raises DeviceError when the head-end is unreachable and Refused when it refuses the batch.
        """
        # while the head-end is down the same batch is retried: build it once per (ack, head)
        state = (self.journal.acked_seq(), self.journal.head()[0])
        if self._built is not None and self._built[0] == state:
            records, request = self._built[1], self._built[2]
        else:
            records = self.journal.unacked(self.batch)
            if not records:
                return 0, True
            request = to_proto(self.gateway_id, records, self.key)
            self._built = (state, records, request)
        try:
            ack = self._stub.Push(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                # a fresh channel on the next try: our back-off decides when, not gRPC's reconnect timer
                self._channel.close()
                self._connect()
            raise DeviceError(f"push to head-end {self.address} failed: {exc.code().name}: {exc.details()}") from None
        newly = self.journal.mark_acked(ack.acked_seq)
        if self.metrics is not None and newly:
            self.metrics.pushed.inc(newly)
        if ack.refused:
            self._refused(ack)
        self.last_refusal = None
        return len(records), ack.acked_seq >= records[-1].seq

    def _refused(self, ack) -> None:
        self.last_refusal = Refused(sync_pb2.Refusal.Name(ack.refused), ack.detail)
        log.error("gateway %s: %s", self.gateway_id, self.last_refusal)
        if self.metrics is not None and getattr(self.metrics, "push_refusals", None) is not None:
            self.metrics.push_refusals.labels(reason=self.last_refusal.reason).inc()
        raise self.last_refusal

    def drain(self) -> int:
        """Push batches until nothing is unacked or the head-end stops advancing; returns records sent.

        One PushStream call: a reader thread sends batch after batch (read from the journal and signed)
        while up to `window` batches wait for their acks; each ack is applied (`mark_acked`, the highest
        committed seq) as it arrives, in order. A refusal ends the drain with `Refused`. Memory stays
        bounded by `window` + 1 batches (the next one is read while waiting for an ack). No progress (a
        batch sent or acked) for `timeout_s` cancels the call (DeviceError). A head-end without
        PushStream is drained batch by batch with Push.
        """
        if not self._streaming:
            return self._drain_unary()
        first = self.journal.wire_batch(self.journal.acked_seq(), self.batch)
        if first is None:
            return 0                              # nothing unacked: no call
        slots = threading.Semaphore(self.window)
        stop = threading.Event()
        in_flight: list[WireBatch] = []          # sent, not yet acked, in order (appended by the sender)
        errors: list[BaseException] = []
        progress = [time.monotonic()]            # last batch sent or ack received

        def batches():
            batch = first
            try:
                while batch is not None and not stop.is_set():
                    while not slots.acquire(timeout=0.2):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    request = batch_request(self.gateway_id, batch, self.key)
                    in_flight.append(batch)
                    progress[0] = time.monotonic()
                    yield request
                    batch = self.journal.wire_batch(batch.last_seq, self.batch)
            except Exception as exc:             # journal or encoding error: end the stream, report it
                errors.append(exc)

        call = self._stub.PushStream(batches())
        timed_out = threading.Event()

        def watchdog() -> None:
            # the stream has no overall deadline (a catch-up takes as long as it takes); instead the call
            # must make progress (a batch sent or acked) at least every timeout_s until it ends
            while not stop.wait(0.2):
                if time.monotonic() - progress[0] > self.timeout_s:
                    timed_out.set()
                    call.cancel()
                    return

        threading.Thread(target=watchdog, name="push-watchdog", daemon=True).start()
        total = 0
        try:
            for ack in call:
                progress[0] = time.monotonic()
                batch = in_flight.pop(0)
                newly = self.journal.mark_acked(ack.acked_seq)
                if self.metrics is not None and newly:
                    self.metrics.pushed.inc(newly)
                if ack.refused:
                    stop.set()
                    call.cancel()
                    self._refused(ack)
                total += len(batch.records)
                if ack.acked_seq < batch.last_seq:
                    stop.set()
                    call.cancel()
                    return total
                slots.release()
        except grpc.RpcError as exc:
            stop.set()
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and total == 0:
                self._streaming = False          # an older head-end: Push batch by batch
                return self._drain_unary()
            if exc.code() == grpc.StatusCode.CANCELLED and errors:
                raise errors[0]
            if exc.code() == grpc.StatusCode.CANCELLED and timed_out.is_set():
                raise DeviceError(f"push to head-end {self.address} failed: no ack within {self.timeout_s} s"
                                  ) from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._channel.close()
                self._connect()
            raise DeviceError(f"push to head-end {self.address} failed: {exc.code().name}: "
                              f"{exc.details()}") from None
        finally:
            stop.set()
        if errors:
            raise errors[0]
        self.last_refusal = None
        return total

    def _drain_unary(self) -> int:
        """`drain` over unary Push: the next batch is read and signed while the one in flight commits."""
        sent, complete = self.push_once()
        total = sent
        if sent == 0 or not complete:
            return total
        records = self.journal.unacked(self.batch)
        request = to_proto(self.gateway_id, records, self.key) if records else None
        while records:
            try:
                future = self._stub.Push.future(request, timeout=self.timeout_s)
                nxt = self.journal.records_after(records[-1].seq, self.batch)
                nxt_request = to_proto(self.gateway_id, nxt, self.key) if nxt else None
                ack = future.result()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._channel.close()
                    self._connect()
                raise DeviceError(f"push to head-end {self.address} failed: {exc.code().name}: "
                                  f"{exc.details()}") from None
            newly = self.journal.mark_acked(ack.acked_seq)
            if self.metrics is not None and newly:
                self.metrics.pushed.inc(newly)
            if ack.refused:
                self._refused(ack)
            total += len(records)
            if ack.acked_seq < records[-1].seq:
                return total
            records, request = nxt, nxt_request
        return total


# -- CLI -----------------------------------------------------------------------------------------
def cmd_signing_key(args) -> int:
    """Create the signing key if missing and print its public half (hex); optionally write it to a file."""
    from .config import load_config
    from .daemon import signing_key_path
    path = Path(args.key) if args.key else signing_key_path(load_config(args.config))
    key = load_or_create_key(path)
    raw = public_bytes(key)
    if args.out:
        write_public_key(key, args.out)
    print(raw.hex())
    return 0


def add_parsers(sub) -> None:
    sk = sub.add_parser("signing-key", help="create (once) the Ed25519 chain-signing key and print its public key",
                        epilog="example: meterlink-gateway signing-key --config gateway.toml --out gw-0001.pub")
    sk.add_argument("--config", default="gateway.toml", help="gateway config (the key sits beside the journal)")
    sk.add_argument("--key", help="key file, overrides the config")
    sk.add_argument("--out", help="also write the public key (hex) to this file")
    sk.set_defaults(func=cmd_signing_key)
