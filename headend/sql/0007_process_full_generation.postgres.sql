-- A meter's "derive whole at the next `process`" flag (process_full, 0004) as two numbers instead of a row
-- that the run deleted: every flagging (BillingStore.needs_full: an exception resolved, an exchange read
-- recorded, meter data changed) raises `generation`; a `process` run reads the generations before the
-- resolved exceptions and, in the write transaction of the chunk that derived the meter whole, sets
-- `derived_generation` to the generation it read, only where that is still the stored one. A flag raised
-- after the run read it (an exception resolved while the run computed) survives the run, and the next run
-- derives the meter whole again with that resolution (billing_store.process_readings). The meter is flagged
-- while generation > derived_generation; rows already here (flagged before this migration) stay flagged.
ALTER TABLE process_full ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
ALTER TABLE process_full ADD COLUMN derived_generation BIGINT NOT NULL DEFAULT 0;
