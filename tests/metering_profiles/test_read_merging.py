"""Read merging: few requests within the block limit; exception 2 bisects, is remembered, never asked again."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.gateway.poller import MeterReader, read_meter
from meterlink.gateway.profiles import decode, encode, known_profiles, load_profile
from meterlink.gateway.readplan import plan_reads, split_block
from meterlink.sim.meter import Faults

from .conftest import pty_bus


def covered(blocks):
    return {q.obis for b in blocks for q in b.quantities}


@pytest.mark.parametrize("name", known_profiles())
def test_every_plan_reads_every_quantity_once_within_the_block_limit(name):
    p = load_profile(name)
    blocks = plan_reads(p, max_gap=19)
    assert sorted(q.obis for b in blocks for q in b.quantities) == sorted(q.obis for q in p.quantities)
    assert all(b.count <= p.max_block for b in blocks)
    assert all(b.address <= q.address and q.end <= b.end for b in blocks for q in b.quantities)


def test_adjacent_quantities_share_one_request_and_billing_blocks_come_first():
    blocks = plan_reads(load_profile("eastron_sdm630"), max_gap=19)
    assert [(b.address, b.count) for b in blocks] == [(0x0034, 24), (0x0000, 12)]
    assert blocks[0].quantities[-1].obis == "2.8.0"


def test_a_gap_is_read_through_only_when_cheaper_than_another_request():
    p = load_profile("eastron_sdm630")
    assert len(plan_reads(p, max_gap=15)) == 3      # the 16-register hole before 0x0046 costs more
    assert len(plan_reads(p, max_gap=16)) == 2


def test_a_tight_block_limit_splits_the_map_without_losing_a_quantity():
    p20 = replace(load_profile("eastron_sdm630"), max_block=20)
    assert [(b.address, b.count) for b in plan_reads(p20, max_gap=1000)] == [(0x0046, 6), (0x0000, 12), (0x0034, 2)]


def brute_force_cost(qs, limit, overhead):
    """Cheapest cut of address-sorted quantities into consecutive blocks, by trying every cut."""
    best = None
    n = len(qs)
    for mask in range(1 << (n - 1)):
        cost, start = 0.0, 0
        for i in range(1, n + 1):
            if i == n or mask >> (i - 1) & 1:
                span = qs[i - 1].end - qs[start].address
                if span > limit:
                    cost = None
                    break
                cost += overhead + span
                start = i
        if cost is not None and (best is None or cost < best):
            best = cost
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["u16", "float32", "u64"])), min_size=1, max_size=8),
       st.integers(4, 30), st.integers(0, 12))
def test_the_cut_is_the_cheapest_possible_not_greedy(layout, limit, max_gap):
    quantities, addr = [], 0
    base = load_profile("abb_b23").quantity("1.8.0")
    for i, (gap, typ) in enumerate(layout):
        addr += gap
        q = replace(base, obis=f"9.{i}.0", address=addr, type=typ)
        quantities.append(q)
        addr = q.end
    p = replace(load_profile("abb_b23"), quantities=tuple(quantities), max_block=max(limit, 4))
    blocks = plan_reads(p, max_gap=max_gap)
    cost = sum(max_gap + 0.5 + b.count for b in blocks)
    assert cost == brute_force_cost(quantities, p.max_block, max_gap + 0.5)
    assert sorted(q.obis for b in blocks for q in b.quantities) == sorted(q.obis for q in quantities)


def test_a_refused_register_is_never_read_through():
    p = load_profile("eastron_sdm630")
    blocks = plan_reads(p, max_gap=19, skip=frozenset({0x0040}))
    assert all(not (b.address <= 0x0040 < b.end) for b in blocks)
    assert covered(blocks) == {q.obis for q in p.quantities}


def test_bisecting_a_block_splits_its_quantities_in_two_tight_blocks():
    block = plan_reads(load_profile("eastron_sdm630"), max_gap=19)[0]
    left, right = split_block(block)
    assert (left.address, left.end, right.address, right.end) == (0x0034, 0x0048, 0x0048, 0x004C)


def test_em24_without_export_answers_exception_2_and_the_rest_is_still_read(clock):
    with pty_bus(clock, "carlo_gavazzi_em24", variant="import-only") as (server, master, profile):
        reader = MeterReader("em24", 1, profile)
        first = reader.read(master, clock)
        got = {r.obis for r in first.readings}
        assert got == {q.obis for q in profile.quantities} - {"2.8.0"}
        assert first.newly_refused == {0x005C, 0x005D}
        assert master.counters.exceptions == 1
        frames = server.frames_in
        second = reader.read(master, clock)
        assert {r.obis for r in second.readings} == got
        assert server.frames_in - frames == second.requests == first.requests - 1 == 2  # export never asked again
        assert master.counters.exceptions == 1


def test_a_refusal_inside_a_merged_block_is_bisected_to_the_one_quantity(clock):
    faults = {1: Faults(refuse_addresses=frozenset({0x0046}))}       # frequency missing on this meter
    with pty_bus(clock, "eastron_sdm630", faults=faults) as (server, master, profile):
        reader = MeterReader("sdm", 1, profile)
        first = reader.read(master, clock)
        assert {r.obis for r in first.readings} == {q.obis for q in profile.quantities} - {"14.7.0"}
        assert {0x0046, 0x0047} <= first.refused
        # the next sweep asks neither for 0x0046 nor across it, and nothing is refused any more
        before = master.counters.exceptions
        second = reader.read(master, clock)
        assert master.counters.exceptions == before
        assert {r.obis for r in second.readings} == {r.obis for r in first.readings}


def test_a_refused_gap_register_is_inferred_when_both_halves_answer(clock):
    faults = {1: Faults(refuse_addresses=frozenset({0x003F}))}       # a reserved register in the hole
    with pty_bus(clock, "eastron_sdm630", faults=faults) as (server, master, profile):
        result = read_meter(master, 1, profile, "sdm", clock)
        assert {r.obis for r in result.readings} == {q.obis for q in profile.quantities}
        assert 0x003F in result.refused
        again = read_meter(master, 1, profile, "sdm", clock, refused=result.refused)
        assert again.newly_refused == frozenset() and {r.obis for r in again.readings} == {
            q.obis for q in profile.quantities}


def test_the_serial_number_is_read_where_the_model_has_one(clock):
    with pty_bus(clock, "abb_b23") as (server, master, profile):
        result = read_meter(master, 1, profile, "abb", clock, with_serial=True)
        assert result.serial == server.meters[1].serial_number
        assert "0.0.96.1.0" not in {r.obis for r in result.readings}


@pytest.mark.parametrize("name", known_profiles())
def test_the_gateway_reads_every_profile_from_the_simulator_serving_the_same_file(clock, name):
    with pty_bus(clock, name) as (server, master, profile):
        result = read_meter(master, 1, profile, "m", clock)
        want = server.meters[1].values()
        got = {r.obis: r.value for r in result.readings}
        assert set(got) == {q.obis for q in profile.quantities}
        q = profile.quantity("1.8.0")
        assert got["1.8.0"] == decode(q, encode(q, want["1.8.0"]))
        assert abs(got["1.8.0"] - want["1.8.0"]) <= q.resolution
        assert result.requests == len(plan_reads(profile, max_gap=19))


def test_firmware_that_accepts_fewer_registers_than_the_profile_says_gets_a_lower_limit(clock):
    with pty_bus(clock, "eastron_sdm630") as (server, master, profile):
        optimistic = replace(profile, max_block=80)               # the datasheet's 80
        server.meters[1].profile = replace(profile, max_block=20)  # this firmware: 20
        reader = MeterReader("sdm", 1, optimistic)
        assert [b.count for b in reader.plan(master)] == [24, 12]  # 24 > 20: refused with exception 3
        first = reader.read(master, clock)
        assert {r.obis for r in first.readings} == {q.obis for q in profile.quantities}
        assert reader.max_block == 20 and master.counters.exceptions == 1
        exceptions = master.counters.exceptions
        second = reader.read(master, clock)
        assert master.counters.exceptions == exceptions           # the new plan fits the firmware
        assert {r.obis for r in second.readings} == {q.obis for q in profile.quantities}
