"""Export: resumable cursor, nothing exported twice, an interrupted run resumes where it stopped."""

import csv
import json
from datetime import date

import pytest

from meterlink.headend.binding import Account, ServicePoint, Meter
from meterlink.headend.billing_store import BillingStore, process_readings, run_billing
from meterlink.headend.export import export
from meterlink.headend.store import StoredRecord, open_repository
from meterlink.headend.ubl import check_en16931

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc

NOW = utc(2026, 12, 2, 6)


class Stop(Exception):
    pass


@pytest.fixture
def billed(tmp_path):
    """Seven accounts, each with its own meter, billed for November."""
    url = f"sqlite:///{tmp_path}/h.db"
    repo, store = open_repository(url), BillingStore(url)
    b = gb_bindings()
    names = [f"A{i}" for i in range(7)]
    from dataclasses import replace
    b = replace(b, accounts={a: Account(a, "C1", "postpaid", "gb-economy7") for a in names},
                service_points={f"SP{a}": ServicePoint(f"SP{a}", "GB") for a in names},
                meters={f"M{a}": Meter(f"M{a}") for a in names}, installations=(), supplies=())
    for a in names:
        b = b.install(f"M{a}", f"SP{a}", utc(2026, 10, 1)).move_in(f"SP{a}", a, utc(2026, 10, 1))
    store.import_bindings(b, MARKETS, VAT)
    seq = 1
    for i, a in enumerate(names):
        rs = hourly_readings(f"M{a}", utc(2026, 11, 1), 48, wh_per_hour=100 + i)
        repo.ingest("GW", [StoredRecord("GW", seq + k, b"\0" * 32, r) for k, r in enumerate(rs)], 0)
        seq += len(rs)
    process_readings(repo, store, MARKETS, NOW)
    run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2), now=NOW)
    yield store
    store.close()
    repo.close()


def read_jsonl(directory, prefix):
    out = []
    for p in sorted(directory.glob(f"{prefix}-*.jsonl")):
        out += [json.loads(line) for line in p.read_text().splitlines()]
    return out


def test_rerunning_an_export_writes_nothing_twice(billed, tmp_path):
    out = tmp_path / "out"
    first = export(billed, out, "jsonl", now=lambda: NOW, batch_size=3)
    assert (first.items, first.invoices) == (7, 7)
    again = export(billed, out, "jsonl", now=lambda: NOW, batch_size=3)
    assert (again.items, again.invoices, again.files) == (0, 0, ())
    items = read_jsonl(out, "items")
    assert [d["item_seq"] for d in items] == list(range(1, 8))


def test_an_interrupted_export_resumes_without_duplicates_or_holes(billed, tmp_path):
    out = tmp_path / "out"

    def crash(n):
        if n == 2:
            raise Stop()
    with pytest.raises(Stop):
        export(billed, out, "csv", now=lambda: NOW, batch_size=3, after_batch=crash)
    assert billed.cursor("csv") == (6, 0)
    rest = export(billed, out, "csv", now=lambda: NOW, batch_size=3)
    assert (rest.items, rest.invoices) == (1, 7)
    rows = [r for p in sorted(out.glob("items-*.csv")) for r in csv.DictReader(p.open())]
    assert sorted(int(r["item_seq"]) for r in rows) == list(range(1, 8))
    invs = [r for p in sorted(out.glob("invoices-*.csv")) for r in csv.DictReader(p.open())]
    assert len({r["invoice_id"] for r in invs}) == len(invs) == 7


def test_a_crash_after_the_file_but_before_the_cursor_rewrites_the_same_file(billed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = billed.set_cursor
    monkeypatch.setattr(billed, "set_cursor", lambda *a: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        export(billed, out, "jsonl", now=lambda: NOW, batch_size=4)
    monkeypatch.setattr(billed, "set_cursor", real)
    export(billed, out, "jsonl", now=lambda: NOW, batch_size=4)
    assert [d["item_seq"] for d in read_jsonl(out, "items")] == list(range(1, 8))


def test_ubl_export_writes_one_valid_document_per_invoice_and_consumers_have_own_cursors(billed, tmp_path):
    res = export(billed, tmp_path / "ubl", "ubl", now=lambda: NOW)
    assert res.invoices == 7 and res.items == 0
    for p in (tmp_path / "ubl").glob("*.xml"):
        assert check_en16931(p.read_text()) == []
    other = export(billed, tmp_path / "crm", "jsonl", now=lambda: NOW, consumer="crm")
    assert other.items == 7
