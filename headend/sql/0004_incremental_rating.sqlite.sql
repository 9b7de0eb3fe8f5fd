-- Incremental rating: `process` rates each new or changed interval into day_band_aggregate (0003) as it
-- arrives; those rows hold the PENDING (not yet billed) rated usage of each account, and a bill run is a
-- summation of them. This migration adds what that needs beside them.

-- Pending Wh per account, meter, register and local month (the billable item's usage totals), kept with
-- day_band_aggregate in the same transactions.
CREATE TABLE pending_usage (
    account_id   TEXT   NOT NULL,
    meter_id     TEXT   NOT NULL,
    obis         TEXT   NOT NULL,
    usage_period TEXT   NOT NULL,                        -- local month, e.g. 2026-10
    wh           BIGINT NOT NULL,
    PRIMARY KEY (account_id, meter_id, obis, usage_period)
);

-- Which tariff an account's pending aggregates were rated with; stale = 1 when interval rows changed
-- without rating (binding edits, processing without tariffs): the next process or bill run re-rates
-- that account's pending usage from its rows.
CREATE TABLE rating_state (
    account_id TEXT    PRIMARY KEY,
    tariff_id  TEXT    NOT NULL DEFAULT '',
    digest     TEXT    NOT NULL DEFAULT '',
    stale      INTEGER NOT NULL DEFAULT 0
);

-- Where `process` got to in each gateway's records: every seq <= max_seq was processed except the
-- ranges in `gaps` (JSON [[from, to], ...]) that were missing then and are looked at again.
CREATE TABLE process_cursor (
    gateway_id TEXT   PRIMARY KEY,
    max_seq    BIGINT NOT NULL,
    gaps       TEXT   NOT NULL DEFAULT '[]'
);

-- Meters whose whole history must be derived again on the next `process` (exchange read recorded,
-- exception released, meter data changed).
CREATE TABLE process_full (
    meter_id TEXT PRIMARY KEY
);
