-- Standing charges already charged: per account, the merged local date ranges [from_date, to_date) whose
-- standing charges issued billable items carried (a back-dated supply gets its missing days charged by the
-- next bill, a back-dated move-out gets charged days credited; see billing_store.run_billing).
-- IF NOT EXISTS: earlier builds created this table when a billing store first opened the database; such a
-- table (already filled) is adopted as is.
CREATE TABLE IF NOT EXISTS standing_charged (
    account_id TEXT NOT NULL,
    from_date  DATE NOT NULL,
    to_date    DATE NOT NULL,
    PRIMARY KEY (account_id, from_date)
);

-- Accounts billed before standing charges were recorded, and their last billed period: the billing store
-- (BillingStore on open, once, in one transaction with an exclusive lock) counts each one's supply days up
-- to the end of that period as charged (what the old bill runs charged, as far as the bindings tell) and
-- deletes the account's row here. The days need the market's time zone, so this step is not plain SQL.
-- Only when this migration creates standing_charged: an adopted table holds its back-fill already.
CREATE TABLE standing_backfill (
    account_id     TEXT PRIMARY KEY,
    through_period TEXT NOT NULL                       -- e.g. 2026-10
);
INSERT INTO standing_backfill (account_id, through_period)
    SELECT account_id, MAX(period) FROM billable_item
    WHERE NOT EXISTS (SELECT 1 FROM standing_charged)
    GROUP BY account_id;
