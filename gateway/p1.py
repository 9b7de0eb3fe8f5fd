"""The DSMR P1 port reader: bytes from a serial line -> framed, checked telegrams; the thin I/O shell.

The meter talks, we listen (DSMR 5 every second, 2.2/4 every ten). Every refused telegram is
counted by kind (CRC, truncated, malformed) and logged with the port's name; none is half-used.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

import serial

from meterlink.clock import Clock
from meterlink.errors import DeviceError, ProtocolError
from meterlink.readings import Reading

from .dsmr import Telegram, TelegramError, TelegramFramer, parse_telegram, to_readings, version_settings

log = logging.getLogger(__name__)

_STRIP_PARITY = bytes(range(128)) * 2      # 7-bit lines: drop a parity bit a cable may pass through


@dataclass
class P1Counters:
    telegrams: int = 0        # accepted
    crc_errors: int = 0
    truncated: int = 0        # cut off on the wire or refused for a missing end/CRC
    malformed: int = 0
    garbage_bytes: int = 0    # bytes between telegrams
    bytes_in: int = 0


@dataclass(frozen=True)
class P1Read:
    telegram: Telegram
    readings: list[Reading]
    received_at: datetime


class P1Reader:
    """Reads DSMR telegrams from `port` with the serial settings of `version` ('2.2', '4', '5')."""

    def __init__(self, port: str, version: str = "5", *, clock: Clock, max_bytes: int = 16_384,
                 stream=None) -> None:
        self.port, self.version, self.clock = port, str(version), clock
        self.settings = version_settings(version)
        self.framer = TelegramFramer(max_bytes)
        self.counters = P1Counters()
        if stream is not None:
            self._ser = stream
            return
        s = self.settings
        try:
            self._ser = serial.Serial(port, baudrate=s.baud, bytesize=s.bytesize, parity=s.parity,
                                      stopbits=s.stopbits, timeout=0.1)
            self._ser.reset_input_buffer()    # start at the next telegram, not at one queued long ago
        except (serial.SerialException, OSError) as exc:
            raise DeviceError(f"cannot open P1 port {port}: {exc}") from None

    def describe(self) -> str:
        s = self.settings
        return f"{self.port} (DSMR {self.version}, {s.baud} {s.bytesize}{s.parity}{s.stopbits})"

    def close(self) -> None:
        self._ser.close()

    def telegrams(self, wait_s: float | None = None) -> Iterator[tuple[datetime, Telegram]]:
        """Yield (received_at, telegram) for every valid telegram; stop after `wait_s` real seconds."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while deadline is None or time.monotonic() < deadline:
            try:
                chunk = self._ser.read(max(1, self._ser.in_waiting))
            except (serial.SerialException, OSError) as exc:
                raise DeviceError(f"P1 port {self.port}: {exc}") from None
            if not chunk:
                continue
            yield from self.feed(chunk)

    def feed(self, chunk: bytes) -> list[tuple[datetime, Telegram]]:
        """Frame and check `chunk`; returns the valid telegrams it completed (counts the rest)."""
        self.counters.bytes_in += len(chunk)
        if self.settings.bytesize == 7:
            chunk = chunk.translate(_STRIP_PARITY)
        st = self.framer.stats
        truncated, garbage = st.truncated + st.oversized, st.garbage_bytes
        frames = self.framer.feed(chunk)
        self.counters.truncated += st.truncated + st.oversized - truncated
        self.counters.garbage_bytes += st.garbage_bytes - garbage
        out = []
        for raw in frames:
            received_at = self.clock.now()
            try:
                telegram = parse_telegram(raw, version=self.version)
            except TelegramError as exc:
                if exc.kind == "crc":
                    self.counters.crc_errors += 1
                elif exc.kind == "truncated":
                    self.counters.truncated += 1
                else:
                    self.counters.malformed += 1
                log.warning("P1 %s: telegram refused: %s", self.port, exc)
                continue
            self.counters.telegrams += 1
            out.append((received_at, telegram))
        return out

    def poll(self, wait_s: float, **kw) -> P1Read:
        """Drop what queued up since the last poll, then `read_one`: the reading is of now, not of then."""
        try:
            self._ser.reset_input_buffer()
        except (serial.SerialException, OSError, AttributeError):
            pass
        self.framer = TelegramFramer(self.framer.max_bytes)
        return self.read_one(wait_s, **kw)

    def read_one(self, wait_s: float, *, meter_id: str | None = None,
                 gas_meter_ids: dict[int, str] | None = None) -> P1Read:
        """The next valid telegram as readings; DeviceError if none arrives within `wait_s`."""
        for received_at, telegram in self.telegrams(wait_s):
            readings = to_readings(telegram, received_at=received_at, gas_meter_ids=gas_meter_ids,
                                   meter_id=meter_id or (None if telegram.serial else f"p1:{self.port}"))
            return P1Read(telegram, readings, received_at)
        c = self.counters
        raise DeviceError(f"P1 port {self.describe()}: no valid telegram in {wait_s:g} s "
                          f"({c.bytes_in} bytes, {c.crc_errors} CRC errors, {c.truncated} truncated, "
                          f"{c.malformed} malformed)")


class P1Worker:
    """The thread that owns one P1 port in the daemon: at each poll instant, the next valid telegram.

    It has the shape of a bus worker (`thread`, `wake`, `error`, `meters`) so the daemon joins and
    wakes it like the Modbus buses. Stale bytes are dropped before each poll; a port that gives no
    valid telegram within `wait_s` is reported through `on_error` and tried again next interval.
    """

    def __init__(self, config, reader: P1Reader, clock: Clock, sleeper, interval_s: int, first: datetime,
                 deliver, on_error, *, stop, until: datetime | None = None, on_round=None,
                 wait_s: float | None = None) -> None:
        self.config, self.reader, self.clock, self.sleeper = config, reader, clock, sleeper
        self.interval, self.due, self.deliver, self.on_error = timedelta(seconds=interval_s), first, deliver, on_error
        self.stop, self.until, self.on_round = stop, until, on_round
        self.wait_s = wait_s if wait_s is not None else (5.0 if reader.version == "5" else 35.0)
        self.meters: dict = {}
        self.wake = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"p1 {reader.port}", daemon=True)

    def start(self) -> "P1Worker":
        self.sleeper.join()
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self.stop.is_set() and (self.until is None or self.due <= self.until):
                self.wake.clear()
                self.sleeper.sleep_until(self.due, self.wake)
                if self.stop.is_set():
                    return
                self.poll_once()
                if self.on_round:
                    self.on_round()
                self.due += self.interval
        except BaseException as exc:  # noqa: BLE001 - reported by the daemon, never silently lost
            self.error = exc
            log.exception("P1 port %s stopped", self.reader.port)
        finally:
            self.sleeper.leave()

    def poll_once(self) -> P1Read | None:
        gas = {1: self.config.gas_meter_id} if getattr(self.config, "gas_meter_id", None) else None
        try:
            got = self.reader.poll(self.wait_s, meter_id=getattr(self.config, "meter_id", None), gas_meter_ids=gas)
        except (DeviceError, ProtocolError) as exc:
            self.on_error(f"P1 port {self.reader.port}: {exc}")
            return None
        self.deliver(self.config, got)
        return got
