-- The bindings' generation: one row whose number every binding edit (BillingStore.import_bindings,
-- apply_bindings, add_exchange_read) raises in its own transaction. `process` reads it before it reads the
-- bindings and again in each chunk's write transaction: a different number there means the chunk was bound
-- (and derived) with bindings an edit has replaced meanwhile, so the run reads them again and redoes the
-- chunk (billing_store.process_readings) instead of writing rows the edit's re-binding never saw.
CREATE TABLE bindings_generation (
    one        INTEGER PRIMARY KEY CHECK (one = 1),
    generation BIGINT  NOT NULL
);
INSERT INTO bindings_generation (one, generation) VALUES (1, 0);
