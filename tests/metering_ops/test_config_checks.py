"""gateway.toml checks added for bus scheduling and MQTT: errors name the file, line and key."""

from __future__ import annotations

import pytest

from meterlink.errors import ConfigError
from meterlink.gateway.config import load_config

HEAD = '[gateway]\nid = "gw-c"\ndatabase = "/tmp/gw-c.db"\npoll_interval_s = {interval}\n'


def meters(n: int, first_unit: int = 1) -> str:
    return "".join(f'\n[[bus.meter]]\nid = "M{first_unit + i}"\nunit = {first_unit + i}\nprofile = "eastron_sdm630"\n'
                   for i in range(n))


def load(tmp_path, text: str):
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(str(path))


def test_scheduler_and_mqtt_keys_are_read(tmp_path):
    config = load(tmp_path, HEAD.format(interval=900)
                  + '\n[mqtt]\nhost = "broker.local"\nport = 8883\ntopic_prefix = "home/meters"\nqueue_size = 50\n'
                  + '\n[[bus]]\nport = "/dev/ttyUSB0"\nstagger_s = 30\nbackoff_base_s = 1\nbackoff_max_s = 600\n'
                  + meters(2))
    bus = config.buses[0]
    assert (bus.stagger_s, bus.backoff_base_s, bus.backoff_max_s) == (30.0, 1.0, 600.0)
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.topic_prefix, config.mqtt.queue_size) == \
        ("broker.local", 8883, "home/meters", 50)
    assert load(tmp_path, HEAD.format(interval=900)).mqtt is None


@pytest.mark.parametrize("body, message", [
    ('\n[[bus]]\nport = "/dev/ttyUSB0"\n' + meters(1) + '\n[[bus]]\nport = "/dev/ttyUSB0"\n' + meters(1, 5),
     "configured as two buses"),
    ('\n[[bus]]\nport = "/dev/ttyUSB0"\n' + meters(1) + '\n[[bus.meter]]\nid = "X"\nunit = 1\nprofile = "eastron_sdm630"\n',
     "unit 1 is used twice"),
    ('\n[[bus]]\nport = "/dev/ttyUSB0"\nstagger_s = 900\n' + meters(1), "must be shorter than poll_interval_s"),
    ('\n[[bus]]\nport = "/dev/ttyUSB0"\nbackoff_base_s = 0\n' + meters(1), "backoff_base_s"),
    ('\n[mqtt]\ntopic_prefix = "meterlink/#"\n', "without wildcards"),
    ('\n[mqtt]\nport = 70000\n', "outside 1..65535"),
    ('\n[mqtt]\nhots = "x"\n', "unknown key"),
])
def test_bad_scheduler_or_mqtt_settings_are_refused_naming_file_and_key(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message) as err:
        load(tmp_path, HEAD.format(interval=900) + body)
    assert "gateway.toml" in str(err.value)


def test_a_bus_whose_wire_time_exceeds_the_poll_interval_is_refused(tmp_path):
    text = HEAD.format(interval=5) + '\n[[bus]]\nport = "/dev/ttyUSB0"\nbaud = 1200\n' + meters(40)
    with pytest.raises(ConfigError, match="poll interval"):
        load(tmp_path, text)
    load(tmp_path, text.replace("poll_interval_s = 5", "poll_interval_s = 900"))   # fits in 15 minutes
