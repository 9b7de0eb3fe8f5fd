"""Insight results, promotion offers and acceptances in the head-end SQLite database (own `insight_*`/`promotion_*` tables); SQL only.

Tables are created with CREATE TABLE IF NOT EXISTS next to the readings of the same file.
Offers carry an increasing `offer_seq`, the export cursor: `offers_after(cursor)` is what a CRM
export or an MQTT publish has not yet seen. PostgreSQL is not implemented for these tables yet
(opening a postgresql:// URL raises ConfigError saying so).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from datetime import date
from decimal import Decimal

from meterlink.errors import ConfigError, ValidationError

from .promotions import Offer
from .store import is_postgres_url, sqlite_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS insight_feature (
    period        TEXT NOT NULL,
    account_id    TEXT NOT NULL,
    features_json TEXT NOT NULL,
    segments_json TEXT NOT NULL,
    computed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (period, account_id)
);
CREATE TABLE IF NOT EXISTS promotion_offer (
    offer_seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    promotion_id  TEXT NOT NULL,
    account_id    TEXT NOT NULL,
    period        TEXT NOT NULL,
    offer_json    TEXT NOT NULL,
    offered_at_ms INTEGER NOT NULL,
    UNIQUE (promotion_id, account_id)
);
CREATE TABLE IF NOT EXISTS promotion_acceptance (
    promotion_id   TEXT NOT NULL,
    account_id     TEXT NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    effective_from TEXT NOT NULL,
    PRIMARY KEY (promotion_id, account_id)
);
CREATE TABLE IF NOT EXISTS promotion_export_cursor (
    consumer   TEXT PRIMARY KEY,
    offer_seq  INTEGER NOT NULL
);
"""


def _path(url: str) -> str:
    if is_postgres_url(url):
        raise ConfigError("insights/promotions store: only SQLite is implemented so far (got a PostgreSQL URL)")
    return sqlite_path(url)


def _json_default(v):
    if isinstance(v, (Decimal, date)):
        return str(v)
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    raise TypeError(type(v).__name__)


class InsightsStore:
    def __init__(self, url: str) -> None:
        self.db = sqlite3.connect(_path(url), isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ features and segments
    def save_features(self, period: str, rows: dict[str, tuple[dict, tuple[str, ...]]], now_ms: int) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO insight_feature VALUES (?,?,?,?,?) ON CONFLICT(period, account_id) DO UPDATE SET "
                "features_json=excluded.features_json, segments_json=excluded.segments_json, "
                "computed_at_ms=excluded.computed_at_ms",
                [(period, acc, json.dumps(f, sort_keys=True, default=_json_default), json.dumps(list(s)), now_ms)
                 for acc, (f, s) in sorted(rows.items())])

    def features(self, period: str) -> dict[str, tuple[dict, list[str]]]:
        return {acc: (json.loads(f), json.loads(s)) for acc, f, s in self.db.execute(
            "SELECT account_id, features_json, segments_json FROM insight_feature WHERE period=? ORDER BY account_id",
            (period,))}

    # ------------------------------------------------------------------ offers
    def save_offers(self, period: str, offers: list[Offer], now_ms: int) -> int:
        """Store new offers (an account is offered a promotion once); returns how many were new."""
        n = 0
        with self.db:
            self.db.execute("BEGIN")
            for o in offers:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO promotion_offer (promotion_id, account_id, period, offer_json, offered_at_ms) "
                    "VALUES (?,?,?,?,?)",
                    (o.promotion_id, o.account_id, period, json.dumps(asdict(o), sort_keys=True, default=_json_default),
                     now_ms))
                n += cur.rowcount
        return n

    def offers(self) -> list[dict]:
        return [dict(json.loads(j), offer_seq=seq) for seq, j in
                self.db.execute("SELECT offer_seq, offer_json FROM promotion_offer ORDER BY offer_seq")]

    def offers_after(self, consumer: str) -> tuple[list[dict], int]:
        row = self.db.execute("SELECT offer_seq FROM promotion_export_cursor WHERE consumer=?", (consumer,)).fetchone()
        cursor = row[0] if row else 0
        out = [dict(json.loads(j), offer_seq=seq) for seq, j in self.db.execute(
            "SELECT offer_seq, offer_json FROM promotion_offer WHERE offer_seq > ? ORDER BY offer_seq", (cursor,))]
        return out, cursor

    def advance_cursor(self, consumer: str, offer_seq: int) -> None:
        self.db.execute("INSERT INTO promotion_export_cursor VALUES (?, ?) ON CONFLICT(consumer) DO UPDATE SET "
                        "offer_seq = MAX(offer_seq, excluded.offer_seq)", (consumer, offer_seq))

    # ------------------------------------------------------------------ acceptances
    def accept(self, promotion_id: str, account_id: str, effective_from: date, now_ms: int) -> None:
        offered = self.db.execute("SELECT 1 FROM promotion_offer WHERE promotion_id=? AND account_id=?",
                                  (promotion_id, account_id)).fetchone()
        if not offered:
            raise ValidationError(f"account {account_id} was never offered promotion {promotion_id!r}")
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute("INSERT OR IGNORE INTO promotion_acceptance VALUES (?,?,?,?)",
                                  (promotion_id, account_id, now_ms, effective_from.isoformat()))
            if cur.rowcount == 0:
                raise ValidationError(f"account {account_id} already accepted promotion {promotion_id!r}")

    def acceptances(self) -> list[tuple[str, str, date]]:
        return [(p, a, date.fromisoformat(d)) for p, a, d in self.db.execute(
            "SELECT promotion_id, account_id, effective_from FROM promotion_acceptance ORDER BY account_id, promotion_id")]
