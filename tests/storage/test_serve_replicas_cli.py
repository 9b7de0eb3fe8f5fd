"""`meterlink-headend migrate` then two real `meterlink-headend serve --database URL` processes on one database:
a gateway pushing to either replica in turn ends with every record once and an unbroken chain."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from storage_records import T0

from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import Pusher, load_or_create_key, write_public_key
from meterlink.readings import Reading

BIN = Path(sys.executable).parent
GW = "gw-cli-replicas"


def _headend(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "meterlink-headend"), *args], capture_output=True, text=True, timeout=120, **kw)


def _serve(url: str, log: Path) -> tuple[subprocess.Popen, str]:
    """A `serve` process; its stderr goes to `log` (a pipe nobody reads could fill and block the server)."""
    with open(log, "w") as err:
        proc = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", "--listen", "127.0.0.1:0", "--database", url,
                                 "--config", "/dev/null", "--clock", f"sim:{T0.isoformat()}"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"serve did not start: {log.read_text()}")
    return proc, line


def _stop(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM must end serve by itself, with status 0: a hung stop dumps its threads' stacks into the log
    (meterlink.stopping.bound_shutdown) and exits 1 within 20 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"serve did not stop on SIGTERM within 45 s; its stderr:\n{log.read_text()}") from None
    finally:
        proc.stdout.close()
    assert proc.returncode == 0, f"serve exited {proc.returncode} on SIGTERM; its stderr:\n{log.read_text()}"


def test_two_serve_processes_on_one_database_share_the_work(backend, repo_url, tmp_path):
    assert _headend("migrate", "--database", repo_url).returncode == 0
    key = load_or_create_key(tmp_path / "gw.key")
    write_public_key(key, tmp_path / "gw.pub")
    trusted = _headend("trust-gateway", GW, "--public-key", str(tmp_path / "gw.pub"), "--database", repo_url)
    assert trusted.returncode == 0, trusted.stderr
    journal = Journal(tmp_path / "gw.db")
    journal.append([Reading("MTR-C", "1.8.0", T0 + timedelta(minutes=15 * i), 1_000 + i, "Wh") for i in range(3_000)])
    logs = [tmp_path / f"serve{i}.log" for i in range(2)]
    servers = [_serve(repo_url, log) for log in logs]
    pushers = [Pusher(GW, addr, journal, batch=250, key=key, timeout_s=60) for _, addr in servers]
    try:
        turn = 0
        while journal.unacked_count():
            pushers[turn % 2].push_once()          # replicas take turns: each sees the other's commits
            turn += 1
        assert turn == 12
    finally:
        for p in pushers:
            p.close()
        for (proc, _), log in zip(servers, logs):
            _stop(proc, log)
    shown = _headend("readings", "--meter", "MTR-C", "--database", repo_url, "--json")
    assert shown.returncode == 0, shown.stderr
    import json
    values = [r["value"] for r in json.loads(shown.stdout)["readings"]]
    assert values == [1_000 + i for i in range(3_000)]
