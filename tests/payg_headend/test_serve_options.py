"""`meterlink-headend serve --rpc-workers N`: the gRPC server's worker pool (docs/payg.md, Benchmark)."""

from __future__ import annotations

import pytest

from meterlink.clock import SimClock
from meterlink.headend import cli
from meterlink.headend import service


def test_rpc_workers_is_a_positive_count_and_absent_by_default():
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).rpc_workers is None
    assert parser.parse_args(["serve", "--rpc-workers", "3"]).rpc_workers == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--rpc-workers", "0"])


def test_the_worker_count_caps_the_server_threads_on_both_server_kinds(tmp_path):
    """`serve --rpc-workers N` passes N to make_server (plaintext) or make_secure_servers (mTLS): the executor
    never runs more threads than N."""
    from datetime import datetime, timezone

    from meterlink import pki
    from meterlink.headend.enrolment import make_secure_servers
    from meterlink.headend.registry import open_registry
    from meterlink.headend.store import open_repository
    url = f"sqlite:///{tmp_path}/h.db"
    repo, registry = open_repository(url), open_registry(url)
    clock = SimClock(datetime.now(timezone.utc).replace(microsecond=0))
    plain, _ = service.make_server(repo, clock, "127.0.0.1:0", workers=2)
    keys = pki.ensure_headend_pki(tmp_path / "pki", ["127.0.0.1"], clock.now())
    secure = make_secure_servers(repo, clock, keys, registry, "127.0.0.1:0", "127.0.0.1:0", workers=3)
    for server, n in ((plain, 2), (secure.server, 3)):
        futures = [server.executor.submit(lambda: None) for _ in range(10)]
        for f in futures:
            f.result()
        assert server.executor._max_workers == n and len(server.executor._threads) <= n
        service.stop_server(server, None)
    secure.enrol_server.stop(None)
    registry.close()
    repo.close()
