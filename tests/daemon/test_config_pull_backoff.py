"""The daemon's periodic configuration pull: applied when due, and while the head-end is unreachable the
failures are counted and backed off on the injected clock, never raised."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from meterlink import pki
from meterlink.clock import SimClock
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.enrol import enroll
from meterlink.headend.enrolment import make_secure_servers
from meterlink.headend.registry import open_registry
from meterlink.headend.store import open_repository


def test_pulls_when_due_and_backs_off_without_raising_while_the_headend_is_down(tmp_path):
    clock = SimClock(datetime.now(timezone.utc).replace(microsecond=0))   # TLS checks validity on the real clock
    url = f"sqlite:///{tmp_path / 'he.db'}"
    repo, registry = open_repository(url), open_registry(url)
    keys = pki.ensure_headend_pki(tmp_path / "he-pki", ["127.0.0.1"], clock.now())
    servers = make_secure_servers(repo, clock, keys, registry, "127.0.0.1:0", "127.0.0.1:0").start()
    gw = None
    try:
        code = registry.add("GW-P", clock.now())
        registry.provision("GW-P", ["P-1"], [], clock.now())
        enroll(f"127.0.0.1:{servers.enrol_port}", code, tmp_path / "gw-pki", ca_fingerprint=keys.ca_fingerprint)
        (tmp_path / "gateway.toml").write_text(
            f'[gateway]\nid = "GW-P"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 900\n\n'
            f'[headend]\naddress = "127.0.0.1:{servers.port}"\npki_dir = "{tmp_path / "gw-pki"}"\n'
            f'config_pull_s = 600\n')
        gw = Gateway(load_config(str(tmp_path / "gateway.toml")), clock)
        assert gw.pull_config_once() and gw.config_version >= 1          # P-1 provisioned: version 1
        assert not gw.pull_config_once()                                 # not due again for 600 s
        registry.provision("GW-P", ["P-2"], [], clock.now())
        clock.advance(timedelta(seconds=600))
        assert gw.pull_config_once() and gw.config_version >= 2
        assert gw.stats.config_pulls == 2 and gw.stats.config_pull_errors == 0

        servers.stop(None)                                               # head-end gone
        clock.advance(timedelta(seconds=600))
        gw._config_puller.timeout_s = 1.0
        assert gw.pull_config_once() is False                            # counted, not raised
        assert gw.stats.config_pull_errors == 1
        retry_at = gw.next_config_pull
        assert clock.now() <= retry_at <= clock.now() + timedelta(seconds=30)  # first back-off: up to 30 s
        assert gw.pull_config_once() is False and gw.stats.config_pull_errors == 1   # waits for its back-off
        clock.advance(retry_at - clock.now())
        assert gw.pull_config_once() is False and gw.stats.config_pull_errors == 2
        assert gw.next_config_pull - clock.now() <= timedelta(seconds=60)    # doubling ceiling, capped at 600 s
        assert any("configuration pull" in e and "failed" in e for e in gw.stats.errors)
    finally:
        if gw is not None:
            gw.close()
        servers.stop(None)
        registry.close()
        repo.close()
