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


def test_the_pool_hook_caps_the_server_threads(monkeypatch, tmp_path):
    """The hook `cmd_serve` installs for --rpc-workers: the executor never runs more threads than N."""
    from datetime import datetime, timezone
    from meterlink.headend.store import open_repository
    hooks: list = []
    monkeypatch.setattr(service, "SERVER_HOOKS", hooks)

    class Stop(Exception):
        pass

    def stop_here():            # cmd_serve has installed its hooks when it asks for the signal handlers
        raise Stop

    monkeypatch.setattr(cli, "stop_on_signals", stop_here)
    args = cli.build_parser().parse_args(["serve", "--rpc-workers", "2", "--database",
                                          f"sqlite:///{tmp_path}/h.db", "--config", str(tmp_path / "none.toml")])
    monkeypatch.setattr(cli, "load_config", lambda path: type("Cfg", (), {"database": "", "listen": ""})())
    with pytest.raises(Stop):
        cli.cmd_serve(args)
    assert len(hooks) == 1
    repo = open_repository(f"sqlite:///{tmp_path}/h.db")
    server, _ = service.make_server(repo, SimClock(datetime(2026, 3, 9, tzinfo=timezone.utc)), "127.0.0.1:0")
    assert server.executor._max_workers == 2
    futures = [server.executor.submit(lambda: None) for _ in range(10)]
    for f in futures:
        f.result()
    assert len(server.executor._threads) <= 2
    server.stop(None)
    server.executor.shutdown()
    repo.close()
