-- The payments service's SQLite schema: the embedded single-process profile's twin of
-- schema.sql, applied at start (payments/storage/sqlite.py, via migrate.py).
--
-- Same layout rules as schema.sql: `-- migrate:step N <title>` starts step N; statements
-- end with `;` at the end of a line; whole-line `--` comments only; steps are never
-- edited once released. Step N here makes what step N of schema.sql makes (same
-- tables, columns in the same order, same index names), so schema_version means the
-- same on both engines; tests/test_sqlite.py compares the two. SQLite runs DDL inside
-- the migration's transaction, so a step is applied whole or not at all.
--
-- Type mapping: ids are INTEGER PRIMARY KEY AUTOINCREMENT (ids are never reused after
-- a delete, as with AUTO_INCREMENT); VARCHAR/CHAR/MEDIUMTEXT are TEXT (BINARY collation:
-- 'Order-1' and 'order-1' differ, as with utf8mb4_bin); enums and money are INTEGER
-- (64-bit); times are DATETIME_TEXT: UTC as 'YYYY-MM-DD HH:MM:SS.ffffff', fixed width,
-- so text order is time order, read back as datetime by the connection's converter.
-- Column sizes are not enforced here: payments/validation.py refuses longer values and
-- the repositories cut free-text columns before they get here.
-- Every index of schema.sql is a named CREATE INDEX here, so a UNIQUE violation is
-- reported under the same key name (DuplicateKey.key) on both engines.

-- migrate:step 1 payments, payment_events, schema_version

CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER       NOT NULL PRIMARY KEY,
    applied_at DATETIME_TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS payments (
    id                       INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id               TEXT          NOT NULL,
    caller_service           TEXT          NOT NULL,
    resource_type            TEXT          NOT NULL,
    resource_id              TEXT          NOT NULL,
    customer_ref             TEXT          NOT NULL DEFAULT '',
    amount_cents             INTEGER       NOT NULL,
    currency                 TEXT          NOT NULL,
    status                   INTEGER       NOT NULL,
    payment_method           INTEGER       NOT NULL,
    payment_type             INTEGER       NOT NULL,
    provider                 INTEGER       NOT NULL,
    recurring_interval       TEXT          NOT NULL DEFAULT '',
    recurring_interval_count INTEGER       NOT NULL DEFAULT 0,
    status_callback_url      TEXT          NOT NULL,
    success_url              TEXT          NOT NULL DEFAULT '',
    cancel_url               TEXT          NOT NULL DEFAULT '',
    provider_callback_hash   TEXT          NOT NULL,
    provider_callback_url    TEXT          NOT NULL,
    request_fingerprint      TEXT          NOT NULL,
    provider_payment_id      TEXT          NOT NULL DEFAULT '',
    provider_subscription_id TEXT          NOT NULL DEFAULT '',
    checkout_url             TEXT          NOT NULL DEFAULT '',
    refunded_cents           INTEGER       NOT NULL DEFAULT 0,
    metadata                 TEXT          NOT NULL CHECK (json_valid(metadata)),
    created_at               DATETIME_TEXT NOT NULL,
    updated_at               DATETIME_TEXT NOT NULL
);

CREATE UNIQUE INDEX IF NOT EXISTS uq_payments_caller_request ON payments (caller_service, request_id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_payments_callback_hash ON payments (provider_callback_hash);
CREATE INDEX IF NOT EXISTS ix_payments_caller_id ON payments (caller_service, id);
CREATE INDEX IF NOT EXISTS ix_payments_caller_status ON payments (caller_service, status, id);
CREATE INDEX IF NOT EXISTS ix_payments_request_id ON payments (request_id);
CREATE INDEX IF NOT EXISTS ix_payments_resource ON payments (resource_type, resource_id);
CREATE INDEX IF NOT EXISTS ix_payments_provider_payment_id ON payments (provider_payment_id);
CREATE INDEX IF NOT EXISTS ix_payments_provider_subscription_id ON payments (provider_subscription_id);
CREATE INDEX IF NOT EXISTS ix_payments_status_updated ON payments (status, updated_at);
CREATE INDEX IF NOT EXISTS ix_payments_status_created ON payments (status, created_at);

CREATE TABLE IF NOT EXISTS payment_events (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id          INTEGER       NOT NULL,
    kind                TEXT          NOT NULL,
    from_status         INTEGER       NOT NULL,
    to_status           INTEGER       NOT NULL,
    reason              TEXT          NOT NULL,
    -- NULL when the row is not from a provider event (a UNIQUE index allows many NULLs)
    provider_event_id   TEXT          NULL DEFAULT NULL,
    provider_event_type TEXT          NOT NULL DEFAULT '',
    created_at          DATETIME_TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS ix_payment_events_payment ON payment_events (payment_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_payment_events_provider_event ON payment_events (provider_event_id);

-- migrate:step 2 callback_outbox, callback_attempts, provider_callbacks

CREATE TABLE IF NOT EXISTS callback_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id      INTEGER       NOT NULL,
    status          INTEGER       NOT NULL,
    delivery_id     TEXT          NOT NULL,
    url             TEXT          NOT NULL,
    request_id      TEXT          NOT NULL,
    payload         TEXT          NOT NULL,
    state           TEXT          NOT NULL,
    attempts        INTEGER       NOT NULL DEFAULT 0,
    next_attempt_at DATETIME_TEXT NOT NULL,
    claimed_by      TEXT          NOT NULL DEFAULT '',
    claimed_until   DATETIME_TEXT NULL DEFAULT NULL,
    last_error      TEXT          NOT NULL DEFAULT '',
    created_at      DATETIME_TEXT NOT NULL,
    updated_at      DATETIME_TEXT NOT NULL,
    delivered_at    DATETIME_TEXT NULL DEFAULT NULL
);

CREATE UNIQUE INDEX IF NOT EXISTS uq_callback_outbox_delivery ON callback_outbox (delivery_id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_callback_outbox_payment_status ON callback_outbox (payment_id, status);
CREATE INDEX IF NOT EXISTS ix_callback_outbox_due ON callback_outbox (state, next_attempt_at);

CREATE TABLE IF NOT EXISTS callback_attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id    INTEGER       NOT NULL,
    attempt      INTEGER       NOT NULL,
    attempted_at DATETIME_TEXT NOT NULL,
    status_code  INTEGER       NULL DEFAULT NULL,
    error        TEXT          NOT NULL DEFAULT '',
    latency_ms   INTEGER       NOT NULL
);

CREATE INDEX IF NOT EXISTS ix_callback_attempts_outbox ON callback_attempts (outbox_id, id);

CREATE TABLE IF NOT EXISTS provider_callbacks (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    provider      TEXT          NOT NULL,
    callback_hash TEXT          NOT NULL,
    event_id      TEXT          NULL DEFAULT NULL,
    event_type    TEXT          NOT NULL DEFAULT '',
    payment_id    INTEGER       NULL DEFAULT NULL,
    outcome       TEXT          NOT NULL,
    reason        TEXT          NOT NULL DEFAULT '',
    request_id    TEXT          NOT NULL DEFAULT '',
    payload       TEXT          NOT NULL,
    received_at   DATETIME_TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS ix_provider_callbacks_event ON provider_callbacks (event_id);
CREATE INDEX IF NOT EXISTS ix_provider_callbacks_payment ON provider_callbacks (payment_id, id);
CREATE INDEX IF NOT EXISTS ix_provider_callbacks_received ON provider_callbacks (received_at);

-- migrate:step 3 refunds, refund_events

CREATE TABLE IF NOT EXISTS refunds (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id          INTEGER       NOT NULL,
    request_id          TEXT          NOT NULL,
    caller_service      TEXT          NOT NULL,
    amount_cents        INTEGER       NOT NULL,
    currency            TEXT          NOT NULL,
    status              INTEGER       NOT NULL,
    request_fingerprint TEXT          NOT NULL DEFAULT '',
    created_at          DATETIME_TEXT NOT NULL,
    updated_at          DATETIME_TEXT NOT NULL,
    reason              TEXT          NOT NULL DEFAULT '',
    failure_reason      TEXT          NOT NULL DEFAULT '',
    -- NULL until Stripe has the refund (a UNIQUE index allows many NULLs)
    provider_refund_id  TEXT          NULL DEFAULT NULL,
    metadata            TEXT          NOT NULL
);

CREATE UNIQUE INDEX IF NOT EXISTS uq_refunds_caller_request ON refunds (caller_service, request_id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_refunds_provider_refund_id ON refunds (provider_refund_id);
CREATE INDEX IF NOT EXISTS ix_refunds_payment ON refunds (payment_id, id);
CREATE INDEX IF NOT EXISTS ix_refunds_status_updated ON refunds (status, updated_at);

CREATE TABLE IF NOT EXISTS refund_events (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    refund_id           INTEGER       NOT NULL,
    payment_id          INTEGER       NOT NULL,
    kind                TEXT          NOT NULL,
    from_status         INTEGER       NOT NULL,
    to_status           INTEGER       NOT NULL,
    reason              TEXT          NOT NULL,
    provider_event_id   TEXT          NULL DEFAULT NULL,
    provider_event_type TEXT          NOT NULL DEFAULT '',
    created_at          DATETIME_TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS ix_refund_events_refund ON refund_events (refund_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS uq_refund_events_provider_event ON refund_events (provider_event_id, refund_id);

-- migrate:step 4 callback_outbox.traceparent

ALTER TABLE callback_outbox ADD COLUMN traceparent TEXT NOT NULL DEFAULT '';

-- migrate:step 5 payments.claimed_by, payments.claimed_until

ALTER TABLE payments ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
ALTER TABLE payments ADD COLUMN claimed_until DATETIME_TEXT NULL DEFAULT NULL;

-- migrate:step 6 callback deliveries: kind, refund, resends, gone, retention

ALTER TABLE callback_outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'payment';
ALTER TABLE callback_outbox ADD COLUMN refund_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE callback_outbox ADD COLUMN resend INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX IF NOT EXISTS uq_callback_outbox_announcement ON callback_outbox (payment_id, kind, refund_id, status, resend);
DROP INDEX IF EXISTS uq_callback_outbox_payment_status;
CREATE INDEX IF NOT EXISTS ix_callback_outbox_state_created ON callback_outbox (state, created_at);
CREATE INDEX IF NOT EXISTS ix_callback_outbox_state_updated ON callback_outbox (state, updated_at);

-- migrate:step 7 payments' Stripe PaymentIntent and Charge ids

ALTER TABLE payments ADD COLUMN provider_payment_intent_id TEXT NOT NULL DEFAULT '';
ALTER TABLE payments ADD COLUMN provider_charge_id TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS ix_payments_payment_intent ON payments (provider_payment_intent_id);
CREATE INDEX IF NOT EXISTS ix_payments_charge ON payments (provider_charge_id);
