-- Readings as pushed by gateways, exactly once per (gateway_id, seq), and the per-gateway ack.
-- IF NOT EXISTS: a database created by the walking skeleton (same tables, no schema_version) is adopted as is.
CREATE TABLE IF NOT EXISTS gateway_record (
    gateway_id     TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    prev_hash      BLOB    NOT NULL,
    meter_id       TEXT    NOT NULL,
    obis           TEXT    NOT NULL,
    taken_at_ms    INTEGER NOT NULL,
    value          INTEGER NOT NULL,
    unit           TEXT    NOT NULL,
    quality        INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gateway_record_meter ON gateway_record (meter_id, obis, taken_at_ms);
CREATE TABLE IF NOT EXISTS gateway_sync (
    gateway_id TEXT PRIMARY KEY,
    acked_seq  INTEGER NOT NULL
);
