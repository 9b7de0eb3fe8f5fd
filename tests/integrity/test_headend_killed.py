"""The head-end killed mid-batch (the real `meterlink-headend serve` process, SIGKILL) and a crash between its
two commits: after restarts the gateway resumes from the last ack; nothing is lost, nothing doubled."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from meterlink.errors import DeviceError
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import Pusher, load_or_create_key, write_public_key

from .conftest import GW, START, assert_chain_verifies, free_port, readings

BIN = Path(sys.executable).parent


def start_headend(db: Path, port: int, log) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", "--listen", f"127.0.0.1:{port}",
                             "--database", f"sqlite:///{db}", "--config", "/dev/null", "--clock",
                             f"sim:{START.isoformat()}"], stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()          # HOST:PORT once it listens
    assert line.strip().endswith(f":{port}"), line
    return proc


def test_headend_sigkilled_mid_batch_loses_and_doubles_nothing(tmp_path):
    rng = random.Random(11)
    key = load_or_create_key(tmp_path / "signing.key")
    write_public_key(key, tmp_path / "gw.pub")
    db = tmp_path / "headend.db"
    subprocess.run([str(BIN / "meterlink-headend"), "trust-gateway", GW, "--public-key", str(tmp_path / "gw.pub"),
                    "--database", f"sqlite:///{db}"], check=True, capture_output=True, timeout=60)
    journal = Journal(tmp_path / "gw.db")
    journal.append(readings(30_000))
    port = free_port()
    pusher = Pusher(GW, f"127.0.0.1:{port}", journal, batch=1000, key=key, timeout_s=20)
    log = open(tmp_path / "headend.log", "ab")
    kills = 0
    try:
        for _ in range(3):
            he = start_headend(db, port, log)
            failures: list[Exception] = []

            def drain():
                try:
                    pusher.drain()
                except DeviceError as exc:
                    failures.append(exc)
            before = journal.acked_seq()
            t = threading.Thread(target=drain)
            t.start()
            deadline = time.monotonic() + 30
            while journal.acked_seq() == before and time.monotonic() < deadline:
                time.sleep(0.005)                     # batches are flowing ...
            time.sleep(rng.uniform(0, 0.05))          # ... kill while one is verified or committed
            he.send_signal(signal.SIGKILL)
            he.wait(timeout=30)
            he.stdout.close()
            t.join(timeout=60)
            kills += bool(failures)
        assert 0 < journal.acked_seq() < 30_000
        he = start_headend(db, port, log)             # back for good: resume from the last ack
        try:
            pusher.drain()
        finally:
            he.send_signal(signal.SIGTERM)
            he.wait(timeout=30)
            he.stdout.close()
    finally:
        log.close()
        pusher.close()
    assert kills == 3, "a kill did not land while pushes were in flight"
    assert journal.unacked_count() == 0
    held = assert_chain_verifies(db, GW)
    assert [r.seq for r in held] == list(range(1, 30_001))
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM gateway_record").fetchone() == (30_000, 30_000)
    con.close()
    journal.close()


def test_a_crash_between_the_reading_commit_and_the_chain_commit_is_healed_by_the_re_send(tmp_path, headend, key):
    journal = Journal(tmp_path / "gw.db")
    journal.append(readings(30))
    real_commit = headend.chain.commit
    calls = []

    def crash_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SystemError("power cut between the two transactions")
        return real_commit(*args, **kwargs)
    headend.chain.commit = crash_once
    headend.chain.commit_with_readings = None     # the two-transaction path (PostgreSQL, or separate files)
    pusher = Pusher(GW, headend.addr, journal, batch=10, key=key)
    try:
        pusher.drain()
    except DeviceError:
        pass
    assert journal.acked_seq() == 10                      # the second batch's readings are in, its ack is not
    assert len(headend.repo.readings("M1")) == 20
    assert pusher.drain() == 20                            # re-sent: the readings count as duplicates once
    assert journal.unacked_count() == 0
    assert len(headend.repo.readings("M1")) == 30
    assert [r.seq for r in assert_chain_verifies(headend.path, GW)] == list(range(1, 31))


def test_a_crash_in_the_chain_part_of_the_one_transaction_store_leaves_no_readings(tmp_path, headend, key):
    # repository and chain store share the SQLite file: readings and chain head are one transaction
    journal = Journal(tmp_path / "gw.db")
    journal.append(readings(30))
    real_writer = headend.chain._writer
    calls = []

    def crash_once(*args, **kwargs):
        write = real_writer(*args, **kwargs)

        def maybe_crash(db):
            calls.append(1)
            if len(calls) == 2:
                raise SystemError("power cut inside the batch's transaction")
            write(db)
        return maybe_crash
    headend.chain._writer = crash_once
    pusher = Pusher(GW, headend.addr, journal, batch=10, key=key)
    try:
        pusher.drain()
    except DeviceError:
        pass
    assert journal.acked_seq() == 10
    assert len(headend.repo.readings("M1")) == 10         # the second batch stored nothing at all
    assert pusher.drain() == 20
    assert len(headend.repo.readings("M1")) == 30
    assert [r.seq for r in assert_chain_verifies(headend.path, GW)] == list(range(1, 31))
