"""An account's interval usage for a window, from stored readings: repository -> VEE -> binding; thin glue, no business rules of its own.

Readings are fetched with a margin of one day on each side so the window's boundary intervals can
be derived, then `vee.derive_intervals` (the market's interval length) and
`billing.bind_intervals` decide every interval's account, exactly as billing does.
"""

from __future__ import annotations

from datetime import date, timedelta, timezone
from typing import Iterable, Mapping

from .billing import bind_intervals
from .binding import Bindings
from .insights import local_window
from .vat import Market
from .vee import Interval, VeeConfig, derive_intervals

UTC = timezone.utc


def usage_by_account(repo, bindings: Bindings, markets: Mapping[str, Market], start: date, end: date,
                     accounts: Iterable[str] | None = None, obis: tuple[str, ...] = ("1.8.0",)) -> dict[str, list[Interval]]:
    """Account id -> its intervals (import by default) starting inside local dates [start, end) of its market."""
    wanted = set(accounts) if accounts is not None else set(bindings.accounts)
    meters: dict[str, str] = {}            # meter -> market
    for acc in wanted:
        if acc not in bindings.accounts:
            continue
        market = bindings.market_of_account(acc)
        for m in bindings.meters_of_account(acc):
            meters[m] = market
    out: dict[str, list[Interval]] = {acc: [] for acc in wanted if acc in bindings.accounts}
    for meter, market_id in sorted(meters.items()):
        market = markets[market_id]
        lo, hi = local_window(start, end, market.timezone)
        cfg_kwargs = {}
        m = bindings.meters.get(meter)
        if m is not None:
            cfg_kwargs = {"register_max": m.register_max, "max_power_w": m.max_power_w}
        cfg = VeeConfig(interval=timedelta(minutes=market.interval_minutes), **cfg_kwargs)
        readings = []
        for o in obis:
            readings += repo.readings(meter, o, start=lo - timedelta(days=1), end=hi + timedelta(days=1))
        ivs = [iv for iv in derive_intervals(readings, cfg).intervals if lo <= iv.start < hi]
        for row in bind_intervals(ivs, bindings):
            if row.account_id in out:
                out[row.account_id].append(row.as_interval(row.wh))
    return out


def parked_wh(repo, bindings: Bindings, market: Market, start: date, end: date) -> tuple[int, int]:
    """(parked Wh, estimated Wh) of import intervals in the market's window [start, end) that no account is
    bound to: meters never installed, or installed at a service point nobody is supplied at."""
    lo, hi = local_window(start, end, market.timezone)
    cfg = VeeConfig(interval=timedelta(minutes=market.interval_minutes))
    parked = estimated = 0
    for meter in repo.meters():
        mkt = bindings.market_of_meter(meter)
        if mkt not in (None, market.id):
            continue
        readings = repo.readings(meter, "1.8.0", start=lo - timedelta(days=1), end=hi + timedelta(days=1))
        ivs = [iv for iv in derive_intervals(readings, cfg).intervals if lo <= iv.start < hi]
        for row in bind_intervals(ivs, bindings):
            if row.account_id is None:
                parked += row.wh
                if row.estimated:
                    estimated += row.wh
    return parked, estimated
