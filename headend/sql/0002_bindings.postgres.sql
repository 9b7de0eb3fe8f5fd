-- Markets, customers, accounts, service points, meters, and the two effective-dated relations that
-- bind a meter's usage to an account: meter_installation (meter <-> service point; exchange = close one,
-- open another) and supply (service point <-> account; move-in / move-out). Intervals are [from, to),
-- UTC milliseconds, to NULL = open. The repository refuses overlaps (per meter, per service point).
CREATE TABLE market (
    market_id        TEXT PRIMARY KEY,
    country          TEXT NOT NULL,                      -- ISO 3166-1 alpha-2
    currency         TEXT NOT NULL,                      -- ISO 4217
    time_zone        TEXT NOT NULL,                      -- IANA, e.g. Europe/London
    rounding_mode    TEXT NOT NULL DEFAULT 'half_up',    -- a meterlink.money rounding mode
    rounding_stage   TEXT NOT NULL DEFAULT 'line' CHECK (rounding_stage IN ('line', 'invoice')),
    interval_minutes INTEGER NOT NULL DEFAULT 15 CHECK (interval_minutes > 0)
);
CREATE TABLE market_vat_rate (
    market_id  TEXT    NOT NULL REFERENCES market,
    category   TEXT    NOT NULL,                         -- e.g. domestic_energy, standing_charge
    valid_from DATE    NOT NULL,
    valid_to   DATE,                                     -- exclusive; NULL = until further notice
    rate       NUMERIC NOT NULL CHECK (rate >= 0),       -- 0.05 for 5 %
    source     TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (market_id, category, valid_from)
);
CREATE TABLE customer (
    customer_id TEXT PRIMARY KEY,
    market_id   TEXT NOT NULL REFERENCES market,
    name        TEXT NOT NULL DEFAULT '',
    email       TEXT NOT NULL DEFAULT ''
);
CREATE TABLE account (
    account_id  TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customer,
    payment     TEXT NOT NULL CHECK (payment IN ('prepaid', 'postpaid')),
    tariff_id   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX account_customer ON account (customer_id);
CREATE TABLE service_point (
    service_point_id TEXT PRIMARY KEY,
    market_id        TEXT NOT NULL REFERENCES market,
    address          TEXT NOT NULL DEFAULT '',
    external_id      TEXT NOT NULL DEFAULT ''            -- MPAN / EAN / POD / CUPS
);
CREATE TABLE meter (
    meter_id     TEXT PRIMARY KEY,
    serial       TEXT NOT NULL DEFAULT '',
    gateway_id   TEXT NOT NULL DEFAULT '',
    profile      TEXT NOT NULL DEFAULT '',
    register_max BIGINT,
    max_power_w  BIGINT
);
CREATE TABLE meter_installation (
    installation_id  BIGSERIAL PRIMARY KEY,
    meter_id         TEXT   NOT NULL REFERENCES meter,
    service_point_id TEXT   NOT NULL REFERENCES service_point,
    valid_from_ms    BIGINT NOT NULL,
    valid_to_ms      BIGINT CHECK (valid_to_ms IS NULL OR valid_to_ms > valid_from_ms),
    reason           TEXT   NOT NULL DEFAULT 'install'
);
CREATE INDEX meter_installation_meter ON meter_installation (meter_id, valid_from_ms);
CREATE INDEX meter_installation_sp ON meter_installation (service_point_id, valid_from_ms);
CREATE TABLE supply (
    supply_id        BIGSERIAL PRIMARY KEY,
    service_point_id TEXT   NOT NULL REFERENCES service_point,
    account_id       TEXT   NOT NULL REFERENCES account,
    valid_from_ms    BIGINT NOT NULL,
    valid_to_ms      BIGINT CHECK (valid_to_ms IS NULL OR valid_to_ms > valid_from_ms),
    reason           TEXT   NOT NULL DEFAULT 'move_in'
);
CREATE INDEX supply_sp ON supply (service_point_id, valid_from_ms);
CREATE INDEX supply_account ON supply (account_id, valid_from_ms);
-- Final read of the old meter and initial read of the new one at an exchange (VEE's MeterExchange).
CREATE TABLE meter_exchange_read (
    meter_id     TEXT   NOT NULL,
    obis         TEXT   NOT NULL,
    at_ms        BIGINT NOT NULL,
    final_read   BIGINT NOT NULL,
    initial_read BIGINT NOT NULL,
    old_serial   TEXT   NOT NULL DEFAULT '',
    new_serial   TEXT   NOT NULL DEFAULT '',
    PRIMARY KEY (meter_id, obis, at_ms)
);
