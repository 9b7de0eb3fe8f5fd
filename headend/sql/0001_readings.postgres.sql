-- Readings as pushed by gateways, exactly once per (gateway_id, seq), and the per-gateway ack.
CREATE TABLE IF NOT EXISTS gateway_record (
    gateway_id     TEXT    NOT NULL,
    seq            BIGINT  NOT NULL,
    prev_hash      BYTEA   NOT NULL,
    meter_id       TEXT    NOT NULL,
    obis           TEXT    NOT NULL,
    taken_at_ms    BIGINT  NOT NULL,
    value          BIGINT  NOT NULL,
    unit           TEXT    NOT NULL,
    quality        INTEGER NOT NULL,
    received_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (gateway_id, seq)
);
CREATE INDEX IF NOT EXISTS gateway_record_meter ON gateway_record (meter_id, obis, taken_at_ms);
-- One row per gateway; ingest takes this row FOR UPDATE, so the ack of a gateway advances in one replica at a time.
CREATE TABLE IF NOT EXISTS gateway_sync (
    gateway_id TEXT   PRIMARY KEY,
    acked_seq  BIGINT NOT NULL
);
