"""The watchdog's judgement: idle components are healthy however long they wait; a busy one that overruns is
stalled and stops the pings; STATUS= says which."""

from __future__ import annotations

from meterlink.gateway.health import ProgressMonitor, Watchdog


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def watchdog(self) -> bool:
        self.sent.append("WATCHDOG=1")
        return True

    def status(self, text: str) -> bool:
        self.sent.append(f"STATUS={text}")
        return True


def test_a_bus_waiting_for_its_next_poll_is_never_stalled_but_a_hung_read_is():
    mon = ProgressMonitor(max_silence_s=10)
    mon.idle("bus A", 0)
    mon.idle("journal writer", 0)
    assert mon.healthy(3600)                     # an hour between two polls is fine
    mon.busy("bus A", 3600)
    assert mon.healthy(3609)
    assert mon.stalled(3611) == ["bus A"]
    mon.idle("bus A", 3612)
    assert mon.healthy(9999)


def test_watchdog_pings_only_while_healthy_and_reports_the_stalled_component_once():
    now = [0.0]
    mon = ProgressMonitor(max_silence_s=5)
    mon.idle("journal writer", 0)
    mon.idle("/dev/ttyUSB0", 0)
    out = Recorder()
    wd = Watchdog(out, mon, 1.0, lambda: now[0], status=lambda: "polling 2 meter(s)")
    assert wd.tick()
    mon.busy("/dev/ttyUSB0", 1)
    now[0] = 7.0
    assert not wd.tick() and not wd.tick()
    mon.idle("/dev/ttyUSB0", 8)
    now[0] = 8.0
    assert wd.tick()
    assert out.sent == ["STATUS=polling 2 meter(s)", "WATCHDOG=1",
                        "STATUS=stalled: /dev/ttyUSB0 (watchdog pings stopped)",
                        "STATUS=polling 2 meter(s)", "WATCHDOG=1"]


def test_stall_after_s_is_read_from_the_gateway_section(tmp_path):
    import pytest

    from meterlink.errors import ConfigError
    from meterlink.gateway.config import load_config
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nid = "g"\nstall_after_s = 45\n')
    assert load_config(str(cfg)).stall_after_s == 45.0
    cfg.write_text('[gateway]\nid = "g"\nstall_after_s = 0\n')
    with pytest.raises(ConfigError, match="stall_after_s"):
        load_config(str(cfg))
