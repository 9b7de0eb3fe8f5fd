"""Readings on MQTT, against a real Mosquitto broker and a real paho subscriber."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.mqtt import MqttPublisher, payload_for, topic_for
from meterlink.readings import Quality, Reading

from .conftest import START, sim_meters


class Subscriber:
    def __init__(self, host: str, port: int, topic: str) -> None:
        self.messages: dict[str, paho.MQTTMessage] = {}
        self.count = 0
        self.lock = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages[msg.topic] = msg
            self.count += 1
            self.lock.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> dict:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.messages) >= n, timeout), \
                f"got {len(self.messages)} of {n} topics: {sorted(self.messages)}"
            return dict(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def clear_retained(host, port, topics) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.connect(host, port)
    c.loop_start()
    for t in topics:
        c.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def test_topic_and_payload_carry_exact_integers_and_quality_flags():
    r = Reading("MTR/1", "1.8.0", START + timedelta(milliseconds=1234), 12_345_680, "Wh",
                int(Quality.DECREASE | Quality.CLOCK_UNTRUSTED))
    assert topic_for("meterlink", "gw-1", r.meter_id, r.obis) == "meterlink/gw-1/MTR_1/1.8.0"
    assert json.loads(payload_for("gw-1", r)) == {
        "gateway": "gw-1", "meter": "MTR/1", "obis": "1.8.0", "value": 12_345_680, "unit": "Wh",
        "taken_at": "2026-11-24T00:00:01.234Z", "quality": 18, "flags": ["DECREASE", "CLOCK_UNTRUSTED"]}


def test_each_reading_is_published_retained_with_qos_1_as_it_is_taken(tmp_path, clock, pty_bus, mqtt_broker):
    host, port = mqtt_broker
    prefix = f"meterlink-test-{uuid.uuid4().hex[:8]}"
    bus = pty_bus(sim_meters(clock, {1: "eastron_sdm630"}))
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
id = "gw-mqtt"
database = "{tmp_path / 'gw.db'}"

[mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"

[[bus]]
port = "{bus.client_path}"

[[bus.meter]]
id = "MTR-1"
unit = 1
profile = "eastron_sdm630"
""")
    live = Subscriber(host, port, f"{prefix}/#")
    gw = Gateway(load_config(str(cfg)), clock)
    topics = []
    try:
        deadline = time.monotonic() + 10
        while not gw.mqtt.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        gw.poll_once()
        journaled = {r.reading.obis: r.reading for r in gw.journal.unacked(100)}
        got = live.wait_for(len(journaled) + 1)            # every quantity + the status topic
        topics = list(got)
        assert got[f"{prefix}/gw-mqtt/status"].payload == b"online"
        for obis, reading in journaled.items():
            msg = got[f"{prefix}/gw-mqtt/MTR-1/{obis}"]
            body = json.loads(msg.payload)
            assert body["value"] == reading.value and isinstance(body["value"], int)
            assert (body["unit"], body["quality"], body["taken_at"]) == (reading.unit, 0, "2026-11-24T00:00:00.000Z")
            assert msg.qos == 1
        # a display that connects later gets the latest value of every register at once (retain)
        late = Subscriber(host, port, f"{prefix}/gw-mqtt/MTR-1/#")
        try:
            retained = late.wait_for(len(journaled), timeout=5)
            assert all(m.retain for m in retained.values())
            assert json.loads(retained[f"{prefix}/gw-mqtt/MTR-1/1.8.0"].payload)["value"] == journaled["1.8.0"].value
        finally:
            late.close()
        assert gw.mqtt.stats.dropped == 0
    finally:
        gw.close()
        live.close()
        clear_retained(host, port, topics + [f"{prefix}/gw-mqtt/status"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readings(n: int) -> list[Reading]:
    return [Reading("MTR-1", "1.8.0", START + timedelta(minutes=15 * i), 1000 + i, "Wh") for i in range(n)]


def test_publishing_never_blocks_when_the_broker_is_down_and_counts_what_it_drops():
    pub = MqttPublisher("gw-down", "127.0.0.1", _free_port(), queue_size=5).start()
    try:
        started = time.monotonic()
        pub.publish(_readings(12))
        assert time.monotonic() - started < 0.1
        assert (pub.stats.queued, pub.stats.dropped, pub.pending()) == (12, 7, 5)
        assert not pub.connected
    finally:
        started = time.monotonic()
        pub.close()
        assert time.monotonic() - started < 3


@pytest.mark.skipif(not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                    reason="mosquitto binary not installed")
def test_readings_queued_while_the_broker_is_down_arrive_when_it_comes_back(tmp_path):
    port = _free_port()
    pub = MqttPublisher("gw-late", "127.0.0.1", port, topic_prefix="late", queue_size=100).start()
    pub.publish(_readings(3))                               # the newest value per topic is retained
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not pub.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.connected, "publisher did not reconnect"
        assert pub.flush(5)
        sub = Subscriber("127.0.0.1", port, "late/#")
        try:
            got = sub.wait_for(2)
            assert json.loads(got["late/gw-late/MTR-1/1.8.0"].payload)["value"] == 1002
            assert pub.stats.dropped == 0 and pub.stats.sent == 3
        finally:
            sub.close()
    finally:
        pub.close()
        broker.terminate()
        broker.wait(5)
