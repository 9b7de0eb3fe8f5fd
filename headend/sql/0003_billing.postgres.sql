-- Storage for what the pure cores produce: VEE intervals and exceptions, day/band rating aggregates,
-- billable items, invoices and resumable export cursors.
-- Money is integer minor units (BIGINT); exact unrounded amounts are NUMERIC (TEXT in SQLite: sum them
-- as Decimal in Python, never with SQL SUM over TEXT, which would go through floats).

-- One row per meter, register and interval; account_id NULL = parked (no binding at that instant).
CREATE TABLE interval_usage (
    meter_id   TEXT    NOT NULL,
    obis       TEXT    NOT NULL,
    start_ms   BIGINT  NOT NULL,
    end_ms     BIGINT  NOT NULL CHECK (end_ms > start_ms),
    wh         BIGINT  NOT NULL,
    estimated  BOOLEAN NOT NULL DEFAULT FALSE,
    flags      TEXT    NOT NULL DEFAULT '',              -- comma-separated vee flags
    account_id TEXT,
    revision   INTEGER NOT NULL DEFAULT 0,               -- bumped when a re-derivation changes wh/flags
    billed_wh      BIGINT NOT NULL DEFAULT 0,            -- Wh of this interval already on issued billable items
    billed_account TEXT,                                 -- the account those Wh were billed to
    PRIMARY KEY (meter_id, obis, start_ms)
);
CREATE INDEX interval_usage_account ON interval_usage (account_id, start_ms);

-- The operator's exception queue (vee.VeeException), resolvable from the CLI.
CREATE TABLE vee_exception (
    exception_id   BIGSERIAL PRIMARY KEY,
    meter_id       TEXT   NOT NULL,
    obis           TEXT   NOT NULL,
    kind           TEXT   NOT NULL,
    at_ms          BIGINT NOT NULL,
    detail         TEXT   NOT NULL DEFAULT '',
    status         TEXT   NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    raised_at_ms   BIGINT NOT NULL,
    resolved_at_ms BIGINT,
    resolution     TEXT   NOT NULL DEFAULT '',
    UNIQUE (meter_id, obis, kind, at_ms)
);
CREATE INDEX vee_exception_status ON vee_exception (status, at_ms);

-- rating.DayBandAggregate, merged by addition (incremental rating).
CREATE TABLE day_band_aggregate (
    account_id TEXT    NOT NULL,
    local_date DATE    NOT NULL,
    band       TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    wh         BIGINT  NOT NULL DEFAULT 0,
    amount_dec NUMERIC NOT NULL DEFAULT 0,               -- exact minor units, unrounded
    unit_price NUMERIC NOT NULL DEFAULT 0,
    days       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, local_date, band, kind)
);

-- One billable item per account per period; documents (JSON, UBL XML) are kept as issued.
CREATE TABLE billable_item (
    item_seq      BIGSERIAL PRIMARY KEY,                 -- export cursor position
    account_id    TEXT   NOT NULL,
    period        TEXT   NOT NULL,                       -- e.g. 2026-11
    currency      TEXT   NOT NULL,
    net_minor     BIGINT NOT NULL,
    vat_minor     BIGINT NOT NULL,
    gross_minor   BIGINT NOT NULL,
    document      TEXT   NOT NULL,                       -- JSON
    created_at_ms BIGINT NOT NULL,
    UNIQUE (account_id, period)
);
CREATE TABLE invoice (
    invoice_seq   BIGSERIAL PRIMARY KEY,                 -- export cursor position
    invoice_id    TEXT   NOT NULL UNIQUE,
    account_id    TEXT   NOT NULL,
    period        TEXT   NOT NULL,
    issue_date    DATE   NOT NULL,
    currency      TEXT   NOT NULL,
    net_minor     BIGINT NOT NULL,
    vat_minor     BIGINT NOT NULL,
    gross_minor   BIGINT NOT NULL,
    json          TEXT   NOT NULL,
    ubl           TEXT   NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX invoice_account ON invoice (account_id, period);

-- Wh per meter, register and usage period that each billable item billed (revenue assurance reads this,
-- independently of interval_usage.billed_wh).
CREATE TABLE billed_usage (
    item_seq     BIGINT NOT NULL REFERENCES billable_item,
    meter_id     TEXT   NOT NULL,
    obis         TEXT   NOT NULL,
    usage_period TEXT   NOT NULL,                        -- local month of the intervals, e.g. 2026-10
    wh           BIGINT NOT NULL,
    PRIMARY KEY (item_seq, meter_id, obis, usage_period)
);
CREATE INDEX billed_usage_meter ON billed_usage (meter_id, usage_period);

-- Where each export consumer got to; advanced only after the file holding those rows is durable.
CREATE TABLE export_cursor (
    consumer      TEXT   PRIMARY KEY,                    -- e.g. crm:jsonl
    item_position    BIGINT NOT NULL DEFAULT 0,          -- last billable_item.item_seq written
    invoice_position BIGINT NOT NULL DEFAULT 0,          -- last invoice.invoice_seq written
    updated_at_ms BIGINT NOT NULL
);
