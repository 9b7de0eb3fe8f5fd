"""Real-time publication of readings on MQTT for in-home displays; never blocks or fails a poll.

Topic   `<topic_prefix>/<gateway id>/<meter id>/<obis>`  (e.g. `meterlink/gw-0001/MTR-0001/1.8.0`)
Payload JSON `{"gateway", "meter", "obis", "value" (int), "unit", "taken_at" (ISO-8601 UTC, ms),
        "quality" (int, Quality flags), "flags" (their names)}`
Status  `<topic_prefix>/<gateway id>/status`: "online", or "offline" (the broker sends it as our will).

QoS 1 and retain, because the consumers are an in-home display and a local energy manager:
retain gives a display that (re)connects the latest value of every register at once instead of
a blank screen until the next poll (up to 15 minutes); QoS 1 gets each value to the broker across
a brief reconnect, and a duplicate is harmless (the same cumulative register value at the same
`taken_at`), so QoS 2's extra round trip buys nothing.

`publish()` only appends to a bounded in-memory queue; a publisher thread hands messages to
paho. While the broker is down messages wait in the queue; when it is full the OLDEST message is
dropped and counted (`stats.dropped`): a display wants the newest values. The journal, not MQTT,
is the record of readings.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from dataclasses import dataclass

import paho.mqtt.client as paho

from meterlink.clock import from_ms, to_ms
from meterlink.readings import Reading

from .plausibility import flag_names

log = logging.getLogger("meterlink.gateway.mqtt")

QOS = 1
RETAIN = True
_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", " ": "_"})


def topic_for(prefix: str, gateway_id: str, meter_id: str, obis: str) -> str:
    """The topic of one register; MQTT wildcard and level characters in ids become '_'."""
    return "/".join([prefix.rstrip("/"), gateway_id.translate(_UNSAFE), meter_id.translate(_UNSAFE),
                     obis.translate(_UNSAFE)])


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch -> '2026-11-24T00:15:00.000Z'."""
    return from_ms(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def payload_for(gateway_id: str, r: Reading) -> bytes:
    """The JSON payload of one reading (value stays an exact integer in its base unit)."""
    return json.dumps({"gateway": gateway_id, "meter": r.meter_id, "obis": r.obis, "value": r.value,
                       "unit": r.unit, "taken_at": iso_ms(to_ms(r.taken_at)), "quality": r.quality,
                       "flags": flag_names(r.quality)}, separators=(",", ":")).encode()


@dataclass
class MqttStats:
    queued: int = 0        # accepted by publish()
    sent: int = 0          # handed to the broker connection
    delivered: int = 0     # acknowledged by the broker (PUBACK)
    dropped: int = 0       # discarded because the queue was full (broker down or too slow)
    connects: int = 0


class MqttPublisher:
    def __init__(self, gateway_id: str, host: str = "127.0.0.1", port: int = 1883, *,
                 topic_prefix: str = "meterlink", queue_size: int = 10_000, keepalive: int = 30,
                 client_id: str | None = None) -> None:
        self.gateway_id, self.host, self.port = gateway_id, host, port
        self.topic_prefix = topic_prefix
        self.stats = MqttStats()
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._stopping = False
        self.status_topic = f"{topic_prefix.rstrip('/')}/{gateway_id.translate(_UNSAFE)}/status"
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"meterlink-{gateway_id}")
        self._client.max_queued_messages_set(queue_size)
        self._client.will_set(self.status_topic, b"offline", qos=QOS, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._thread = threading.Thread(target=self._run, name="mqtt publisher", daemon=True)

    # -- paho callbacks (paho's network thread) ---------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            return
        self.stats.connects += 1
        client.publish(self.status_topic, b"online", qos=QOS, retain=True)
        self._connected.set()
        with self._cond:
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.stats.delivered += 1

    # -- the shell ---------------------------------------------------------------------------
    def start(self) -> "MqttPublisher":
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        self._thread.start()
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, readings: list[Reading]) -> None:
        """Queue readings for publication; never blocks (drops the oldest when the queue is full)."""
        with self._cond:
            for r in readings:
                if len(self._queue) >= self._queue_size:
                    self._queue.popleft()
                    self.stats.dropped += 1
                self._queue.append((topic_for(self.topic_prefix, self.gateway_id, r.meter_id, r.obis),
                                    payload_for(self.gateway_id, r)))
                self.stats.queued += 1
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or not self._connected.is_set()):
                    self._cond.wait(0.5)
                if self._stopping and (not self._queue or not self._connected.is_set()):
                    return
                topic, payload = self._queue.popleft()
            info = self._client.publish(topic, payload, qos=QOS, retain=RETAIN)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                self.stats.dropped += 1
            else:
                self.stats.sent += 1

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (real time) until the queue is empty and the broker acknowledged what was sent."""
        pause = threading.Event()   # never set: a plain real-time wait between checks
        for _ in range(max(0, int(timeout_s / 0.02))):
            if not self._queue and self.stats.delivered >= self.stats.sent:
                return True
            pause.wait(0.02)
        return not self._queue and self.stats.delivered >= self.stats.sent

    def close(self, timeout_s: float = 2.0) -> None:
        self.flush(timeout_s if self.connected else 0)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)
        if self.connected:
            info = self._client.publish(self.status_topic, b"offline", qos=QOS, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
