"""DSMR P1 parsing cost: telegrams/s and CPU per 1000 telegrams (parse + readings), framer MB/s.

Run: .venv/bin/python bench/bench_dsmr.py   (a DSMR 5 meter sends 1 telegram/s: the figures say
how many P1 ports one gateway core could follow).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from meterlink.gateway.dsmr import TelegramFramer, parse_telegram, to_readings

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "dsmr" / "data" / "v5_iskra.txt"
NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)


def main() -> None:
    raw = SAMPLE.read_bytes()
    n = 5000
    t0 = time.process_time()
    for _ in range(n):
        to_readings(parse_telegram(raw, version="5"), received_at=NOW)
    cpu = time.process_time() - t0
    print(f"parse+readings, DSMR 5 field telegram ({len(raw)} B): {n / cpu:,.0f} telegrams/s, "
          f"{cpu / n * 1000 * 1000:.1f} ms CPU per 1000 telegrams")
    junk = bytes(range(48, 48 + 40))
    stream = (junk + raw) * 2000
    framer = TelegramFramer()
    t0 = time.process_time()
    frames = 0
    for i in range(0, len(stream), 512):            # 512-byte reads, as from a serial driver
        frames += len(framer.feed(stream[i:i + 512]))
    cpu = time.process_time() - t0
    print(f"framer with 40 B garbage between telegrams: {len(stream) / cpu / 1e6:.1f} MB/s, "
          f"{frames} telegrams found of 2000, buffer left {framer.buffered} B")
    print("one DSMR 5 port = 1 telegram/s at 115200 baud (max ~11.5 kB/s on the wire)")


if __name__ == "__main__":
    main()
