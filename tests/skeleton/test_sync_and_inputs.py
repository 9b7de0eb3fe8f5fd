"""Idempotent push over real gRPC, generated-code freshness, and bad input that names the problem."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from meterlink.errors import ConfigError
from meterlink.gateway.config import load_config
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import Pusher, to_proto
from meterlink.readings import Reading
from meterlink.v1 import sync_pb2, sync_pb2_grpc

from .conftest import START

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def readings(n: int, meter="M1"):
    return [Reading(meter, "1.8.0", START + timedelta(minutes=15 * i), 1000 + 7 * i, "Wh") for i in range(n)]


def test_re_pushing_the_same_batch_leaves_exactly_one_copy_at_the_headend(tmp_path, headend, gateway_key):
    repo, addr = headend
    journal = Journal(tmp_path / "gw.db")
    records = journal.append(readings(10))
    stub = sync_pb2_grpc.GatewaySyncStub(grpc.insecure_channel(addr))
    first = stub.Push(to_proto("gw-1", records, gateway_key), timeout=5)
    second = stub.Push(to_proto("gw-1", records, gateway_key), timeout=5)
    assert (first.accepted, first.duplicates, first.acked_seq) == (10, 0, 10)
    assert (second.accepted, second.duplicates, second.acked_seq) == (0, 10, 10)
    assert [r.value for r in repo.readings("M1")] == [1000 + 7 * i for i in range(10)]


def test_the_ack_never_covers_a_gap(tmp_path, headend, gateway_key):
    # protocol change (issue 4): a batch with a gap cannot be verified as a chain, so it is refused whole
    repo, addr = headend
    journal = Journal(tmp_path / "gw.db")
    records = journal.append(readings(6))
    stub = sync_pb2_grpc.GatewaySyncStub(grpc.insecure_channel(addr))
    ack = stub.Push(to_proto("gw-1", records[:2] + records[3:], gateway_key), timeout=5)  # seq 3 missing
    assert ack.acked_seq == 0 and sync_pb2.Refusal.Name(ack.refused) == "REFUSAL_GAP"
    ack = stub.Push(to_proto("gw-1", records[:2], gateway_key), timeout=5)
    assert ack.acked_seq == 2
    ack = stub.Push(to_proto("gw-1", records[3:], gateway_key), timeout=5)  # after the ack: still a gap
    assert ack.acked_seq == 2 and sync_pb2.Refusal.Name(ack.refused) == "REFUSAL_GAP"
    ack = stub.Push(to_proto("gw-1", records[2:], gateway_key), timeout=5)
    assert ack.acked_seq == 6


def test_gateway_marks_records_acked_only_after_the_headend_acknowledged(tmp_path, headend, gateway_key):
    repo, addr = headend
    journal = Journal(tmp_path / "gw.db")
    journal.append(readings(7))
    down = Pusher("gw-1", "127.0.0.1:1", journal, timeout_s=0.5, key=gateway_key)  # nothing listens there
    with pytest.raises(Exception, match="push to head-end 127.0.0.1:1 failed"):
        down.push_once()
    assert journal.unacked_count() == 7
    up = Pusher("gw-1", addr, journal, batch=3, key=gateway_key)
    assert up.drain() == 7
    assert journal.unacked_count() == 0 and len(repo.readings("M1")) == 7


def test_generated_grpc_code_is_not_stale(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = ROOT / "proto" / "meterlink" / "v1"
    fresh = tmp_path / "meterlink" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert names, "generator produced nothing"
    _, mismatch, errors = filecmp.cmpfiles(committed, fresh, names, shallow=False)
    assert not mismatch and not errors, (
        f"generated code is stale: {mismatch + errors}; run `python scripts/gen_proto.py` and commit")


def test_read_on_a_port_with_no_meter_fails_within_its_timeout_naming_port_unit_and_timeout(rtu_bus):
    t0 = time.monotonic()
    out = subprocess.run([str(BIN / "meterlink-gateway"), "read", "--port", rtu_bus.client_path, "--unit", "9",
                          "--profile", "eastron_sdm630", "--timeout", "0.4"], capture_output=True, text=True,
                         timeout=30)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert rtu_bus.client_path in out.stderr and "unit 9" in out.stderr and "0.4 s" in out.stderr, out.stderr
    assert elapsed < 10  # interpreter start-up + one 0.4 s timeout; never a hang


def test_read_on_a_tcp_port_with_nothing_listening_names_the_address():
    out = subprocess.run([str(BIN / "meterlink-gateway"), "read", "--port", "tcp://127.0.0.1:1", "--unit", "1",
                          "--profile", "eastron_sdm630", "--timeout", "0.3"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "tcp://127.0.0.1:1" in out.stderr


def test_an_unknown_profile_lists_the_known_ones():
    out = subprocess.run([str(BIN / "meterlink-gateway"), "read", "--port", "tcp://127.0.0.1:1",
                          "--profile", "eastron_sdm999"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "eastron_sdm999" in out.stderr and "eastron_sdm630" in out.stderr


GOOD = """[gateway]
id = "gw"
poll_interval_s = 900

[[bus]]
port = "/dev/ttyUSB0"

[[bus.meter]]
id = "M1"
unit = 1
profile = "eastron_sdm630"
"""


@pytest.mark.parametrize("broken, line, key", [
    (GOOD.replace('poll_interval_s = 900', 'poll_interval_s = "often"'), 3, "gateway.poll_interval_s"),
    (GOOD.replace('unit = 1', 'unit = 300'), 10, "bus[0].meter[0].unit"),
    (GOOD.replace('profile = "eastron_sdm630"', 'profile = "nope"'), 11, "bus[0].meter[0].profile"),
    (GOOD.replace('id = "gw"\n', ''), None, "gateway.id"),
    (GOOD.replace('port = "/dev/ttyUSB0"', 'prot = "/dev/ttyUSB0"'), 6, "bus[0].prot"),
])
def test_a_broken_config_file_names_the_file_line_and_key(tmp_path, broken, line, key):
    path = tmp_path / "gateway.toml"
    path.write_text(broken)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert str(path) in msg and f"'{key}'" in msg, msg
    if line:
        assert f"{path}:{line}" in msg, msg


def test_a_toml_syntax_error_names_file_and_line_through_the_cli(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.replace('unit = 1', 'unit = = 1'))
    out = subprocess.run([str(BIN / "meterlink-gateway"), "run", "--config", str(path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and f"{path}:10" in out.stderr, out.stderr


def test_good_config_loads(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD)
    cfg = load_config(str(path))
    assert cfg.buses[0].meters[0].profile.model == "SDM630" and cfg.headend is None
