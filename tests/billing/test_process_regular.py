"""The usual-case path of `process` (derive, bind and rate on columns: vee.regular_intervals,
rating.rate_starts, billing_store._merge_regular) gives exactly what the general path gives: the same
intervals, rows, revisions, exceptions, pending aggregates and usage, on DST days, with a night band
crossing midnight, gaps, late data, decreases, a move-in and a move-out, in any batching of arrivals."""

import random
from dataclasses import replace
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.headend import billing_store
from meterlink.headend.billing import UsageRow, pending_contributions
from meterlink.headend.billing_store import BillingStore, process_readings
from meterlink.headend.rating import rate_starts
from meterlink.headend.store import StoredRecord, open_repository
from meterlink.headend.vee import VeeConfig, derive_intervals, regular_intervals
from meterlink.readings import Reading

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, utc

NOW = utc(2027, 1, 5)
REGULAR_REGISTERS = billing_store._regular_registers
STEP_MS = 30 * 60_000                    # the GB market's grid
T0_MS = 1_792_713_600_000                # 2026-10-24 00:00 UTC, the day before the clocks go back in London


# --------------------------------------------------------------------------- vee: columns vs readings

@st.composite
def register_readings(draw):
    """One register's readings every 5..30 minutes, sometimes with a gap, a decrease, a duplicate instant or a
    big jump; regular=True when none of that was drawn and every boundary has a reading."""
    every = draw(st.sampled_from([5, 10, 15, 30]))          # minutes; all divide the 30-minute grid
    n = draw(st.integers(0, 60))
    offset = draw(st.integers(0, 30 // every - 1)) * every  # first reading maybe off the grid
    times = [T0_MS + (offset + i * every) * 60_000 for i in range(n)]
    values, v = [], draw(st.integers(0, 10**9))
    for _ in times:
        v += draw(st.integers(0, 400))
        values.append(v)
    irregular = draw(st.sampled_from([None, "gap", "decrease", "duplicate", "jump"]))
    if irregular and n > 3:
        i = draw(st.integers(1, n - 2))
        if irregular == "gap":
            del times[i], values[i]
        elif irregular == "decrease":
            values[i:] = [x - 500 for x in values[i:]]
        elif irregular == "duplicate":
            times.insert(i, times[i])
            values.insert(i, values[i] + draw(st.integers(0, 1)))
        else:
            values[i:] = [x + 100_000 for x in values[i:]]
    return times, values


@settings(max_examples=300, deadline=None)
@given(register_readings(), st.sampled_from([None, 20_000]))
def test_regular_intervals_are_the_intervals_derive_intervals_gives_when_it_takes_them(got, max_power_w):
    times, values = got
    readings = [Reading("M1", "1.8.0", utc(1970, 1, 1) + timedelta(milliseconds=t), v, "Wh")
                for t, v in zip(times, values)]
    cfg = VeeConfig(interval=timedelta(minutes=30), max_power_w=max_power_w)
    exact = derive_intervals(readings, cfg)
    fast = regular_intervals(times, values, STEP_MS, max_power_w)
    if fast is None:
        # refused only when the general way has something to say (an estimate, a flag, an exception) or a
        # boundary has no reading (estimated, when it has intervals)
        bounds = range(-(-times[0] // STEP_MS) * STEP_MS, times[-1] + 1, STEP_MS)
        assert exact.exceptions or any(iv.estimated or iv.flags for iv in exact.intervals) or \
            any(a >= b for a, b in zip(times, times[1:])) or set(bounds) - set(times)
        return
    bounds, marks = fast
    assert exact.exceptions == ()
    assert [(iv.start, iv.end, iv.wh, iv.estimated, iv.flags) for iv in exact.intervals] == \
        [(utc(1970, 1, 1) + timedelta(milliseconds=a), utc(1970, 1, 1) + timedelta(milliseconds=b), y - x, False,
          frozenset()) for a, b, x, y in zip(bounds, bounds[1:], marks, marks[1:])]


def test_regular_intervals_takes_readings_between_boundaries_and_refuses_a_missing_boundary():
    times = [T0_MS + i * 15 * 60_000 for i in range(9)]        # 15-minute reads on a 30-minute grid
    values = [1000 + 10 * i for i in range(9)]
    bounds, marks = regular_intervals(times, values, STEP_MS)
    assert bounds == times[::2] and marks == values[::2]
    assert regular_intervals(times[1:], values[1:], STEP_MS) == (times[2::2], values[2::2])   # starts mid-way
    del times[4], values[4]                                   # the 01:00 boundary reading is lost: estimated
    assert regular_intervals(times, values, STEP_MS) is None
    assert regular_intervals(times[:1], values[:1], STEP_MS) == ([], [])


# --------------------------------------------------------------------------- rating: columns vs intervals

@pytest.mark.parametrize("tariff_id, zone, step_min, first", [
    ("gb-economy7", "Europe/London", 30, utc(2026, 10, 24, 20)),   # clocks go back 25 Oct; night crosses midnight
    ("gb-economy7", "Europe/London", 30, utc(2026, 3, 28, 20)),    # clocks go forward 29 Mar
    ("gb-economy7", "Europe/London", 30, utc(2025, 12, 31, 12)),   # a tariff version change at local midnight
    ("es-20td", "Europe/Madrid", 15, utc(2026, 10, 9, 20)),        # weekend and 12 Oct holiday bands
])
def test_rate_starts_equals_rating_the_same_new_rows_the_general_way(tariff_id, zone, step_min, first):
    tariff, tz, rnd = TARIFFS[tariff_id], ZoneInfo(zone), random.Random(7)
    start_ms = int(first.timestamp()) * 1000
    for obis in ("1.8.0", "2.8.0"):
        starts = [start_ms + i * step_min * 60_000 for i in range(4 * 24 * 60 // step_min) if rnd.random() < 0.9]
        whs = [rnd.randint(1, 900) for _ in starts]
        rows = [(None, UsageRow("M1", obis, utc(1970, 1, 1) + timedelta(milliseconds=s),
                                utc(1970, 1, 1) + timedelta(milliseconds=s + step_min * 60_000), wh, account_id="A1"))
                for s, wh in zip(starts, whs)]
        assert rate_starts(tariff, tz, "A1", "M1", obis, starts, whs) == pending_contributions(rows, tariff, tz)


# --------------------------------------------------------------------------- process: both paths, same store

def _readings(rnd: random.Random) -> list[Reading]:
    """M1 and M2 (1.8.0 and 2.8.0), read every 15 minutes over four days across the October DST change,
    with a lost boundary read on M1, a decrease on M2's export and an off-grid first reading."""
    out = []
    for meter in ("M1", "M2"):
        for obis in ("1.8.0", "2.8.0"):
            v = rnd.randint(0, 10**6)
            for i in range(1, 4 * 96):
                v += rnd.randint(0, 300) if obis == "1.8.0" else rnd.choice((0, 0, 50))
                if meter == "M2" and obis == "2.8.0" and i == 200:
                    v -= 100                                         # register went backwards: held
                out.append(Reading(meter, obis, utc(2026, 10, 23, 23, 45) + timedelta(minutes=15 * i), v, "Wh"))
    lost = utc(2026, 10, 25, 1, 30)                                  # the second 01:30 of the long day, local
    return [r for r in out if not (r.meter_id == "M1" and r.obis == "1.8.0" and r.taken_at == lost)]


def _url(backend, tmp_path, name):
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/{name}.db"
    from pgserver import PG_UNAVAILABLE, fresh_schema_url
    if PG_UNAVAILABLE:
        pytest.skip(PG_UNAVAILABLE)
    return fresh_schema_url()


def _run(url, regular: bool, seed: int, monkeypatch):
    rnd = random.Random(seed)
    readings = _readings(rnd)
    late = [r for r in readings if r.meter_id == "M1" and utc(2026, 10, 24, 10) <= r.taken_at < utc(2026, 10, 24, 14)]
    first = [r for r in readings if r not in late]
    rnd.shuffle(late)
    repo, store = open_repository(url, migrate=True), BillingStore(url)
    bindings = (gb_bindings(start=utc(2026, 10, 1), accounts=("A1", "A2"))
                .move_in("SP1", "A1", utc(2026, 10, 1), utc(2026, 10, 25, 17))       # move-out on a boundary,
                .move_in("SP1", "A2", utc(2026, 10, 25, 17, 10)))                   # move-in mid-interval
    sp2 = replace(bindings.service_points["SP1"], id="SP2")
    bindings = replace(bindings, service_points={**bindings.service_points, "SP2": sp2})
    bindings = bindings.install("M2", "SP2", utc(2026, 10, 1)).move_in("SP2", "A2", utc(2026, 10, 24, 6))  # parked before
    store.import_bindings(bindings, MARKETS, VAT)
    taken = []
    if regular:
        monkeypatch.setattr(billing_store, "_regular_registers",
                            lambda *a: taken.append(REGULAR_REGISTERS(*a)) or taken[-1])
    else:
        monkeypatch.setattr(billing_store, "_regular_registers", lambda *a: None)
    seq, results = 1, []
    arrivals = first + late
    while arrivals:                                                  # batches of random size, late data last
        n = rnd.randint(1, 300)
        batch, arrivals = arrivals[:n], arrivals[n:]
        repo.ingest("GW1", [StoredRecord("GW1", seq + i, b"\0" * 32, r) for i, r in enumerate(batch)], 0)
        seq += len(batch)
        res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
        results.append((res.meters, res.readings, res.rows_changed, res.exceptions_queued, res.accounts_rerated))
    rows = {k: (r.end, r.wh, r.estimated, r.flags, r.account_id, r.revision, r.billed_wh, r.billed_account)
            for k, r in store.rows().items()}
    state = (results, rows, store.pending_aggregates(), store.pending_usage(),
             [(e.meter_id, e.obis, e.kind, e.at, e.detail) for e in store.exceptions()])
    store.close()
    repo.close()
    return state, taken


@pytest.mark.parametrize("backend, seed", [("sqlite", 1), ("sqlite", 2), ("sqlite", 3), ("postgres", 4)])
def test_process_on_columns_stores_and_rates_exactly_what_the_general_path_does(tmp_path, monkeypatch, backend, seed):
    general, _ = _run(_url(backend, tmp_path, "general"), False, seed, monkeypatch)
    regular, taken = _run(_url(backend, tmp_path, "regular"), True, seed, monkeypatch)
    assert any(t is not None for t in taken) and any(t is None for t in taken)    # both paths were taken
    assert regular == general
    results, rows, aggs, usage, excs = regular
    assert {a for a in aggs} == {"A1", "A2"} and any(r[4] is None for r in rows.values())   # parked rows too
    assert {e[2] for e in excs} == {"decrease"}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("gateways", [3, 40])               # the snapshot filtered by the database / row by row
def test_plain_columns_reads_the_records_snapshot_columns_reads(tmp_path, backend, gateways):
    """Same records (snapshot and start filters) as the general read, a None value for a reading that is not
    a plain energy reading, and no meter that has no record."""
    url = _url(backend, tmp_path, "plain")
    repo, store = open_repository(url, migrate=True), BillingStore(url)
    rnd = random.Random(gateways)
    seqs = {}
    for i in range(400):
        g = f"GW{rnd.randrange(gateways)}"
        seqs[g] = seqs.get(g, 0) + 1
        meter, obis = rnd.choice(["M1", "M2", "M3"]), rnd.choice(["1.8.0", "2.8.0"])
        unit, quality = ("Wh", 0) if rnd.random() < 0.95 else rnd.choice([("varh", 0), ("Wh", 1), ("W", 0)])
        r = Reading(meter, obis, utc(2026, 11, 1) + timedelta(minutes=5 * rnd.randrange(200)), rnd.randrange(10**6),
                    unit, quality)
        repo.ingest(g, [StoredRecord(g, seqs[g], b"\0" * 32, r)], 0)
    snapshot = {g: max(1, n - rnd.randrange(4)) for g, n in seqs.items()}          # some records after it
    del snapshot["GW0"]                                  # a source the run keeps no cursor for: counts whole
    starts = {"M1": {"1.8.0": None, "2.8.0": T0_MS + 3 * 3_600_000}, "M2": {"1.8.0": T0_MS + 10**9},
              "M4": {"1.8.0": None}}
    for snap in (snapshot, None):
        general = store.snapshot_columns(starts, snap)
        plain = store.plain_columns(starts, snap)
        expected = {m: {o: ([t for t, *_ in rows], [v if q == 0 and u in ("Wh", "varh") else None
                                                  for t, v, u, q in rows]) for o, rows in regs.items()}
                    for m, regs in general.items()}
        for regs in plain.values():                      # rows at one instant: in no particular order
            for o, (times, values) in regs.items():
                regs[o] = tuple(map(list, zip(*sorted(zip(times, values), key=lambda tv: (tv[0], tv[1] is None,
                                                                                       tv[1] or 0))))) \
                    if times else (times, values)
        for regs in expected.values():
            for o, (times, values) in regs.items():
                regs[o] = tuple(map(list, zip(*sorted(zip(times, values), key=lambda tv: (tv[0], tv[1] is None,
                                                                                       tv[1] or 0)))))
        assert plain == expected and "M4" not in plain and any(None in v for r in plain.values() for _, v in r.values())
    store.close()
    repo.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_plain_windows_finds_the_start_and_reads_what_the_two_step_read_does(tmp_path, backend):
    """One query (plain_windows) == instants_before_all then plain_columns, with readings repeated by several
    gateways, records after the snapshot and registers with few readings; a meter whose 8 rows before the new
    instant end at the start it finds is left to the two-step read."""
    url = _url(backend, tmp_path, "windows")
    repo, store = open_repository(url, migrate=True), BillingStore(url)
    rnd, seqs = random.Random(5), {}
    meters = [f"M{i}" for i in range(12)]
    for i in range(1500):
        g = rnd.choice(["GW0", "GW1", "GW2"])
        seqs[g] = seqs.get(g, 0) + 1
        m = "M0" if rnd.random() < 0.4 else meters[min(rnd.randrange(14), 11)]   # M0: many gateways' copies
        r = Reading(m, rnd.choice(["1.8.0", "2.8.0"]), utc(2026, 11, 1) + timedelta(minutes=15 * rnd.randrange(60)),
                    rnd.randrange(10**6), "Wh", 0 if rnd.random() < 0.97 else 1)
        repo.ingest(g, [StoredRecord(g, seqs[g], b"\0" * 32, r)], 0)
    t_mid = int(utc(2026, 11, 1, 8).timestamp()) * 1000
    news = {m: {"1.8.0": t_mid + 60_000 * rnd.randrange(-300, 300), "2.8.0": rnd.choice([None, t_mid])}
            for m in meters}
    left_out = 0
    for snap in ({"GW0": seqs["GW0"] - 20, "GW1": seqs["GW1"]}, None):
        one = store.plain_windows(news, snap)
        left_out += len(set(meters) - set(one))
        asks = {(m, o): t for m in one for o, t in news[m].items() if t is not None}
        befores = store.instants_before_all(asks, snapshot=snap)
        starts = {m: {o: (None if t is None or len(befores[(m, o)]) < 2 else befores[(m, o)][1])
                      for o, t in news[m].items()} for m in one}
        two = store.plain_columns(starts, snap)
        for m, regs in one.items():
            assert {o: since for o, (since, _, _) in regs.items()} == starts[m]
            got = {o: sorted(zip(times, [-1 if v is None else v for v in values]))
                   for o, (_, times, values) in regs.items() if times}
            assert got == {o: sorted(zip(times, [-1 if v is None else v for v in values]))
                           for o, (times, values) in two.get(m, {}).items()}
    assert 0 < left_out < 2 * len(meters)               # both: settled in one query, and left to two steps
    store.close()
    repo.close()
