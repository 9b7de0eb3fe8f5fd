"""Fixtures shared by every test directory: a real MQTT broker and a real subscriber."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    """(host, port) of a real Mosquitto: the one on 127.0.0.1:1883, else a private one on a free port."""
    if _port_open("127.0.0.1", 1883):
        yield "127.0.0.1", 1883
        return
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        pytest.skip("no Mosquitto broker running on 127.0.0.1:1883 and no mosquitto binary to start one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"private mosquitto on port {port} did not start")
        time.sleep(0.05)
    yield "127.0.0.1", port
    proc.terminate()
    proc.wait(timeout=5)


class Subscriber:
    """A real MQTT subscriber collecting (topic, JSON payload) on `pattern`."""

    def __init__(self, host: str, port: int, pattern: str) -> None:
        import paho.mqtt.client as mqtt
        self.messages: list[tuple[str, dict]] = []
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(pattern, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._ready.wait(5), "MQTT subscription not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def wait_for(self, n: int, timeout: float = 5.0) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.02)
        return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber(mqtt_broker):
    subs = []

    def make(pattern: str) -> Subscriber:
        s = Subscriber(*mqtt_broker, pattern)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()
