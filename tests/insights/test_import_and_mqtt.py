"""Batch import (CSV/JSONL) and real-time MQTT ingest share the repository's one ingest path."""

from __future__ import annotations

import csv
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from meterlink.clock import SimClock
from meterlink.headend import importer
from meterlink.headend.mqtt_ingest import MqttIngest, parse_message
from meterlink.headend.store import open_repository

UTC = timezone.utc
NOW_MS = 1_795_000_000_000

CSV_GOOD = """meter,obis,timestamp,value,unit
MTR-1,1.8.0,2026-11-01T00:00:00Z,1234.567,kWh
MTR-1,1.8.0,2026-11-01T00:15:00+00:00,1234.9,kWh
MTR-1,2.8.0,2026-11-01T00:15:00Z,5000,Wh
MTR-2,1.8.0,2026-11-01T01:15:00+01:00,42,kWh
"""


@pytest.fixture()
def repo(tmp_path: Path):
    r = open_repository(f"sqlite:///{tmp_path / 'headend.db'}")
    yield r
    r.close()


def test_csv_values_become_exact_integer_wh_at_their_utc_instant(tmp_path: Path, repo):
    f = tmp_path / "mdm.csv"
    f.write_text(CSV_GOOD)
    s = importer.import_files(repo, [f], NOW_MS)
    assert s.as_dict() == {"read": 4, "new": 4, "duplicate": 0, "conflict": 0, "rejected": 0}
    got = [(r.taken_at, r.value, r.unit) for r in repo.readings("MTR-1", "1.8.0")]
    assert got == [(datetime(2026, 11, 1, 0, 0, tzinfo=UTC), 1_234_567, "Wh"),
                   (datetime(2026, 11, 1, 0, 15, tzinfo=UTC), 1_234_900, "Wh")]
    (m2,) = repo.readings("MTR-2")
    assert m2.taken_at == datetime(2026, 11, 1, 0, 15, tzinfo=UTC) and m2.value == 42_000


def test_reimporting_the_same_file_changes_nothing(tmp_path: Path, repo):
    f = tmp_path / "mdm.csv"
    f.write_text(CSV_GOOD)
    importer.import_files(repo, [f], NOW_MS)
    before = {m: repo.readings(m) for m in ("MTR-1", "MTR-2")}
    again = importer.import_files(repo, [f], NOW_MS + 1000)
    assert again.as_dict() == {"read": 4, "new": 0, "duplicate": 4, "conflict": 0, "rejected": 0}
    assert {m: repo.readings(m) for m in ("MTR-1", "MTR-2")} == before


def test_a_different_value_for_an_instant_already_held_is_a_conflict_not_an_overwrite(tmp_path: Path, repo):
    f = tmp_path / "a.csv"
    f.write_text(CSV_GOOD)
    importer.import_files(repo, [f], NOW_MS)
    g = tmp_path / "b.jsonl"
    g.write_text(json.dumps({"meter": "MTR-1", "obis": "1.8.0", "timestamp": "2026-11-01T00:00:00Z",
                             "value": 1234.999, "unit": "kWh"}) + "\n")
    s = importer.import_files(repo, [g], NOW_MS)
    assert s.conflict == 1 and s.new == 0
    assert repo.readings("MTR-1", "1.8.0")[0].value == 1_234_567


def test_broken_rows_name_file_line_and_field_and_go_to_the_rejects_file(tmp_path: Path, repo):
    f = tmp_path / "broken.csv"
    f.write_text("meter,obis,timestamp,value,unit\n"
                 "MTR-1,1.8.0,2026-11-01T00:00:00Z,10,kWh\n"
                 "MTR-1,1.8.0,2026-11-01T00:15:00,11,kWh\n"        # no offset
                 "MTR-1,1.8.0,2026-11-01T00:30:00Z,eleven,kWh\n"   # not a number
                 "MTR-1,1.8.0,2026-11-01T00:45:00Z,12,MWh\n"       # unknown unit
                 ",1.8.0,2026-11-01T01:00:00Z,13,kWh\n"            # no meter
                 "MTR-1,1.8,2026-11-01T01:15:00Z,14,kWh\n"         # bad OBIS
                 "MTR-1,1.8.0,2026-11-01T01:30:00Z,15,kWh\n")
    rejects = tmp_path / "rejects.csv"
    s = importer.import_files(repo, [f], NOW_MS, rejects=rejects)
    assert s.as_dict() == {"read": 7, "new": 2, "duplicate": 0, "conflict": 0, "rejected": 5}
    rows = list(csv.DictReader(rejects.open()))
    assert [(r["line"], r["field"]) for r in rows] == [("3", "timestamp"), ("4", "value"), ("5", "unit"),
                                                       ("6", "meter"), ("7", "obis")]
    assert all(r["file"] == str(f) for r in rows)
    assert "no UTC offset" in rows[0]["error"] and rows[1]["raw"].endswith("eleven,kWh")
    assert [r.value for r in repo.readings("MTR-1")] == [10_000, 15_000]


def test_jsonl_numbers_are_taken_exactly_and_bad_json_is_rejected_with_its_line(tmp_path: Path, repo):
    f = tmp_path / "x.jsonl"
    f.write_text('{"meter": "M", "register": "1.8.0", "taken_at": "2026-11-01T00:00:00Z", "value": 0.1, "unit": "kWh"}\n'
                 '{"meter": "M", "register": "1.8.0", "taken_at": "2026-11-01T00:15:00Z", "value": 0.3000000000000000444, "unit": "kWh"}\n'
                 '{"meter": "M", "register": "1.8.0", \n')
    s = importer.import_files(repo, [f], NOW_MS)
    assert (s.new, s.rejected) == (2, 1) and s.errors[0].line == 3
    assert [r.value for r in repo.readings("M")] == [100, 300]


def test_csv_without_a_required_column_is_refused_naming_it(tmp_path: Path, repo):
    f = tmp_path / "x.csv"
    f.write_text("meter,obis,value,unit\nM,1.8.0,1,kWh\n")
    with pytest.raises(importer.ValidationError, match="timestamp"):
        importer.import_files(repo, [f], NOW_MS)


def test_mqtt_payloads_are_parsed_and_checked_against_the_topic():
    r = parse_message("meterlink/ingest/MTR-9", b'{"obis":"1.8.0","timestamp":"2026-11-25T10:15:00Z","value":"7.5","unit":"kWh"}')
    assert (r.meter_id, r.value) == ("MTR-9", 7_500)
    with pytest.raises(importer.RowRejected, match="topic names"):
        parse_message("meterlink/ingest/MTR-9", b'{"meter":"MTR-8","obis":"1.8.0","timestamp":"2026-11-25T10:15:00Z","value":"1","unit":"kWh"}')
    with pytest.raises(importer.RowRejected, match="JSON"):
        parse_message("meterlink/ingest/MTR-9", b"\xff")


def test_readings_published_by_a_third_party_device_reach_the_store_exactly_once(mqtt_broker, repo, tmp_path):
    host, broker = mqtt_broker
    prefix = f"meterlink/test-{tmp_path.name}"
    ing = MqttIngest(repo, SimClock(datetime(2026, 11, 25, tzinfo=UTC)), host, port=broker, prefix=prefix,
                     client_id=f"ingest-{tmp_path.name}").start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"device-{tmp_path.name}")
    pub.connect(host, broker)
    pub.loop_start()
    try:
        msgs = [(f"{prefix}/PV-1", {"obis": "1.8.0", "timestamp": f"2026-11-25T10:{m:02d}:00Z",
                                    "value": f"{100 + m}.25", "unit": "kWh"}) for m in (0, 15, 30)]
        for topic, body in msgs + msgs[:1]:            # one redelivered duplicate
            pub.publish(topic, json.dumps(body), qos=1).wait_for_publish(5)
        pub.publish(f"{prefix}/PV-1", b"not json", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ing.stats.new + ing.stats.duplicate + ing.stats.rejected < 5:
            time.sleep(0.02)
    finally:
        pub.loop_stop()
        pub.disconnect()
        ing.stop()
    assert (ing.stats.new, ing.stats.duplicate, ing.stats.rejected) == (3, 1, 1)
    assert [r.value for r in repo.readings("PV-1", "1.8.0")] == [100_250, 115_250, 130_250]


def test_import_command_prints_the_summary_and_fails_when_rows_were_rejected(tmp_path: Path, capsys):
    from meterlink.headend.cli import main

    f = tmp_path / "a.csv"
    f.write_text(CSV_GOOD + "MTR-1,1.8.0,yesterday,1,kWh\n")
    db = f"sqlite:///{tmp_path / 'h.db'}"
    assert main(["import", str(f), "--database", db, "--json", "--rejects", str(tmp_path / "rej.csv")]) == 1
    assert json.loads(capsys.readouterr().out) == {"read": 5, "new": 4, "duplicate": 0, "conflict": 0, "rejected": 1}
    f.write_text(CSV_GOOD)
    assert main(["import", str(f), "--database", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["duplicate"] == 4
