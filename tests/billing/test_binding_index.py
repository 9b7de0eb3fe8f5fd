"""Binding lookups are indexed (bisect over each meter's / service point's effective-dated records): they give
the answers of a plain scan over every record, and a lookup does not walk the whole binding set."""

from datetime import timedelta

from hypothesis import given, settings, strategies as st

from meterlink.headend.binding import Account, Bindings, Customer, Installation, Meter, ServicePoint, Supply

from billing_helpers import utc

T0 = utc(2026, 3, 1)


class CountingTuple(tuple):
    """A tuple that counts how often it is iterated (a scan over all bindings iterates it)."""

    iterations = 0

    def __iter__(self):
        CountingTuple.iterations += 1
        return super().__iter__()


# reference: the linear scans the index replaced
def ref_account_at(b, meter_id, t):
    for inst in b.installations:
        if inst.meter_id == meter_id and inst.covers(t):
            for sup in b.supplies:
                if sup.service_point_id == inst.service_point_id and sup.covers(t):
                    return sup.account_id
            return None
    return None


def ref_market_of_meter(b, meter_id, t):
    for inst in sorted(b.installations, key=lambda i: i.valid_from):     # t None: the first installation's
        if inst.meter_id == meter_id and (t is None or inst.covers(t)):
            return b.service_points[inst.service_point_id].market
    return None


def timeline(draw, n_keys, prefix, targets, max_records=4):
    """Non-overlapping effective-dated records per key: (key, target, from, to) with hour offsets."""
    out = []
    for k in range(n_keys):
        t = draw(st.integers(0, 5))
        for _ in range(draw(st.integers(0, max_records))):
            start = t + draw(st.integers(0, 6))
            length = draw(st.one_of(st.none(), st.integers(1, 12)))
            out.append((f"{prefix}{k}", draw(st.sampled_from(targets)), start, None if length is None else start + length))
            if length is None:
                break
            t = start + length
    return out


@st.composite
def binding_sets(draw):
    sps = [f"SP{i}" for i in range(4)]
    accounts = [f"A{i}" for i in range(3)]
    insts_by_sp: dict = {}
    insts = []
    for meter, sp, a, z in timeline(draw, 5, "M", sps):
        # one meter per service point at a time: drop records that would overlap another meter's there
        if any(a < (z2 if z2 is not None else 10**6) and a2 < (z if z is not None else 10**6)
               for a2, z2 in insts_by_sp.get(sp, [])):
            continue
        insts_by_sp.setdefault(sp, []).append((a, z))
        insts.append(Installation(meter, sp, T0 + timedelta(hours=a), None if z is None else T0 + timedelta(hours=z)))
    sups = [Supply(sp, acct, T0 + timedelta(hours=a), None if z is None else T0 + timedelta(hours=z))
            for sp, acct, a, z in timeline(draw, 4, "SP", accounts)]
    order = draw(st.randoms())
    order.shuffle(insts)
    order.shuffle(sups)
    b = Bindings(customers={"C": Customer("C", "GB")}, accounts={a: Account(a, "C") for a in accounts},
                 service_points={sp: ServicePoint(sp, "GB" if sp != "SP3" else "IE") for sp in sps},
                 meters={f"M{i}": Meter(f"M{i}") for i in range(5)},
                 installations=tuple(insts), supplies=tuple(sups))
    return b.validate()


@settings(max_examples=200, deadline=None)
@given(binding_sets(), st.lists(st.integers(-2, 60), min_size=1, max_size=10))
def test_indexed_lookups_answer_exactly_what_a_scan_over_every_binding_answers(b, hours):
    for meter in b.meters:
        for h in hours:
            t = T0 + timedelta(hours=h, minutes=30 * (h % 2))
            assert b.account_at(meter, t) == ref_account_at(b, meter, t)
            assert b.market_of_meter(meter, t) == ref_market_of_meter(b, meter, t)
        assert b.market_of_meter(meter) == ref_market_of_meter(b, meter, None)
        for span in b.spans(meter):
            assert span.account_id == ref_account_at(b, meter, span.start)
    for acct in b.accounts:
        sps = {s.service_point_id for s in b.supplies if s.account_id == acct}
        assert b.meters_of_account(acct) == sorted({i.meter_id for i in b.installations if i.service_point_id in sps})
        lo, hi = T0 + timedelta(hours=hours[0]), T0 + timedelta(hours=hours[0] + 7)
        assert sorted(b.supplied_between(acct, lo, hi), key=lambda s: s.valid_from) == sorted(
            (s for s in b.supplies if s.account_id == acct and s.valid_from < hi
             and (s.valid_to is None or s.valid_to > lo)), key=lambda s: s.valid_from)


def test_a_thousand_lookups_walk_the_binding_set_once_not_a_thousand_times():
    n = 1000
    insts = CountingTuple(Installation(f"M{i}", f"SP{i}", T0) for i in range(n))
    sups = CountingTuple(Supply(f"SP{i}", f"A{i}", T0) for i in range(n))
    b = Bindings(customers={"C": Customer("C", "GB")}, accounts={f"A{i}": Account(f"A{i}", "C") for i in range(n)},
                 service_points={f"SP{i}": ServicePoint(f"SP{i}", "GB") for i in range(n)},
                 meters={f"M{i}": Meter(f"M{i}") for i in range(n)}, installations=insts, supplies=sups)
    CountingTuple.iterations = 0
    for i in range(n):
        t = T0 + timedelta(hours=i)
        assert b.account_at(f"M{i}", t) == f"A{i}"
        assert b.market_of_meter(f"M{i}", t) == "GB"
        assert [s.account_id for s in b.spans(f"M{i}")] == [f"A{i}"]
        assert [s.account_id for s in b.supplied_between(f"A{i}", t, t + timedelta(days=1))] == [f"A{i}"]
    assert CountingTuple.iterations <= 4          # a constant: building the index, then bisects per key
