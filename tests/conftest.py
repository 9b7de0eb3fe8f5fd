"""Fixtures shared by every test directory: a real MQTT broker."""

from __future__ import annotations

import shutil
import socket
import subprocess
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
