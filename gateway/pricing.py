"""Offline PAYG pricing at the gateway: the head-end's tariff (pulled, signature-verified) turned into gross minor units for a reading's consumption; never reads a clock, a file or a socket.

The head-end prices consumption from VEE intervals (headend/vee.py: register differences
apportioned over a UTC-aligned grid by largest remainder) and rates each interval in the band of
its LOCAL start (headend/rating.py). The gateway prices the same Wh the same way, with the same
pure functions, so its charges agree with the head-end's rating to the minor unit:

* the consumption between two consecutive 1.8.0 readings ``[since, at)`` is cut at the grid
  boundaries inside it and apportioned by `vee.apportion` over the pieces' durations (µs) -- the
  very pieces VEE derives from the same pair of readings;
* each piece is rated by `rating.rate_interval` as the interval of the grid it lies in (band of
  the interval's local start: weekday/weekend/holiday and time-of-use as the tariff defines them,
  tariff versions by local date);
* the net amount (exact Decimal) is grossed up with the VAT rate the PAYG ledger splits gross
  charges with: ``gross = net x (1 + vat_rate)``; rounding happens once, in `credit.charge`, with
  the residue carried, so the sum of a meter's charges is the exact sum rounded once.

The daily standing charge of the tariff version in force on a local day (the tariff's zone, one
charge per local date whatever its length, as `rating.standing_charges`) is grossed up the same
way (`standing_gross`) and charged by `credit.charge_standing`, once per local day, at the first
evaluation on or after its local midnight. Tiers (blocks of a billing period) are not applied
offline. Which tariff prices which account comes from the ``payg.tariff`` configuration change
(headend/configpub.py), kept in `configpull.ConfigState.payg_tariffs`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from meterlink.clock import utc
from meterlink.config import toml_error
from meterlink.errors import MeterlinkError, ValidationError
# The rating core is pure (no database, no clock): the gateway reuses it rather than keeping a
# second copy that could drift from the head-end's.
from meterlink.headend.rating import rate_interval
from meterlink.headend.tariff import Tariff, tariff_from_toml
from meterlink.headend.vee import Interval, apportion

_US = timedelta(microseconds=1)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class TariffPrice:
    """A pulled tariff as the price of PAYG consumption (passed to `credit.charge` as `price`)."""

    tariff: Tariff
    tariff_name: str                     # the name it was published under (`tariff.set`)
    vat_rate: Decimal
    interval: timedelta = timedelta(minutes=15)
    config_version: int = 0              # the configuration change that assigned it
    # flat gross minor units per kWh for consumption before the tariff's first version (a tariff pulled
    # ahead of its start): the gateway's fallback price, as if the tariff were not pulled yet; None: such
    # consumption cannot be priced (ValidationError)
    before_start: Decimal | None = None

    def describe(self) -> str:
        return (f"tariff {self.tariff_name!r} ({self.tariff.id}, {self.tariff.timezone}) + VAT {self.vat_rate}, "
                f"{self.interval // timedelta(minutes=1)}-minute grid (configuration version {self.config_version})")

    def pieces(self, wh: int, since: datetime | None, at: datetime) -> list[tuple[datetime, int]]:
        """(grid interval start, Wh) of `wh` consumed over ``[since, at)``, apportioned as VEE does."""
        step_us = self.interval // _US
        at = utc(at)
        if since is None or utc(since) >= at:            # no previous instant: the interval holding `at`
            return [(_grid_floor(at - _US, step_us), wh)]
        since = utc(since)
        cuts, b = [], _grid_ceil(since, step_us)
        if b == since:
            b += self.interval
        while b < at:
            cuts.append(b)
            b += self.interval
        if not cuts:
            return [(_grid_floor(since, step_us), wh)]
        edges = [since, *cuts, at]
        shares = apportion(wh, [(e1 - e0) // _US for e0, e1 in zip(edges, edges[1:])])
        return [(_grid_floor(e0, step_us), share) for e0, share in zip(edges, shares)]

    def _priced(self, wh: int, since: datetime | None, at: datetime) -> tuple[Decimal, Decimal]:
        """(exact net minor units the tariff prices, exact flat gross minor units at `before_start`) of
        `wh` consumed over ``[since, at)``: the grid intervals that start (local date) before the tariff's
        first version go to the flat part, or raise ValidationError when there is no `before_start`."""
        first = self.tariff.versions[0].valid_from
        zone = self.tariff.zone
        net, flat = Decimal(0), Decimal(0)
        for start, share in self.pieces(wh, since, at):
            if not share:
                continue
            if start.astimezone(zone).date() < first:
                if self.before_start is None:
                    raise ValidationError(f"tariff {self.tariff_name!r}: no version in force on "
                                          f"{start.astimezone(zone).date()} (first valid_from {first})")
                flat += Decimal(share) * self.before_start / 1000
            else:
                net += rate_interval(Interval("", "1.8.0", start, start + self.interval, share),
                                     self.tariff, "").amount_dec
        return net, flat

    def net(self, wh: int, since: datetime | None, at: datetime) -> Decimal:
        """Exact net minor units the tariff prices of `wh` consumed over ``[since, at)`` (head-end rating,
        no rounding; intervals before its first version are not the tariff's: see `amount`)."""
        return self._priced(wh, since, at)[0]

    def amount(self, wh: int, since: datetime | None, at: datetime) -> Decimal:
        """Exact gross (VAT-inclusive) minor units of `wh` consumed over ``[since, at)``; the grid
        intervals that start before the tariff's first version (local date) at `before_start`."""
        net, flat = self._priced(wh, since, at)
        return net * (1 + self.vat_rate) + flat

    @property
    def standing_zone(self) -> str:
        """The zone whose local dates are the supply days of the standing charge (the tariff's)."""
        return self.tariff.timezone

    def standing_gross(self, day: date) -> Decimal | None:
        """Exact gross (VAT-inclusive) minor units of the standing charge of local day `day`: the
        version in force that day, ``standing_charge x (1 + vat_rate)``, not rounded; None before
        the tariff's first version (a tariff pulled ahead of its start: no standing charge that day,
        and relay decisions go on meanwhile)."""
        if day < self.tariff.versions[0].valid_from:
            return None
        return self.tariff.version_for(day).standing_charge * (1 + self.vat_rate)


def _grid_floor(t: datetime, step_us: int) -> datetime:
    us = (t - EPOCH) // _US
    return EPOCH + _US * (us // step_us * step_us)


def _grid_ceil(t: datetime, step_us: int) -> datetime:
    us = (t - EPOCH) // _US
    return EPOCH + _US * (-(-us // step_us) * step_us)


def tariff_from_text(name: str, text: str) -> Tariff:
    """Parse a pulled tariff's TOML text (errors name the tariff)."""
    where = f"<pulled tariff {name}>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(exc, where) from None
    return tariff_from_toml(data, text, where)


def price_for_account(config_state, account: str, currency: str) -> TariffPrice | None:
    """The pulled tariff pricing `account` (None when no ``payg.tariff`` names it yet).

    Raises ValidationError when the assignment cannot be used (its tariff was not pulled, does not
    parse, or is in another currency): the caller keeps its previous price and says why."""
    entry = (config_state.payg_tariffs or {}).get(account)
    if entry is None:
        return None
    name = entry["tariff"]
    text = config_state.tariffs.get(name)
    if text is None:
        raise ValidationError(f"PAYG account {account}: tariff {name!r} is assigned but was not pulled")
    try:
        tariff = tariff_from_text(name, text)
    except MeterlinkError as exc:
        raise ValidationError(f"PAYG account {account}: pulled tariff {name!r} is not usable: {exc}") from None
    if tariff.currency != currency:
        raise ValidationError(f"PAYG account {account}: tariff {name!r} is in {tariff.currency}, the account in "
                              f"{currency}")
    vat = Decimal(str(entry.get("vat_rate", "0")))
    if not Decimal(0) <= vat < 1:
        raise ValidationError(f"PAYG account {account}: VAT rate {vat} out of range [0, 1)")
    minutes = int(entry.get("interval_minutes", 15))
    if minutes <= 0 or 1440 % minutes:
        raise ValidationError(f"PAYG account {account}: interval_minutes {minutes} does not divide a day")
    return TariffPrice(tariff, name, vat, timedelta(minutes=minutes), int(entry.get("version", 0)))


__all__ = ["TariffPrice", "price_for_account", "tariff_from_text"]
