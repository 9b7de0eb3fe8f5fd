"""Real-time readings from third-party devices over MQTT -> the same ingest path as gateway pushes and file imports; a thin shell.

Topic:   <prefix>/<meter id>            (default prefix `meterlink/ingest`; subscribe `<prefix>/+`)
Payload: one JSON object, the keys of a JSONL import row (docs/import.md):
         {"obis": "1.8.0", "timestamp": "2026-11-25T10:15:00Z", "value": "12345.678", "unit": "kWh"}
         `meter` may be omitted (the topic names it); when present it must equal the topic's.
QoS 1 (at-least-once): the broker redelivers until we acknowledged, and a redelivered reading is a
duplicate for the repository, so the effect is exactly once. Bad payloads are counted and logged
with the topic, never stored.

Messages are parsed in paho's network thread and queued (bounded: when full, the network thread
waits and the broker holds the rest); one ingest thread drains the queue in batches.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from decimal import Decimal

import paho.mqtt.client as mqtt

from meterlink.clock import Clock, to_ms
from meterlink.readings import Reading

from .importer import RowRejected, ingest_readings, parse_row

log = logging.getLogger("meterlink.headend.mqtt")
DEFAULT_PREFIX = "meterlink/ingest"


@dataclass
class MqttIngestStats:
    received: int = 0
    new: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected: int = 0
    last_errors: list[str] = field(default_factory=list)


def parse_message(topic: str, payload: bytes, prefix: str = DEFAULT_PREFIX) -> Reading:
    """One MQTT message -> Reading, or RowRejected naming the field (pure)."""
    if not topic.startswith(prefix + "/"):
        raise RowRejected("(topic)", f"topic {topic!r} is not under {prefix}/")
    meter = topic[len(prefix) + 1:]
    if not meter or "/" in meter:
        raise RowRejected("(topic)", f"topic {topic!r} must be {prefix}/<meter id>")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RowRejected("(json)", f"payload is not a JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise RowRejected("(json)", "payload must be one JSON object")
    if "meter" in obj and str(obj["meter"]) != meter:
        raise RowRejected("meter", f"payload names meter {obj['meter']!r} but the topic names {meter!r}")
    obj["meter"] = meter
    return parse_row(obj)


class MqttIngest:
    """Subscribe to `<prefix>/+` and ingest every valid reading into `repo`."""

    def __init__(self, repo, clock: Clock, host: str = "127.0.0.1", port: int = 1883,
                 prefix: str = DEFAULT_PREFIX, client_id: str = "meterlink-headend-ingest",
                 max_queue: int = 100_000, batch: int = 1000) -> None:
        self.repo, self.clock, self.prefix, self.batch = repo, clock, prefix, batch
        self.stats = MqttIngestStats()
        self._q: queue.Queue[Reading] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a, **k: self._subscribed.set()
        self._host, self._port = host, port
        self._worker = threading.Thread(target=self._drain, name="mqtt-ingest", daemon=True)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect to %s:%s refused: %s", self._host, self._port, reason_code)
            return
        client.subscribe(f"{self.prefix}/+", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        self.stats.received += 1
        try:
            reading = parse_message(msg.topic, msg.payload, self.prefix)
        except RowRejected as exc:
            self.stats.rejected += 1
            text = f"{msg.topic}: field {exc.field!r}: {exc.message}"
            self.stats.last_errors = (self.stats.last_errors + [text])[-20:]
            log.warning("rejected MQTT reading %s", text)
            return
        # blocking put: when ingest falls behind, paho's thread waits and the broker holds the
        # messages (back-pressure) instead of anything being dropped here
        self._q.put(reading)

    def _drain(self) -> None:
        while not self._stop.is_set() or not self._q.empty():
            try:
                first = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            chunk = [first]
            while len(chunk) < self.batch:
                try:
                    chunk.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                n, d, c = ingest_readings(self.repo, chunk, to_ms(self.clock.now()))
            except Exception:  # noqa: BLE001 - keep the subscriber alive; the error is logged
                log.exception("MQTT ingest of %d readings failed", len(chunk))
                continue
            self.stats.new += n
            self.stats.duplicate += d
            self.stats.conflict += c

    def start(self, timeout_s: float = 10.0) -> "MqttIngest":
        self._worker.start()
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise ConnectionError(f"MQTT broker {self._host}:{self._port}: not subscribed within {timeout_s} s")
        return self

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout=5)
