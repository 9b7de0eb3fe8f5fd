"""The reading: what a meter said, when, with which quality flags; plain data, no I/O.

Values are exact integers in the quantity's base unit (DESIGN.md "Units and numbers"):
energy `Wh`, power `W`, voltage `mV`, current `mA`, frequency `mHz`, gas `dm3` (litres),
power factor `permille`. A value is the meter's cumulative register for energies, never a delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntFlag

# Units the system stores, and how many base units make one display unit.
UNITS = {"Wh": ("kWh", 1000), "W": ("kW", 1000), "mV": ("V", 1000), "mA": ("A", 1000),
         "mHz": ("Hz", 1000), "dm3": ("m3", 1000), "permille": ("", 1000), "varh": ("kvarh", 1000),
         "var": ("kvar", 1000)}

# Registers that are billed; everything else is an instantaneous/diagnostic value.
BILLING_OBIS = frozenset({"1.8.0", "1.8.1", "1.8.2", "2.8.0", "2.8.1", "2.8.2"})


class Quality(IntFlag):
    """Flags carried with a reading; they are kept, never used to drop or 'fix' a value."""

    OK = 0
    ESTIMATED = 1            # apportioned, not read
    DECREASE = 2             # cumulative register went backwards
    IMPLAUSIBLE_JUMP = 4     # rose faster than the meter's maximum power allows
    METER_EXCHANGE = 8       # serial number changed since the previous reading
    CLOCK_UNTRUSTED = 16     # the gateway's clock was not synchronised when this was taken
    ROLLOVER = 32            # register wrapped at its maximum


@dataclass(frozen=True, slots=True)
class Reading:
    meter_id: str
    obis: str
    taken_at: datetime        # aware UTC: when the meter answered
    value: int                # exact integer in `unit`
    unit: str                 # one of UNITS
    quality: int = 0          # Quality flags

    def __post_init__(self) -> None:
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            raise TypeError(f"reading {self.meter_id}/{self.obis}: value must be int, got {self.value!r}")
        if self.unit not in UNITS:
            raise ValueError(f"reading {self.meter_id}/{self.obis}: unknown unit {self.unit!r}")
        if self.taken_at.tzinfo is None:
            raise ValueError(f"reading {self.meter_id}/{self.obis}: naive timestamp")

    @property
    def is_billing(self) -> bool:
        return self.obis in BILLING_OBIS
