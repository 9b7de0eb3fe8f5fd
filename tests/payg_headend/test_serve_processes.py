"""`meterlink-headend serve --payg --processes 2` on one SQLite database: real processes, mutual TLS, the
gateways' connections spread over both processes, and credit control stays exact across them
(retransmissions answered identically and booked once, running balances equal to the ledger)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.gateway.enrol import channel_credentials, enroll
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S
from meterlink.headend.cli import _replica_argv, build_parser
from meterlink.v1 import payg_pb2, payg_pb2_grpc

BIN = Path(sys.executable).parent
ACCOUNTS = 6


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _established_on(port: int) -> set[str]:
    """Socket inodes of the ESTABLISHED TCP connections whose local port is `port` (the server side)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):      # gRPC may use IPv6 sockets (IPv4-mapped addresses)
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rpartition(":")[2], 16) == port and f[3] == "01":
                out.add(f[9])
    return out


def test_replica_command_line_keeps_the_options_and_drops_processes_metrics_and_rating():
    args = build_parser().parse_args(["serve", "--payg", "--processes", "3", "--rpc-workers", "3", "--pki-dir", "p",
                                      "--metrics-listen", "127.0.0.1:0", "--payg-max-grant", "900"])
    argv = _replica_argv(args, "127.0.0.1:5555")
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:5555"
    assert {"--payg", "--no-rating", "--replica"} <= set(argv)
    assert argv[argv.index("--rpc-workers") + 1] == "3" and argv[argv.index("--payg-max-grant") + 1] == "900"
    assert argv[argv.index("--pki-dir") + 1] == "p"
    assert "--processes" not in argv and "--metrics-listen" not in argv


def test_two_serve_processes_share_the_port_and_keep_credit_control_exact(tmp_path):
    db = tmp_path / "headend.db"
    url = f"sqlite:///{db}"
    now = datetime.now(timezone.utc).replace(microsecond=0)
    store = S.PaygStore(url)
    for i in range(ACCOUNTS):
        store.put_account(f"ACC{i}", "GBP", max_balance_minor=10**9)
        store.append([L.top_up(f"seed:{i}", now, f"ACC{i}", "SHOP1", 100_000, "GBP", store.vat)])
        store.bind_meter(f"M{i}", f"ACC{i}", now)
    store.close()
    (tmp_path / "token.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "headend.toml").write_text(f'[headend]\nlisten = "127.0.0.1:0"\ndatabase = "{url}"\n')
    common = ["--config", str(tmp_path / "headend.toml"), "--pki-dir", str(tmp_path / "pki")]
    serve = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", *common, "--enrol-listen", "127.0.0.1:0",
                              "--payg", "--payg-token-key", str(tmp_path / "token.pem"), "--processes", "2",
                              "--no-rating", "--payg-min-grant", "50", "--payg-max-grant", "500"],
                             stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    channels = []
    try:
        address = serve.stdout.readline().strip()
        enrol = serve.stdout.readline().split()                      # enrol PORT ca-sha256 FP
        assert address and enrol, "serve --processes 2 did not start"
        children = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(serve.pid)], text=True,
                                                   capture_output=True).stdout.split()]
        replicas = [p for p in children if "--replica" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(replicas) == 1
        added = subprocess.run([str(BIN / "meterlink-headend"), "gateways", "add", "gw1", *common,
                                *sum((["--meter", f"M{i}"] for i in range(ACCOUNTS)), []), "--json"],
                               capture_output=True, text=True, check=True, cwd=tmp_path)
        code = json.loads(added.stdout)["code"]
        identity = enroll(f"127.0.0.1:{enrol[1]}", code, tmp_path / "gw", ca_fingerprint=enrol[3])
        for _ in range(16):            # 16 connections: all on one process has odds 2 ** -15
            channels.append(grpc.secure_channel(address, channel_credentials(identity),
                                                options=[("grpc.use_local_subchannel_pool", 1)]))
        stubs = [payg_pb2_grpc.CreditControlStub(c) for c in channels]

        def request(i: int, n: int) -> payg_pb2.CreditControlRequest:
            return payg_pb2.CreditControlRequest(
                gateway_id="gw1", session_id=f"S{i}", request_number=n, account_id=f"ACC{i}", meter_id=f"M{i}",
                currency="GBP", used=payg_pb2.UsedUnits(used_minor=40, used_wh=1600) if n else None)

        calls = 0
        for i in range(ACCOUNTS):
            assert stubs[i % 16].Reserve(request(i, 0), timeout=20).result_code == 2001
        for n in range(1, 4):
            for i in range(ACCOUNTS):
                calls += 1
                first = stubs[calls % 16].Update(request(i, n), timeout=20)
                again = stubs[(calls + 5) % 16].Update(request(i, n), timeout=20)    # a retransmission
                assert first.result_code == 2001
                for a in (first, again):       # the card lists are signed afresh each time (version = now)
                    a.ClearField("card_list")
                    a.ClearField("blacklist")
                assert again == first
        port = int(address.rpartition(":")[2])
        served = _established_on(port)
        per_process = [len(_socket_inodes(pid) & served) for pid in (serve.pid, *replicas)]
        assert sum(per_process) == 16 and min(per_process) > 0, per_process
    finally:
        for c in channels:
            c.close()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        serve.stdout.close()
    assert not Path(f"/proc/{replicas[0]}").exists()         # the further process stopped with the first
    store = S.PaygStore(url)
    try:
        assert store.verify_balances() == []
        for i in range(ACCOUNTS):            # 3 updates of 40 each booked once, however often they were sent
            assert -store.balance(L.prepaid(f"ACC{i}"), "GBP") == 100_000 - 3 * 40
        assert sum(1 for t in store.transactions() if t.business_key.startswith("cc:")) == 3 * ACCOUNTS
    finally:
        store.close()


def _replica_pids(pid: int) -> list[int]:
    out = []
    for child in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], text=True,
                                capture_output=True).stdout.split():
        try:
            if "--replica" in Path(f"/proc/{child}/cmdline").read_text():
                out.append(int(child))
        except OSError:                  # exited meanwhile
            pass
    return out


def _listening_on(port: int) -> set[str]:
    """Socket inodes of the TCP sockets listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rpartition(":")[2], 16) == port and f[3] == "0A":
                out.add(f[9])
    return out


def test_a_killed_further_process_is_restarted_on_the_port_and_sigterm_still_stops_all(tmp_path):
    """kill -9 of the further process: the first logs it, starts a new one on the same port within ~1 s and
    counts the restart in its metrics; SIGTERM to the first then stops both, status 0 (a further process that
    stops otherwise is logged as such, which the log must not show)."""
    import os
    import time
    import urllib.request

    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        serve = subprocess.Popen([str(BIN / "meterlink-headend"), "-v", "serve", "--listen", "127.0.0.1:0",
                                  "--database", f"sqlite:///{tmp_path / 'headend.db'}", "--config", "/dev/null",
                                  "--processes", "2", "--no-rating", "--metrics-listen", "127.0.0.1:0"],
                                 stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        address = serve.stdout.readline().strip()
        metrics_url = serve.stdout.readline().split()[-1]
        assert address and metrics_url.startswith("http://"), log.read_text()
        port = int(address.rpartition(":")[2])

        def restarts() -> float:
            body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
            return float(next(line.split()[1] for line in body.splitlines()
                              if line.startswith("meterlink_headend_process_restarts_total ")))

        [old] = _replica_pids(serve.pid)
        assert f"further serve process pid {old} listening on {address}" in log.read_text()
        assert restarts() == 0
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while restarts() < 1:
            assert time.monotonic() < deadline, log.read_text()
            assert serve.poll() is None, log.read_text()
            time.sleep(0.1)
        [new] = _replica_pids(serve.pid)
        assert new != old
        text = log.read_text()
        assert f"further serve process {old} was killed by signal 9 (SIGKILL)" in text
        assert f"further serve process restarted: pid {new} (restart 1)" in text
        listening = _listening_on(port)             # both processes listen on the one port again
        assert _socket_inodes(serve.pid) & listening and _socket_inodes(new) & listening
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=10)
        channel.close()
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(timeout=25)              # bound_shutdown(20) ends a hung stop with status 1
        except subprocess.TimeoutExpired:
            serve.kill()
            raise AssertionError(f"serve did not stop on SIGTERM: {log.read_text()}") from None
        finally:
            serve.stdout.close()
    assert code == 0, log.read_text()
    assert not Path(f"/proc/{new}").exists()
    assert "stopped with exit status" not in log.read_text()     # the further one stopped with status 0


def test_further_processes_stop_when_the_first_is_killed(tmp_path):
    """kill -9 of the first process: the further one gets SIGTERM (PR_SET_PDEATHSIG) and stops, so no
    unsupervised orphan keeps serving the port."""
    import os
    import time

    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        serve = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", "--listen", "127.0.0.1:0",
                                  "--database", f"sqlite:///{tmp_path / 'headend.db'}", "--config", "/dev/null",
                                  "--processes", "2", "--no-rating"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        address = serve.stdout.readline().strip()
        assert address, log.read_text()
        port = int(address.rpartition(":")[2])
        [further] = _replica_pids(serve.pid)
        assert _socket_inodes(further) & _listening_on(port)
    finally:
        serve.kill()
        serve.wait()
        serve.stdout.close()
    def state() -> str:                    # "Z": exited, a zombie awaiting its new parent's wait
        try:
            return Path(f"/proc/{further}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return "gone"

    deadline = time.monotonic() + 20
    while state() not in ("gone", "Z", "X"):
        if time.monotonic() > deadline:
            os.kill(further, signal.SIGKILL)
            raise AssertionError(f"further process {further} did not stop: {log.read_text()}")
        time.sleep(0.05)
    assert not _listening_on(port)
