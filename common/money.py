"""Money and energy arithmetic: integer minor units at rest, Decimal while computing.

There is exactly ONE rounding function (`round_minor`); every place that turns a Decimal amount
into stored minor units calls it with the market's configured rounding mode. Floats are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, ROUND_DOWN, ROUND_UP, ROUND_FLOOR, ROUND_CEILING, Decimal

# Names used in market configuration files -> decimal rounding modes.
ROUNDING_MODES = {
    "half_up": ROUND_HALF_UP,        # commercial rounding (most EU invoicing)
    "half_even": ROUND_HALF_EVEN,    # banker's rounding
    "down": ROUND_DOWN,              # truncate toward zero
    "up": ROUND_UP,
    "floor": ROUND_FLOOR,
    "ceiling": ROUND_CEILING,
}

# ISO 4217 minor-unit exponents for the currencies the markets use.
CURRENCY_EXPONENT = {"EUR": 2, "GBP": 2, "USD": 2, "CHF": 2, "SEK": 2, "NOK": 2, "DKK": 2,
                     "PLN": 2, "CZK": 2, "HUF": 2, "KES": 2, "NGN": 2, "ZAR": 2, "JPY": 0}


def to_decimal(value: int | str | Decimal) -> Decimal:
    """Exact conversion; floats are a bug where money or energy flows."""
    if isinstance(value, float):
        raise TypeError(f"float {value!r} where an exact amount is required")
    if isinstance(value, bool):
        raise TypeError("bool is not an amount")
    return value if isinstance(value, Decimal) else Decimal(value)


def round_minor(amount: Decimal | int | str, mode: str = "half_up") -> int:
    """THE rounding function: a Decimal amount in minor units -> integer minor units."""
    try:
        rounding = ROUNDING_MODES[mode]
    except KeyError:
        raise ValueError(f"unknown rounding mode {mode!r}; known: {', '.join(ROUNDING_MODES)}") from None
    return int(to_decimal(amount).quantize(Decimal(1), rounding=rounding))


@dataclass(frozen=True, order=True)
class Money:
    """An amount of integer minor units of one currency (e.g. 1234 EUR = EUR 12.34)."""

    minor: int
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.minor, int) or isinstance(self.minor, bool):
            raise TypeError(f"Money.minor must be int, got {type(self.minor).__name__}")
        if len(self.currency) != 3 or not self.currency.isupper():
            raise ValueError(f"bad ISO 4217 currency code {self.currency!r}")

    def _same(self, other: "Money") -> None:
        if other.currency != self.currency:
            raise ValueError(f"currency mismatch: {self.currency} vs {other.currency}")

    def __add__(self, other: "Money") -> "Money":
        self._same(other)
        return Money(self.minor + other.minor, self.currency)

    def __sub__(self, other: "Money") -> "Money":
        self._same(other)
        return Money(self.minor - other.minor, self.currency)

    def __neg__(self) -> "Money":
        return Money(-self.minor, self.currency)

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENT.get(self.currency, 2)

    def major(self) -> Decimal:
        """Exact amount in major units (for display and UBL), e.g. Decimal('12.34')."""
        return Decimal(self.minor).scaleb(-self.exponent)

    def __str__(self) -> str:
        return f"{self.currency} {self.major():.{self.exponent}f}"


def wh_to_kwh(wh: int) -> Decimal:
    """Integer Wh -> exact Decimal kWh (display and rating only)."""
    return Decimal(wh) / Decimal(1000)
