"""The README's commands exist and its configuration example loads: docs that cannot drift silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meterlink.gateway.cli import build_parser as gateway_parser
from meterlink.gateway.config import load_config
from meterlink.headend.cli import build_parser as headend_parser
from meterlink.sim.cli import build_parser as sim_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"**{title}**")
    end = README.find("\n**", start + 5)
    return README[start:end if end > 0 else len(README)]


def _commands(section: str) -> set[str]:
    """First word of each command cell of a README table, plus the `a|b` alternatives of `x a|b`."""
    out = set()
    for cell in re.findall(r"^\| `([^`]+)`", section, re.M):
        out.add(cell.split()[0])
    return out


def _subcommands(parser) -> set[str]:
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return set(action.choices)
    return set()


@pytest.mark.parametrize("title, parser", [("Simulators", sim_parser), ("Gateway", gateway_parser),
                                           ("Head-end", headend_parser)])
def test_every_command_the_readme_names_exists(title, parser):
    named = _commands(_section(title))
    assert named, f"no commands found in the README's {title} table"
    missing = named - _subcommands(parser())
    assert not missing, f"README names {title} commands that do not exist: {sorted(missing)}"


def test_readme_gateway_config_example_loads(tmp_path):
    block = re.search(r"```toml\n(.*?)```", README, re.S).group(1)
    # device paths of the example are not on this machine; the loader does not open them
    cfg_file = tmp_path / "gateway.toml"
    cfg_file.write_text(block)
    cfg = load_config(str(cfg_file))
    assert cfg.id == "gw-0001" and cfg.buses[0].meters[0].profile.name == "eastron_sdm630"
    assert cfg.p1 and cfg.p1[0].version == "5" and cfg.mqtt is not None


def test_readme_quick_start_is_the_two_make_commands():
    quick = README[README.index("## Quick start"):README.index("## Quick start") + 400]
    assert re.search(r"```sh\nmake demo .*\nmake test .*\n```", quick)
