"""[[p1]] in gateway.toml: port, DSMR version, meter ids; errors name file, line and key."""

from __future__ import annotations

import pytest

from meterlink.errors import ConfigError
from meterlink.gateway.config import P1Config, load_config

HEAD = '''
[gateway]
id = "gw-p1"
database = ":memory:"
'''


def write(tmp_path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(HEAD + text)
    return str(path)


def test_p1_ports_are_read_with_version_and_meter_ids(tmp_path):
    config = load_config(write(tmp_path, '''
[[p1]]
port = "/dev/ttyUSB1"
version = "4"
meter_id = "E-0100"
gas_meter_id = "G-0100"

[[p1]]
port = "/dev/ttyUSB2"
'''))
    assert config.p1 == (P1Config("/dev/ttyUSB1", "4", "E-0100", "G-0100"), P1Config("/dev/ttyUSB2", "5"))


@pytest.mark.parametrize("body, line, message", [
    ('[[p1]]\nport = "/dev/ttyUSB1"\nversion = "3.1"\n', 7, "DSMR version '3.1' unknown"),
    ('[[p1]]\nport = "/dev/ttyUSB1"\nbaud = 9600\n', None, "baud"),
    ('[[p1]]\nport = "/dev/ttyUSB1"\nmeter_id = "A"\n[[p1]]\nport = "/dev/ttyUSB2"\nmeter_id = "A"\n', None,
     r"key 'p1\[1\]\.meter_id': meter id 'A' is configured twice"),
    ('[[p1]]\nport = "tcp://10.0.0.5:502"\n', 6, "not a serial P1 port"),
])
def test_bad_p1_tables_are_refused_naming_file_line_and_key(tmp_path, body, line, message):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(path)
    assert str(exc.value).startswith(path + (f":{line}" if line else ""))
