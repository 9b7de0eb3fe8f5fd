"""Power cut: the real `meterlink-gateway run` process, polling simulated meters over Modbus TCP and pushing
to a real gRPC head-end, is SIGKILLed at random moments and restarted; at the end the head-end holds every
journaled reading exactly once and the chain verifies end to end. Every process shares one scaled clock."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from meterlink.chain import first_break, hash_of
from meterlink.clock import ScaledClock
from meterlink.gateway.journal import Journal
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.sync import load_or_create_key
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer

from .conftest import GW, START, Headend, assert_chain_verifies

BIN = Path(sys.executable).parent
SPEED = 3000.0            # a 15-minute poll every 0.3 s of real time


def write_config(tmp: Path, headend: str, tcp: str) -> Path:
    cfg = tmp / "gateway.toml"
    cfg.write_text(f"""[gateway]
id = "{GW}"
database = "{tmp / 'gw.db'}"
poll_interval_s = 900
push_batch = 200

[headend]
address = "{headend}"

[[bus]]
port = "tcp://{tcp}"
timeout_s = 0.5

[[bus.meter]]
id = "PC-1"
unit = 1
profile = "eastron_sdm630"

[[bus.meter]]
id = "PC-2"
unit = 2
profile = "eastron_sdm630"
""")
    return cfg


def power_cuts(tmp_path: Path, cuts: int, seed: int) -> None:
    rng = random.Random(seed)
    clock = ScaledClock(START, SPEED, time.time() + 0.5)
    spec = clock.spec()
    profile = load_profile("eastron_sdm630")
    meters = TcpServer({1: MeterModel.starting_at(profile, clock, unit=1, seed=3, import_wh=700_000),
                        2: MeterModel.starting_at(profile, clock, unit=2, seed=4, import_wh=90_000)}).start()
    he = Headend(tmp_path / "headend.db", clock).start()
    he.trust(GW, load_or_create_key(tmp_path / "signing.key"))     # the key the daemon will find beside gw.db
    cfg = write_config(tmp_path, he.addr, meters.address)
    log = open(tmp_path / "gateway.log", "ab")
    run = [str(BIN / "meterlink-gateway"), "run", "--config", str(cfg), "--clock", spec]
    try:
        killed_with_data = 0
        for i in range(cuts):
            proc = subprocess.Popen(run, stdout=log, stderr=log)
            time.sleep(rng.uniform(0.5, 3.0))      # start-up, mid-poll, mid-journal commit or mid-push
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            killed_with_data += (tmp_path / "gw.db").exists()
        # power stays on: the last run polls a little longer, then drains and exits
        until = clock.now() + timedelta(hours=4)
        done = subprocess.run(run + ["--until", until.isoformat()], stdout=log, stderr=log, timeout=120)
        last = (tmp_path / "gateway.log").read_text().strip().splitlines()[-1]
        assert done.returncode == 0 and last.endswith(" 0 unacked"), last
        assert killed_with_data >= cuts // 2
    finally:
        log.close()
        he.stop()
        meters.stop()

    journal = Journal(tmp_path / "gw.db")
    try:
        local = journal.records()
        assert journal.unacked_count() == 0
    finally:
        journal.close()
    assert local and [r.seq for r in local] == list(range(1, len(local) + 1))
    assert first_break([r.chain_record() for r in local]) is None
    held = assert_chain_verifies(tmp_path / "headend.db", GW)
    # exactly the journal, record for record (same seq, same hash), nothing lost, nothing doubled
    assert [(r.seq, hash_of(r)) for r in held] == [(r.seq, r.hash) for r in local]
    con = sqlite3.connect(tmp_path / "headend.db")
    dup = con.execute("SELECT meter_id, obis, taken_at_ms, COUNT(*) FROM gateway_record GROUP BY 1, 2, 3 "
                      "HAVING COUNT(*) > 1").fetchall()
    con.close()
    assert dup == []
    # every poll reached both meters' billing register
    polls = {(r.body.meter_id, r.body.taken_at) for r in local if r.body.obis == "1.8.0"}
    assert {m for m, _ in polls} == {"PC-1", "PC-2"}


def test_sigkill_at_ten_random_moments_loses_and_doubles_nothing(tmp_path):
    power_cuts(tmp_path, cuts=10, seed=int(os.environ.get("POWER_CUT_SEED", "20261124")))


@pytest.mark.slow
def test_sigkill_at_a_hundred_random_moments_loses_and_doubles_nothing(tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("long variant (about 3 minutes): run with -m slow")
    power_cuts(tmp_path, cuts=100, seed=int(os.environ.get("POWER_CUT_SEED", "4")))
