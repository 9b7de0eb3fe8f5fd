"""Two `meterlink-headend bindings` edits at the same time both apply: each reads the bindings, edits them and
stores them in one write transaction (`BillingStore.edit_bindings`: SQLite BEGIN IMMEDIATE, PostgreSQL the rating
lock every binding edit takes), so the second edits what the first stored. Before, the CLI read the bindings
outside the transaction that wrote them, and the edit that wrote last silently undid the other. SQLite and
PostgreSQL (the `db` fixture)."""

import threading
from dataclasses import replace

from meterlink.headend.billing import bind_intervals
from meterlink.headend.billing_store import BillingStore, process_readings
from meterlink.headend.binding import ServicePoint
from meterlink.headend.cli import main
from meterlink.headend.vee import derive_intervals

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc
import test_incremental_rating
from test_incremental_rating import CFG, NOW, ingest

db = test_incremental_rating.db                  # the fixture: a repository and a store, SQLite and PostgreSQL
WAIT_S = 2.0                                     # how long the first edit, between read and write, lets the second run

M1 = hourly_readings("M1", utc(2026, 11, 1), 24 * 6, wh_per_hour=250)
M2 = hourly_readings("M2", utc(2026, 11, 1), 24 * 6, wh_per_hour=333, base=2_000_000)


def _two_supplies(repo, store) -> None:
    """M1 at SP1 supplied to A1, M2 at SP2 supplied to A3, since October; six November days rated."""
    b = gb_bindings(accounts=("A1", "A3"))
    b = replace(b, service_points={**b.service_points, "SP2": ServicePoint("SP2", "GB")})
    store.import_bindings(b.install("M2", "SP2", utc(2026, 10, 1)).move_in("SP1", "A1", utc(2026, 10, 1))
                          .move_in("SP2", "A3", utc(2026, 10, 1)), MARKETS, VAT)
    ingest(repo, M1 + M2)
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)


def _edits_at_the_same_time(monkeypatch, capsys, url, first: list[str], second: list[str]) -> tuple[int, int, str]:
    """CLI edit `first`, and CLI edit `second` run (in a thread) while the first is between reading the bindings and
    storing them; their exit codes and stderr."""
    common = ["--database", url, "--clock", "sim:2026-12-02T06:00:00Z"]
    codes: list[int] = []
    thread: list[threading.Thread] = []
    bindings = BillingStore.bindings

    def reading(self):                                 # the first edit's read of the bindings
        got = bindings(self)
        if not thread:
            t = threading.Thread(target=lambda: codes.append(main(["bindings", *second, *common])))
            thread.append(t)
            t.start()
            t.join(WAIT_S)                             # done by then when the first edit holds no lock (it did not)
        return got
    monkeypatch.setattr(BillingStore, "bindings", reading)
    code = main(["bindings", *first, *common])
    thread[0].join(30)
    monkeypatch.undo()
    assert not thread[0].is_alive()
    return code, codes[0], capsys.readouterr().err


def test_two_bindings_edits_at_the_same_time_both_apply(db, monkeypatch, capsys):
    """The first edit (move-out of SP1) is between reading the bindings and storing them when the second (move-out
    of SP2) runs: the second waits for the first's transaction and edits what it stored; both move-outs are held
    and every stored row is bound as the final bindings say."""
    repo, store = db
    _two_supplies(repo, store)
    first, second, err = _edits_at_the_same_time(
        monkeypatch, capsys, store.url, ["end", "supply", "--service-point", "SP1", "--at", "2026-11-03T00:00:00Z"],
        ["end", "supply", "--service-point", "SP2", "--at", "2026-11-04T12:00:00Z"])
    assert (first, second) == (0, 0), err
    final = store.bindings()
    assert {(s.service_point_id, s.account_id, s.valid_to) for s in final.supplies} == \
        {("SP1", "A1", utc(2026, 11, 3)), ("SP2", "A3", utc(2026, 11, 4, 12))}, "a binding edit was lost"
    scratch = {r.key: r.account_id for r in bind_intervals(derive_intervals(M1 + M2, CFG).intervals, final)}
    assert {k: r.account_id for k, r in store.rows().items()} == scratch
    assert sum(1 for a in scratch.values() if a is None) == 4 * 48 + 5 * 24     # M1 from Nov 3, M2 from Nov 4 12:00


def test_a_bindings_edit_that_no_longer_fits_what_another_stored_meanwhile_is_refused_not_written_over_it(
        db, monkeypatch, capsys):
    """SP1 moved out on Nov 3; then two move-ins at the same time, A3 from Nov 3 and A1 from Nov 5: the second is
    edited on what the first stored, overlaps it and is refused (exit 2, the service point named); A3's supply
    stays (before, the second was built from the bindings without it and removed it)."""
    repo, store = db
    _two_supplies(repo, store)
    assert main(["bindings", "end", "supply", "--service-point", "SP1", "--at", "2026-11-03T00:00:00Z",
                 "--database", store.url]) == 0
    first, second, err = _edits_at_the_same_time(
        monkeypatch, capsys, store.url,
        ["add", "supply", "--service-point", "SP1", "--account", "A3", "--from", "2026-11-03T00:00:00Z"],
        ["add", "supply", "--service-point", "SP1", "--account", "A1", "--from", "2026-11-05T00:00:00Z"])
    assert (first, second) == (0, 2) and "SP1" in err, err
    assert {(s.service_point_id, s.account_id, s.valid_from, s.valid_to) for s in store.bindings().supplies} == {
        ("SP1", "A1", utc(2026, 10, 1), utc(2026, 11, 3)), ("SP1", "A3", utc(2026, 11, 3), None),
        ("SP2", "A3", utc(2026, 10, 1), None)}
    rows = store.rows(meter_id="M1")
    assert {r.account_id for r in rows.values() if r.start >= utc(2026, 11, 3)} == {"A3"}
