"""dsmr-parser (PyPI) as an independent peer: the values it reads from a telegram must equal ours."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from meterlink.gateway.dsmr import parse_telegram, to_readings

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)

PEER_OBIS = {
    "ELECTRICITY_IMPORTED_TOTAL": "1.8.0", "ELECTRICITY_USED_TARIFF_1": "1.8.1",
    "ELECTRICITY_USED_TARIFF_2": "1.8.2", "ELECTRICITY_EXPORTED_TOTAL": "2.8.0",
    "ELECTRICITY_DELIVERED_TARIFF_1": "2.8.1", "ELECTRICITY_DELIVERED_TARIFF_2": "2.8.2",
    "CURRENT_ELECTRICITY_USAGE": "1.7.0", "CURRENT_ELECTRICITY_DELIVERY": "2.7.0",
    "INSTANTANEOUS_VOLTAGE_L1": "32.7.0", "INSTANTANEOUS_VOLTAGE_L2": "52.7.0", "INSTANTANEOUS_VOLTAGE_L3": "72.7.0",
    "INSTANTANEOUS_CURRENT_L1": "31.7.0", "INSTANTANEOUS_CURRENT_L2": "51.7.0", "INSTANTANEOUS_CURRENT_L3": "71.7.0",
    "INSTANTANEOUS_ACTIVE_POWER_L1_POSITIVE": "21.7.0", "INSTANTANEOUS_ACTIVE_POWER_L2_POSITIVE": "41.7.0",
    "INSTANTANEOUS_ACTIVE_POWER_L3_POSITIVE": "61.7.0", "INSTANTANEOUS_ACTIVE_POWER_L1_NEGATIVE": "22.7.0",
    "INSTANTANEOUS_ACTIVE_POWER_L2_NEGATIVE": "42.7.0", "INSTANTANEOUS_ACTIVE_POWER_L3_NEGATIVE": "62.7.0",
}
# The peer's Decimal in its wire unit -> our base unit (written out here, not taken from our table).
TO_BASE = {"kWh": 1000, "Wh": 1, "kW": 1000, "W": 1, "V": 1000, "A": 1000, "m3": 1000}


def _peer_parse(raw: bytes, version: str):
    from dsmr_parser import telegram_specifications as specs
    from dsmr_parser.parsers import TelegramParser
    spec = {"2.2": specs.V2_2, "4": specs.V4, "5": specs.V5}[version]
    return TelegramParser(spec).parse(raw.decode("ascii"))       # validates the CRC itself (4, 5)


def _compare_with_peer(raw: bytes, version: str) -> int:
    """Assert every value dsmr-parser finds equals ours; returns how many were compared."""
    ours_t = parse_telegram(raw, version=version)
    ours = {r.obis: r for r in to_readings(ours_t, received_at=NOW, meter_id="M")}
    peer = _peer_parse(raw, version)
    compared = 0
    for name, obis in PEER_OBIS.items():
        obj = getattr(peer, name, None)
        if obj is None:
            continue
        assert ours[obis].value == Decimal(obj.value) * TO_BASE[obj.unit], (name, obj.value, obj.unit)
        compared += 1
    if getattr(peer, "P1_MESSAGE_TIMESTAMP", None) is not None:
        assert ours_t.timestamp == peer.P1_MESSAGE_TIMESTAMP.value
    if getattr(peer, "EQUIPMENT_IDENTIFIER", None) is not None:
        assert ours_t.equipment_id == peer.EQUIPMENT_IDENTIFIER.value
    for dev in getattr(peer, "MBUS_DEVICES", []):
        gas = [getattr(dev, n) for n in dev._item_names if getattr(getattr(dev, n), "unit", None) == "m3"]
        for obj in gas:
            mine = next(d for d in ours_t.mbus if d.channel == dev.channel_id)
            assert mine.value.value == Decimal(obj.value) * 1000 and mine.value.at == obj.datetime
            compared += 1
    return compared



@pytest.fixture
def peer_parse():
    return _peer_parse


@pytest.fixture
def compare_with_peer():
    return _compare_with_peer
