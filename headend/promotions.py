"""Tailored promotions as data: eligibility by segment, shadow-rated tariff switches, cost caps, outcomes; pure.

A promotions file (TOML) holds `[[promotion]]` tables:

  id, description, market            who may get it: `segments_any` / `segments_all` (segment ids)
  kind = "tariff_switch"             `tariff` = candidate tariff id; offered only when shadow rating
                                     the customer's look-back window under it costs LESS than under
                                     the current tariff; the offer states the saving
  kind = "percent_discount"          `percent` off the energy amount of `bands` (all when absent)
  kind = "fixed_discount"            `per_kwh_minor` minor units off every kWh of `bands` (never more than
                                     that energy costs)
  kind = "topup_bonus"               `percent` bonus credit on PAYG top-ups (prepaid accounts only)
  valid_from / valid_to              local dates of the offer's effect (end exclusive)
  cost_cap_minor                     total estimated cost the company accepts; offers are made in
                                     order of largest customer benefit until the cap would be passed

Costs and savings are integer minor units from `rating.quote` (the market's rounding rule);
shadow rating IS rating: the same function on the same intervals, only the tariff differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from meterlink.config import Section, load_section
from meterlink.errors import ValidationError
from meterlink.money import round_minor

from .rating import Promotion, quote
from .tariff import Tariff
from .vee import Interval

KINDS = ("tariff_switch", "percent_discount", "fixed_discount", "topup_bonus")
DISCOUNTS = ("percent_discount", "fixed_discount")     # priced by rating as their own line
BUNDLED = Path(__file__).parent / "data" / "promotions.toml"


@dataclass(frozen=True)
class PromotionDef:
    id: str
    description: str
    market: str
    kind: str
    segments_any: frozenset[str] = frozenset()
    segments_all: frozenset[str] = frozenset()
    tariff: str | None = None
    percent: Decimal = Decimal(0)
    per_kwh_minor: Decimal = Decimal(0)
    bands: frozenset[str] | None = None
    valid_from: date | None = None
    valid_to: date | None = None
    cost_cap_minor: int | None = None
    prepaid_only: bool = False

    def eligible(self, segments: Iterable[str]) -> bool:
        s = set(segments)
        if self.segments_any and not (s & self.segments_any):
            return False
        return self.segments_all <= s

    def as_rating_promotion(self, start: date | None = None) -> Promotion:
        """An accepted percent discount as the rating engine's Promotion (effective from `start`)."""
        if self.kind not in DISCOUNTS:
            raise ValidationError(f"promotion {self.id!r} is a {self.kind}, not a discount on rating")
        frm = max(d for d in (self.valid_from, start) if d is not None) if (self.valid_from or start) else None
        return Promotion(self.id, self.description, self.percent, self.bands, frm, self.valid_to, self.per_kwh_minor)


@dataclass(frozen=True)
class Account:
    """What offer-making needs to know about one account."""

    id: str
    market: str
    prepaid: bool
    tariff: Tariff
    rounding_mode: str = "half_up"
    rounding_stage: str = "line"


@dataclass(frozen=True)
class Offer:
    promotion_id: str
    account_id: str
    kind: str
    message: str
    est_cost_minor: int          # what it is expected to cost the company over the look-back window
    saving_minor: int            # what the customer would have saved in the look-back window
    current_total_minor: int
    shadow_total_minor: int | None = None
    currency: str = ""
    lookback: tuple[date, date] | None = None


@dataclass(frozen=True)
class Skipped:
    promotion_id: str
    account_id: str
    reason: str                  # not_eligible | no_saving | cap_reached | wrong_market | postpaid


def _date(sec: Section, key: str) -> date | None:
    raw = sec.get(key, (str, date), None)
    if raw is None or isinstance(raw, date):
        return raw
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise sec.error(key, f"not an ISO date: {raw!r}") from None


def promotions_from_section(root: Section, known_tariffs: Iterable[str] | None = None) -> tuple[PromotionDef, ...]:
    root.check_known({"promotion"})
    tariffs = set(known_tariffs) if known_tariffs is not None else None
    out, seen = [], set()
    for sec in root.sections("promotion"):
        sec.check_known({"id", "description", "market", "kind", "segments_any", "segments_all", "tariff",
                         "percent", "per_kwh_minor", "bands", "valid_from", "valid_to", "cost_cap_minor"})
        pid = sec.get("id", str)
        if pid in seen:
            raise sec.error("id", f"duplicate promotion id {pid!r}")
        seen.add(pid)
        kind = sec.get("kind", str)
        if kind not in KINDS:
            raise sec.error("kind", f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        tariff = sec.get("tariff", str, None)
        if kind == "tariff_switch":
            if tariff is None:
                raise sec.error("tariff", "a tariff_switch needs the candidate tariff id")
            if tariffs is not None and tariff not in tariffs:
                raise sec.error("tariff", f"unknown tariff {tariff!r}")
        percent = Decimal(0)
        if kind in ("percent_discount", "topup_bonus"):
            raw = sec.get("percent", (str, int))
            try:
                percent = Decimal(str(raw))
            except InvalidOperation:
                raise sec.error("percent", f"not a decimal number: {raw!r}") from None
            if not (Decimal(0) < percent <= Decimal(100)):
                raise sec.error("percent", f"must be in (0, 100], got {raw!r}")
        per_kwh = Decimal(0)
        if kind == "fixed_discount":
            raw = sec.get("per_kwh_minor", (str, int))
            try:
                per_kwh = Decimal(str(raw))
            except InvalidOperation:
                raise sec.error("per_kwh_minor", f"not a decimal number: {raw!r}") from None
            if not per_kwh.is_finite() or per_kwh <= 0:
                raise sec.error("per_kwh_minor", f"must be a positive number of minor units per kWh, got {raw!r}")
        bands = sec.get("bands", list, None)
        cap = sec.get("cost_cap_minor", int, None)
        if cap is not None and cap < 0:
            raise sec.error("cost_cap_minor", "must not be negative")
        vf, vt = _date(sec, "valid_from"), _date(sec, "valid_to")
        if vf and vt and vt <= vf:
            raise sec.error("valid_to", f"must be after valid_from {vf}")
        out.append(PromotionDef(
            id=pid, description=sec.get("description", str, ""), market=sec.get("market", str), kind=kind,
            segments_any=frozenset(sec.get("segments_any", list, [])),
            segments_all=frozenset(sec.get("segments_all", list, [])), tariff=tariff, percent=percent,
            per_kwh_minor=per_kwh,
            bands=frozenset(bands) if bands is not None else None, valid_from=vf, valid_to=vt,
            cost_cap_minor=cap, prepaid_only=(kind == "topup_bonus")))
    return tuple(out)


def load_promotions(path: str | Path = BUNDLED, known_tariffs: Iterable[str] | None = None) -> tuple[PromotionDef, ...]:
    return promotions_from_section(load_section(path), known_tariffs)


def shadow_quote(account: Account, tariff: Tariff, intervals: Sequence[Interval], start: date, end: date,
                 promotions: Sequence[Promotion] = ()):
    """Price the account's intervals for [start, end) under `tariff` with the account's market rounding."""
    return quote(tariff, intervals, account.id, start, end, rounding_mode=account.rounding_mode,
                 rounding_stage=account.rounding_stage, promotions=promotions)


def _major(minor: int, tariff: Tariff) -> str:
    return f"{Decimal(minor).scaleb(-tariff.exponent):.{tariff.exponent}f} {tariff.currency}"


def make_offers(promos: Sequence[PromotionDef], accounts: Mapping[str, Account],
                segments: Mapping[str, Sequence[str]], intervals: Mapping[str, Sequence[Interval]],
                tariffs: Mapping[str, Tariff], lookback: tuple[date, date],
                already_spent: Mapping[str, int] | None = None) -> tuple[list[Offer], list[Skipped]]:
    """Offers for every (promotion, account) pair that qualifies, within each promotion's cost cap.

    The look-back window [start, end) (local dates) is what shadow rating prices; a tariff switch is
    offered only with a strictly positive saving. Candidates are taken in order of saving (largest
    first, then account id) so a capped budget goes to those who gain most.
    """
    start, end = lookback
    spent = dict(already_spent or {})
    offers: list[Offer] = []
    skipped: list[Skipped] = []
    current_cache: dict[str, object] = {}

    def current(acc: Account):
        if acc.id not in current_cache:
            current_cache[acc.id] = shadow_quote(acc, acc.tariff, intervals.get(acc.id, ()), start, end)
        return current_cache[acc.id]

    for promo in promos:
        candidates: list[Offer] = []
        for acc_id in sorted(accounts):
            acc = accounts[acc_id]
            if acc.market != promo.market:
                skipped.append(Skipped(promo.id, acc_id, "wrong_market"))
                continue
            if not promo.eligible(segments.get(acc_id, ())):
                skipped.append(Skipped(promo.id, acc_id, "not_eligible"))
                continue
            if promo.prepaid_only and not acc.prepaid:
                skipped.append(Skipped(promo.id, acc_id, "postpaid"))
                continue
            cur = current(acc)
            ivs = intervals.get(acc_id, ())
            if promo.kind == "tariff_switch":
                cand = tariffs[promo.tariff]
                if cand.id == acc.tariff.id:
                    skipped.append(Skipped(promo.id, acc_id, "no_saving"))
                    continue
                shadow = shadow_quote(acc, cand, ivs, start, end)
                saving = cur.total_minor - shadow.total_minor
                if saving <= 0:
                    skipped.append(Skipped(promo.id, acc_id, "no_saving"))
                    continue
                msg = (f"On {promo.description or cand.name}, your use from {start} to {end} would have cost "
                       f"{_major(shadow.total_minor, cand)} instead of {_major(cur.total_minor, acc.tariff)}: "
                       f"you would have paid {_major(saving, cand)} less.")
                candidates.append(Offer(promo.id, acc_id, promo.kind, msg, saving, saving, cur.total_minor,
                                        shadow.total_minor, cand.currency, lookback))
            elif promo.kind in DISCOUNTS:
                # the discount as if it had applied all through the look-back window
                whole = Promotion(promo.id, promo.description, promo.percent, promo.bands,
                                  per_kwh_off=promo.per_kwh_minor)
                disc = shadow_quote(acc, acc.tariff, ivs, start, end, (whole,))
                saving = cur.total_minor - disc.total_minor
                if saving <= 0:
                    skipped.append(Skipped(promo.id, acc_id, "no_saving"))
                    continue
                what = (f"{promo.percent}% off" if promo.kind == "percent_discount"
                        else f"{promo.per_kwh_minor} {acc.tariff.currency} minor units off every kWh of")
                msg = (f"{what} {', '.join(sorted(promo.bands)) if promo.bands else 'all'} energy: "
                       f"on your use from {start} to {end} you would have saved {_major(saving, acc.tariff)}.")
                candidates.append(Offer(promo.id, acc_id, promo.kind, msg, saving, saving, cur.total_minor,
                                        disc.total_minor, acc.tariff.currency, lookback))
            else:  # topup_bonus: the bonus on top-ups equal to the look-back window's cost
                bonus = round_minor(Decimal(cur.total_minor) * promo.percent / 100, acc.rounding_mode)
                if bonus <= 0:
                    skipped.append(Skipped(promo.id, acc_id, "no_saving"))
                    continue
                msg = (f"{promo.percent}% bonus credit on top-ups: topping up what you used from {start} to {end} "
                       f"would have given you {_major(bonus, acc.tariff)} extra.")
                candidates.append(Offer(promo.id, acc_id, promo.kind, msg, bonus, bonus, cur.total_minor,
                                        None, acc.tariff.currency, lookback))
        candidates.sort(key=lambda o: (-o.saving_minor, o.account_id))
        budget = spent.get(promo.id, 0)
        for o in candidates:
            if promo.cost_cap_minor is not None and budget + o.est_cost_minor > promo.cost_cap_minor:
                skipped.append(Skipped(promo.id, o.account_id, "cap_reached"))
                continue
            budget += o.est_cost_minor
            offers.append(o)
        spent[promo.id] = budget
    return offers, skipped


@dataclass(frozen=True)
class Outcome:
    promotion_id: str
    offered: int
    accepted: int
    acceptance_rate: Decimal
    cost_minor: int
    avg_daily_wh_before: int | None      # of the accepting accounts, mean of their averages
    avg_daily_wh_after: int | None
    consumption_change: Decimal | None   # (after - before) / before


def _mean(values: Sequence[int]) -> int | None:
    if not values:
        return None
    return int((Decimal(sum(values)) / len(values)).to_integral_value(rounding=ROUND_HALF_EVEN))


def outcomes(offers: Iterable[Offer], accepted: Mapping[tuple[str, str], int],
             before: Mapping[str, int], after: Mapping[str, int]) -> list[Outcome]:
    """Per promotion: offered, accepted, realised cost, and consumption change of those who accepted.

    `accepted` maps (promotion id, account id) -> realised cost in minor units so far; `before` and
    `after` map account id -> average daily Wh in the periods before and after acceptance.
    """
    by: dict[str, list[Offer]] = {}
    for o in offers:
        by.setdefault(o.promotion_id, []).append(o)
    out = []
    for pid in sorted(by):
        offered = by[pid]
        acc_ids = [o.account_id for o in offered if (pid, o.account_id) in accepted]
        cost = sum(accepted[(pid, a)] for a in acc_ids)
        b = [before[a] for a in acc_ids if a in before and a in after]
        a_ = [after[a] for a in acc_ids if a in before and a in after]
        mb, ma = _mean(b), _mean(a_)
        change = None
        if mb:
            change = ((Decimal(ma) - Decimal(mb)) / Decimal(mb)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)
        rate = (Decimal(len(acc_ids)) / len(offered)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)
        out.append(Outcome(pid, len(offered), len(acc_ids), rate, cost, mb, ma, change))
    return out


# --------------------------------------------------------------------------- PAYG top-up bonuses

PROMOTION_EXPENSE = "expense:promotions"


def topup_bonuses(sales: Iterable, reversals: Mapping[str, datetime], accepted: Mapping[tuple[str, str], date],
                  promos: Sequence[PromotionDef], rounding_mode: str = "half_up") -> list:
    """Ledger transactions crediting accepted `topup_bonus` promotions on PAYG sales (pure).

    Each sale (vendors.Sale) of an account that accepted a top-up bonus in effect on the sale's
    date earns `percent` of its amount, rounded once with the market's mode: Dr expense:promotions,
    Cr the customer's prepaid credit; business key `bonus:<promotion>:<sale>` so booking twice is a
    no-op. A reversed sale's bonus is reversed with it at the reversal's instant
    (`bonus-reversal:<promotion>:<sale>`); `reversals` maps sale id -> reversal instant.
    """
    from . import ledger as L

    by_id = {p.id: p for p in promos if p.kind == "topup_bonus"}
    out = []
    for sale in sales:
        for (pid, account), frm in sorted(accepted.items()):
            promo = by_id.get(pid)
            if promo is None or account != sale.account_id:
                continue
            on = sale.at.date()
            if on < frm or (promo.valid_to and on >= promo.valid_to):
                continue
            bonus = round_minor(Decimal(sale.amount_minor) * promo.percent / 100, rounding_mode)
            if bonus <= 0:
                continue
            txn = L.Transaction(f"bonus:{pid}:{sale.sale_id}", sale.at,
                                (L.Posting(PROMOTION_EXPENSE, bonus, sale.currency),
                                 L.Posting(L.prepaid(account), -bonus, sale.currency)),
                                "promotion-bonus", f"{promo.percent}% top-up bonus ({pid})")
            out.append(txn)
            if sale.sale_id in reversals:
                out.append(L.reverse(txn, f"bonus-reversal:{pid}:{sale.sale_id}", reversals[sale.sale_id],
                                     "promotion-bonus-reversal"))
    return out
