"""`meterlink-headend insights | promotions | report`: behaviour insights, tailored offers and pictures; thin calls into the library."""

from __future__ import annotations

import argparse
import json
from datetime import date, timedelta
from pathlib import Path

from meterlink.clock import clock_from_spec, to_ms
from meterlink.errors import ValidationError

from . import insights as I
from . import promotions as P
from . import segments as S
from .billing import parse_period
from .binding import load_bindings, load_demo_bindings
from .insights_store import InsightsStore
from .store import open_repository
from .tariff import bundled_tariffs, load_tariff
from .usage import parked_wh, usage_by_account
from .vat import load_markets, load_vat_table
from .cli import _database as _db   # the one --database/--config resolution

RAW = argparse.RawDescriptionHelpFormatter


def _bindings(args):
    """--bindings files when given, else the bindings held in the database (`bindings load`), else the demo's."""
    if args.bindings:
        return load_bindings(args.bindings, args.bindings_csv or [])
    from .billing_store import BillingStore
    store = BillingStore(_db(args))
    try:
        held = store.bindings()
    finally:
        store.close()
    return held if held.accounts else load_demo_bindings()


def _tariffs(extra: list[Path] | None = None) -> dict:
    out = {t.id: t for t in (load_tariff(p) for p in bundled_tariffs())}
    for p in extra or []:
        t = load_tariff(p)
        out[t.id] = t
    return out


def _shift_period(period: str, months: int) -> str:
    y, m = (int(x) for x in period.split("-"))
    k = y * 12 + (m - 1) + months
    return f"{k // 12:04d}-{k % 12 + 1:02d}"


def compute_period(repo, bindings, markets, period: str, segments) -> dict[str, tuple[I.Features, tuple[str, ...]]]:
    """Features (with trends and peers) and segments of every bound account for a local month."""
    start, end = parse_period(period)
    cur = usage_by_account(repo, bindings, markets, start, end)

    def feats(p: str, ivs_by_acc) -> dict[str, I.Features]:
        s, e = parse_period(p)
        return {acc: I.compute_features(acc, ivs, s, e, markets[bindings.market_of_account(acc)].timezone)
                for acc, ivs in ivs_by_acc.items()}

    now = feats(period, cur)
    prev_p, year_p = _shift_period(period, -1), _shift_period(period, -12)
    prev = feats(prev_p, usage_by_account(repo, bindings, markets, *parse_period(prev_p)))
    year = feats(year_p, usage_by_account(repo, bindings, markets, *parse_period(year_p)))
    now = {acc: I.with_trends(f, prev.get(acc), year.get(acc)) for acc, f in now.items()}
    now = I.compare_with_peers(now, {acc: bindings.market_of_account(acc) for acc in now})
    segs = S.evaluate(segments, now)
    return {acc: (f, segs[acc]) for acc, f in now.items()}


def cmd_insights(args) -> int:
    bindings, markets = _bindings(args), load_markets()
    segments = S.load_segments(args.segments) if args.segments else S.load_segments()
    repo = open_repository(_db(args))
    try:
        result = compute_period(repo, bindings, markets, args.period, segments)
    finally:
        repo.close()
    store = InsightsStore(_db(args))
    store.save_features(args.period, {a: (f.as_dict(), s) for a, (f, s) in result.items()},
                        to_ms(clock_from_spec(args.clock).now()))
    store.close()
    rows = [dict(f.as_dict(), segments=list(s)) for _, (f, s) in sorted(result.items())]
    if args.out:
        with open(args.out, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'account':12} {'kWh':>9} {'kWh/day':>8} {'night':>6} {'peak':>6} {'wkend':>6} {'base W':>7} "
          f"{'peak W':>7} {'trend':>7} {'vs peers':>8}  segments")
    for r in rows:
        t = r["trend_prev"]
        print(f"{r['account_id']:12} {r['total_wh'] / 1000:9.3f} {r['avg_daily_wh'] / 1000:8.3f} "
              f"{r['night_share']:>6} {r['peak_share']:>6} {r['weekend_share']:>6} {r['base_load_w']:7d} "
              f"{r['peak_demand_w']:7d} {t if t is not None else '-':>7} {r['peer_ratio'] or '-':>8}  "
              f"{', '.join(r['segments']) or '-'}")
    return 0


def _accounts(bindings, markets, tariffs):
    out = {}
    for acc_id, acc in bindings.accounts.items():
        market = markets[bindings.market_of_account(acc_id)]
        tid = acc.tariff_id or market.default_tariff
        out[acc_id] = P.Account(acc_id, market.id, acc.payment == "prepaid", tariffs[tid], market.rounding_mode,
                                market.rounding_stage)
    return out


def cmd_offer(args) -> int:
    bindings, markets = _bindings(args), load_markets()
    tariffs = _tariffs()
    promos = P.load_promotions(args.promotions or P.BUNDLED, known_tariffs=tariffs)
    segments = S.load_segments(args.segments) if args.segments else S.load_segments()
    repo = open_repository(_db(args))
    try:
        result = compute_period(repo, bindings, markets, args.period, segments)
        first = _shift_period(args.period, -(args.lookback_months - 1))
        lb = (parse_period(first)[0], parse_period(args.period)[1])
        ivs = usage_by_account(repo, bindings, markets, *lb)
    finally:
        repo.close()
    store = InsightsStore(_db(args))
    now_ms = to_ms(clock_from_spec(args.clock).now())
    offers, skipped = P.make_offers(promos, _accounts(bindings, markets, tariffs),
                                    {a: s for a, (_, s) in result.items()}, ivs, tariffs, lb)
    new = store.save_offers(args.period, offers, now_ms)
    store.close()
    if args.json:
        print(json.dumps({"offers": [o.__dict__ | {"lookback": [str(d) for d in o.lookback]} for o in offers],
                          "new": new, "skipped": [s.__dict__ for s in skipped]}, default=str))
        return 0
    for o in offers:
        print(f"{o.account_id:12} {o.promotion_id:24} {o.message}")
    print(f"{len(offers)} offer(s), {new} new; {len(skipped)} (promotion, account) pair(s) not offered")
    return 0


def cmd_accept(args) -> int:
    promos = {p.id: p for p in P.load_promotions(args.promotions or P.BUNDLED)}
    promo = promos.get(args.promotion)
    if promo is None:
        raise ValidationError(f"unknown promotion {args.promotion!r} (known: {', '.join(sorted(promos))})")
    today = clock_from_spec(args.clock).now().date()
    frm = date.fromisoformat(args.start) if args.start else max(today, promo.valid_from or today)
    if (promo.valid_from and frm < promo.valid_from) or (promo.valid_to and frm >= promo.valid_to):
        raise ValidationError(f"promotion {promo.id!r} is valid from {promo.valid_from} to {promo.valid_to} "
                              f"(exclusive); it cannot start on {frm}")
    store = InsightsStore(_db(args))
    try:
        store.accept(args.promotion, args.account, frm, to_ms(clock_from_spec(args.clock).now()))
    finally:
        store.close()
    print(f"account {args.account} accepted {args.promotion}, in effect from {frm}")
    return 0


def accepted_rating_promotions(db_url: str, promos=None) -> dict[str, list]:
    """Account id -> accepted discounts (percent or fixed per kWh) as rating Promotions (what the bill run prices)."""
    promos = {p.id: p for p in (promos or P.load_promotions())}
    store = InsightsStore(db_url)
    try:
        out: dict[str, list] = {}
        for pid, acc, frm in store.acceptances():
            p = promos.get(pid)
            if p is not None and p.kind in P.DISCOUNTS:
                out.setdefault(acc, []).append(p.as_rating_promotion(frm))
        return out
    finally:
        store.close()


def cmd_export_offers(args) -> int:
    store = InsightsStore(_db(args))
    try:
        offers, cursor = store.offers_after(args.consumer)
        publisher = None
        if args.mqtt:
            import paho.mqtt.client as mqtt
            host, _, port = args.mqtt.rpartition(":")
            publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"meterlink-offers-{args.consumer}")
            publisher.connect(host or "127.0.0.1", int(port))
            publisher.loop_start()
        with open(args.to, "a") as fh:
            for o in offers:
                line = json.dumps({"type": "promotion_offer", **o}, sort_keys=True)
                fh.write(line + "\n")
                if publisher:
                    publisher.publish(f"meterlink/crm/offers/{o['account_id']}", line, qos=1).wait_for_publish(10)
        if publisher:
            publisher.loop_stop()
            publisher.disconnect()
        if offers:
            store.advance_cursor(args.consumer, offers[-1]["offer_seq"])
    finally:
        store.close()
    print(f"exported {len(offers)} offer(s) after cursor {cursor} to {args.to}" + (f" and {args.mqtt}" if args.mqtt else ""))
    return 0


def cmd_bonuses(args) -> int:
    """Book the top-up bonuses earned by PAYG sales in [from, to) (idempotent)."""
    from datetime import datetime, timezone
    from .payg_store import PaygStore

    start = datetime.combine(date.fromisoformat(args.start), datetime.min.time(), timezone.utc)
    end = datetime.combine(date.fromisoformat(args.end), datetime.min.time(), timezone.utc)
    store = InsightsStore(_db(args))
    try:
        accepted = {(p, a): frm for p, a, frm in store.acceptances()}
    finally:
        store.close()
    payg = PaygStore(_db(args))
    try:
        sales, reversals = [], {}
        for vendor in payg.vendors():
            sales += payg.sales(vendor, start, end)
            reversals.update({r.sale.sale_id: r.at for r in payg.reversals(vendor, start, end)})
        txns = P.topup_bonuses(sales, reversals, accepted, P.load_promotions(args.promotions or P.BUNDLED))
        booked = payg.append(txns)
    finally:
        payg.close()
    total = sum(t.postings[0].amount_minor for t in booked)
    print(f"booked {len(booked)} bonus transaction(s) (of {len(txns)} due; the rest were booked before), "
          f"net {total} minor units")
    return 0


def realised_costs(db_url: str) -> dict[tuple[str, str], int]:
    """(promotion, account) -> what it has cost so far: discount lines on issued billable items and booked
    top-up bonuses (net of reversals). Tariff switches have no line of their own: their cost stays the
    shadow-rated estimate of the offer."""
    from .billing_store import BillingStore
    from .payg_store import PaygStore

    out: dict[tuple[str, str], int] = {}
    store = BillingStore(db_url)
    try:
        for _, item in store.items():
            for line in item["lines"]:
                if line["kind"] == "promotion":
                    key = (line["band"], item["account_id"])
                    out[key] = out.get(key, 0) - int(line["net_minor"])
    finally:
        store.close()
    payg = PaygStore(db_url)
    try:
        for t in payg.transactions():
            if t.business_key.startswith(("bonus:", "bonus-reversal:")):
                _, pid, _ = t.business_key.split(":", 2)
                credited = next(p.account for p in t.postings if p.account != P.PROMOTION_EXPENSE)
                account = credited.removeprefix("customer:").removesuffix(":prepaid")
                key = (pid, account)
                out[key] = out.get(key, 0) + t.amount(P.PROMOTION_EXPENSE)
    finally:
        payg.close()
    return out


def cmd_outcomes(args) -> int:
    store = InsightsStore(_db(args))
    bindings, markets = _bindings(args), load_markets()
    try:
        offers = [P.Offer(o["promotion_id"], o["account_id"], o["kind"], o["message"], o["est_cost_minor"],
                          o["saving_minor"], o["current_total_minor"]) for o in store.offers()]
        acc = store.acceptances()
    finally:
        store.close()
    repo = open_repository(_db(args))
    before, after, cost = {}, {}, {}
    try:
        for pid, account, frm in acc:
            b = usage_by_account(repo, bindings, markets, frm - timedelta(days=args.days), frm, [account])
            a = usage_by_account(repo, bindings, markets, frm, frm + timedelta(days=args.days), [account])
            zone = markets[bindings.market_of_account(account)].timezone
            fb = I.compute_features(account, b.get(account, []), frm - timedelta(days=args.days), frm, zone)
            fa = I.compute_features(account, a.get(account, []), frm, frm + timedelta(days=args.days), zone)
            if fb.days_with_data and fa.days_with_data:
                before[account], after[account] = fb.avg_daily_wh, fa.avg_daily_wh
            cost[(pid, account)] = next((o.est_cost_minor for o in offers
                                         if o.promotion_id == pid and o.account_id == account), 0)
    finally:
        repo.close()
    cost.update({k: v for k, v in realised_costs(_db(args)).items() if k in cost})
    outs = P.outcomes(offers, cost, before, after)
    if args.json:
        print(json.dumps([o.__dict__ for o in outs], default=str))
        return 0
    print(f"{'promotion':26} {'offered':>7} {'accepted':>8} {'cost':>8} {'use change':>10}")
    for o in outs:
        print(f"{o.promotion_id:26} {o.offered:7d} {o.accepted:8d} {o.cost_minor:8d} "
              f"{o.consumption_change if o.consumption_change is not None else '-':>10}")
    return 0


def _issued_item(db_url: str, account: str, period: str) -> dict | None:
    """The billable item issued for (account, period), if the bill run made one."""
    from .billing_store import BillingStore
    store = BillingStore(db_url)
    try:
        found = [d for _, d in store.items(period=period) if d["account_id"] == account]
    finally:
        store.close()
    return found[-1] if found else None


def cmd_report(args) -> int:
    from . import report as R

    bindings, markets, vat = _bindings(args), load_markets(), load_vat_table()
    tariffs = _tariffs()
    start, end = parse_period(args.period) if "-" in args.period and len(args.period) == 7 else (None, None)
    if args.start:
        start, end = date.fromisoformat(args.start), date.fromisoformat(args.end)
    if start is None:
        raise ValidationError(f"bad period {args.period!r} (want YYYY-MM, or --start/--end)")
    repo = open_repository(_db(args))
    try:
        if args.account:
            acc = bindings.accounts.get(args.account)
            if acc is None:
                raise ValidationError(f"unknown account {args.account}")
            market = markets[bindings.market_of_account(args.account)]
            tariff = tariffs[acc.tariff_id or market.default_tariff]
            ivs = usage_by_account(repo, bindings, markets, start, end, [args.account])[args.account]
            promos = accepted_rating_promotions(_db(args)).get(args.account, [])
            issued = None if args.start else _issued_item(_db(args), args.account, args.period)
            bill = R.bill_from_item_dict(issued) if issued else None
            rep = R.build_customer_report(args.account, ivs, tariff, market, vat, start, end, promotions=promos,
                                          bill=bill)
            out = R.render(rep, args.out)
            print(f"{out}: {rep.total_wh} Wh, {rep.money(rep.bill.gross_minor)} {rep.currency} incl. VAT"
                  + (" (the issued bill)" if issued else " (priced now; no bill issued for the period yet)"))
            return 0
        market = markets[args.market]
        accounts = [a for a in bindings.accounts if bindings.market_of_account(a) == market.id]
        ivs = usage_by_account(repo, bindings, markets, start, end, accounts)
        parked, parked_estimated = parked_wh(repo, bindings, market, start, end)
    finally:
        repo.close()
    store = InsightsStore(_db(args))
    feats = store.features(args.period)
    offers = [P.Offer(o["promotion_id"], o["account_id"], o["kind"], o["message"], o["est_cost_minor"],
                      o["saving_minor"], o["current_total_minor"]) for o in store.offers()]
    acc = {(p, a): 0 for p, a, _ in store.acceptances()}
    store.close()
    seg_wh, seg_n = {}, {}
    for a in accounts:
        for s in (feats.get(a, ({}, []))[1] or ["(none)"]):
            seg_wh[s] = seg_wh.get(s, 0) + sum(iv.wh for iv in ivs.get(a, []))
            seg_n[s] = seg_n.get(s, 0) + 1
    mr = R.MarketReport(market.id, start, end, seg_wh, seg_n, P.outcomes(offers, acc, {}, {}), parked_wh=parked,
                        pending_wh=parked_estimated)
    out = R.render_market(mr, args.out)
    print(f"{out}: market {market.id}, {len(accounts)} account(s)")
    return 0


def _common(p, bindings: bool = True) -> None:
    p.add_argument("--config", default="headend.toml")
    p.add_argument("--database", help="sqlite:///PATH, overrides the config")
    p.add_argument("--clock", default="system", help="system | sim:ISO | scaled:ISO,SPEED[,ANCHOR_UNIX]")
    if bindings:
        p.add_argument("--bindings", type=Path, help="bindings TOML (default: those loaded in the database, else the demo's)")
        p.add_argument("--bindings-csv", type=Path, action="append", help="effective-dated bindings CSV (repeatable)")


def register(sub) -> None:
    ins = sub.add_parser("insights", help="behaviour features and segments of every account for a month",
                         epilog="example: meterlink-headend insights --period 2026-11 --out insights-2026-11.jsonl")
    ins.add_argument("--period", required=True, help="local month YYYY-MM")
    ins.add_argument("--segments", type=Path, help="segments TOML (default: bundled)")
    ins.add_argument("--out", type=Path, help="also write one JSON line per account here")
    ins.add_argument("--json", action="store_true")
    _common(ins)
    ins.set_defaults(func=cmd_insights)

    pr = sub.add_parser("promotions", help="tailored offers: offer, accept, export, outcomes",
                        epilog="example: meterlink-headend promotions offer --period 2026-11 --lookback-months 3")
    psub = pr.add_subparsers(dest="action", required=True)
    off = psub.add_parser("offer", help="shadow-rate and make offers within each promotion's cost cap",
                          epilog="example: meterlink-headend promotions offer --period 2026-11")
    off.add_argument("--period", required=True, help="local month YYYY-MM whose behaviour decides eligibility")
    off.add_argument("--lookback-months", type=int, default=3, help="months shadow rating prices (default 3)")
    off.add_argument("--promotions", type=Path, help="promotions TOML (default: bundled)")
    off.add_argument("--segments", type=Path)
    off.add_argument("--json", action="store_true")
    _common(off)
    off.set_defaults(func=cmd_offer)
    acc = psub.add_parser("accept", help="record an acceptance; rating applies it from its start date",
                          epilog="example: meterlink-headend promotions accept --account A-GB-001 --promotion gb-winter-day-10 --from 2026-12-01")
    acc.add_argument("--account", required=True)
    acc.add_argument("--promotion", required=True)
    acc.add_argument("--from", dest="start", help="local date it takes effect (default: today or the promotion's start)")
    acc.add_argument("--promotions", type=Path, help="promotions TOML (default: bundled)")
    _common(acc, bindings=False)
    acc.set_defaults(func=cmd_accept)
    exp = psub.add_parser("export", help="append offers not yet exported to a JSONL file (and MQTT) for the CRM",
                          epilog="example: meterlink-headend promotions export --to crm/offers.jsonl --mqtt 127.0.0.1:1883")
    exp.add_argument("--to", required=True, type=Path)
    exp.add_argument("--consumer", default="crm", help="cursor name (default crm)")
    exp.add_argument("--mqtt", help="also publish each offer to meterlink/crm/offers/<account> on HOST:PORT")
    _common(exp, bindings=False)
    exp.set_defaults(func=cmd_export_offers)
    bon = psub.add_parser("bonuses", help="book PAYG top-up bonuses of accepted offers on the sales of a window",
                          epilog="example: meterlink-headend promotions bonuses --from 2026-12-01 --to 2027-01-01")
    bon.add_argument("--from", dest="start", required=True, help="UTC date, inclusive")
    bon.add_argument("--to", dest="end", required=True, help="UTC date, exclusive")
    bon.add_argument("--promotions", type=Path)
    _common(bon, bindings=False)
    bon.set_defaults(func=cmd_bonuses)
    out = psub.add_parser("outcomes", help="offered, accepted, cost, consumption change per promotion",
                          epilog="example: meterlink-headend promotions outcomes --days 28")
    out.add_argument("--days", type=int, default=28, help="days before/after acceptance compared (default 28)")
    out.add_argument("--json", action="store_true")
    _common(out)
    out.set_defaults(func=cmd_outcomes)

    rp = sub.add_parser("report", help="render the customer (or market) view as PNG or HTML",
                        epilog="example: meterlink-headend report --account A-GB-001 --period 2026-11 --out a.html",
                        formatter_class=RAW)
    who = rp.add_mutually_exclusive_group(required=True)
    who.add_argument("--account")
    who.add_argument("--market", help="operator view of a market (uses the stored insights of the period)")
    rp.add_argument("--period", required=True, help="local month YYYY-MM")
    rp.add_argument("--start", help="local start date instead of the whole month (with --end, exclusive)")
    rp.add_argument("--end")
    rp.add_argument("--out", required=True, type=Path, help="FILE.png or FILE.html")
    _common(rp)
    rp.set_defaults(func=cmd_report)
