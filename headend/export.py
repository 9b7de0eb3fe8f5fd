"""Export of billable items and invoices to files for the billing/CRM system, resumable by a cursor; never rewrites an issued document or advances the cursor before the file is durable.

Each consumer (default: the format name) has a cursor in ``export_cursor``: the last
``billable_item.item_seq`` and ``invoice.invoice_seq`` it received. A run reads what lies after the
cursor in batches; each batch is written to a temporary file, fsynced, renamed to its final name,
the directory fsynced, and only then the cursor advanced. File names are derived from the sequence
numbers they hold (``items-00000001-00000500.csv``, ``INV-2026-11-A1.xml``), so a run interrupted
between the rename and the cursor update rewrites the very same file on resume: the consumer never
sees a row twice and never misses one.

Formats:
  * ``csv``    items-FIRST-LAST.csv (one row per billable item) and invoices-FIRST-LAST.csv
  * ``jsonl``  items-FIRST-LAST.jsonl and invoices-FIRST-LAST.jsonl (one JSON document per line)
  * ``ubl``    one UBL 2.1 XML file per invoice, named after the invoice id
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from meterlink.errors import ValidationError

FORMATS = ("csv", "jsonl", "ubl")
ITEM_FIELDS = ["item_seq", "account_id", "period", "market", "currency", "payment", "tariff_id", "start", "end",
               "net_minor", "vat_minor", "gross_minor", "lines", "usage_wh"]
INVOICE_FIELDS = ["invoice_seq", "invoice_id", "buyer_reference", "period", "issue_date", "due_date", "currency",
                  "net_minor", "vat_minor", "gross_minor"]


@dataclass(frozen=True)
class ExportResult:
    consumer: str
    items: int
    invoices: int
    files: tuple[str, ...]
    item_position: int
    invoice_position: int


def _durable_write(directory: Path, name: str, data: bytes) -> None:
    tmp = directory / f".{name}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / name)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _items_csv(batch: list[tuple[int, dict]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ITEM_FIELDS, lineterminator="\n")
    w.writeheader()
    for seq, d in batch:
        w.writerow({"item_seq": seq, **{k: d[k] for k in ITEM_FIELDS[1:12]}, "lines": len(d["lines"]),
                    "usage_wh": sum(u["wh"] for u in d["usage"])})
    return buf.getvalue().encode()


def _invoices_csv(batch: list[tuple[int, str, dict, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, INVOICE_FIELDS, lineterminator="\n")
    w.writeheader()
    for seq, inv_id, d, _ in batch:
        t = d["totals"]
        w.writerow({"invoice_seq": seq, "invoice_id": inv_id, "buyer_reference": d["buyer_reference"],
                    "period": d["period"], "issue_date": d["issue_date"], "due_date": d["due_date"],
                    "currency": d["currency"], "net_minor": t["net_minor"], "vat_minor": t["vat_minor"],
                    "gross_minor": t["gross_minor"]})
    return buf.getvalue().encode()


def _jsonl(docs) -> bytes:
    return "".join(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n" for d in docs).encode()


def export(store, to: str | Path, fmt: str, *, now: Callable[[], datetime], consumer: str | None = None,
           batch_size: int = 500, progress: Callable[[int, int], None] | None = None,
           after_batch: Callable[[int], None] | None = None) -> ExportResult:
    """Write everything after the consumer's cursor into `to`; returns what was written.

    `progress(done, total)` is called after each batch; `after_batch(n)` after the n-th batch's
    cursor update (tests use it to interrupt a run).
    """
    if fmt not in FORMATS:
        raise ValidationError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if batch_size < 1:
        raise ValidationError(f"batch size must be >= 1, got {batch_size}")
    consumer = consumer or fmt
    directory = Path(to)
    directory.mkdir(parents=True, exist_ok=True)
    item_pos, inv_pos = store.cursor(consumer)
    max_item, max_inv = store.max_positions()
    total = (len(store.items(after=item_pos)) if fmt != "ubl" else 0) + len(store.invoices(after=inv_pos))
    done = batches = n_items = n_invoices = 0
    files: list[str] = []

    def advance() -> None:
        nonlocal batches
        store.set_cursor(consumer, item_pos, inv_pos, now())
        batches += 1
        if progress:
            progress(done, total)
        if after_batch:
            after_batch(batches)

    if fmt != "ubl":
        while item_pos < max_item:
            batch = store.items(after=item_pos, limit=batch_size)
            if not batch:
                break
            first, last = batch[0][0], batch[-1][0]
            name = f"items-{first:08d}-{last:08d}.{fmt}"
            data = _items_csv(batch) if fmt == "csv" else _jsonl({"item_seq": s, **d} for s, d in batch)
            _durable_write(directory, name, data)
            files.append(name)
            item_pos, done, n_items = last, done + len(batch), n_items + len(batch)
            advance()
    while inv_pos < max_inv:
        batch = store.invoices(after=inv_pos, limit=batch_size)
        if not batch:
            break
        if fmt == "ubl":
            for seq, inv_id, _, xml in batch:
                name = f"{inv_id}.xml"
                _durable_write(directory, name, xml.encode())
                files.append(name)
        else:
            first, last = batch[0][0], batch[-1][0]
            name = f"invoices-{first:08d}-{last:08d}.{fmt}"
            data = _invoices_csv(batch) if fmt == "csv" else _jsonl({"invoice_seq": s, **d} for s, _, d, _ in batch)
            _durable_write(directory, name, data)
            files.append(name)
        inv_pos, done, n_invoices = batch[-1][0], done + len(batch), n_invoices + len(batch)
        advance()
    return ExportResult(consumer, n_items, n_invoices, tuple(files), item_pos, inv_pos)


def rich_progress(description: str):
    """A rich progress bar (on stderr) as an `export` progress callback; returns (callback, stop)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    task = bar.add_task(description, total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop
