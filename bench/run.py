"""Run every benchmark in bench/ (bench_*.py) one after another and print their figures.

Usage: .venv/bin/python bench/run.py [NAME ...]   (or `make bench`); e.g. `bench/run.py bus ingest`.
Each benchmark prints throughput or ratios and the exact command that reproduces it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(s.stem == f"bench_{a}" or s.stem == a for a in argv)]
    if not scripts:
        print("no benchmarks matched", file=sys.stderr)
        return 1
    failed = 0
    for script in scripts:
        print(f"=== {script.name}   ({sys.executable} {script.relative_to(HERE.parent)})", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, str(script)]).returncode
        print(f"--- {script.name}: exit {rc}, {time.monotonic() - t0:.1f} s wall\n", flush=True)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
