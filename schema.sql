-- The payments service's MySQL/MariaDB schema, applied by `payments migrate`
-- (payments/storage/migrate.py). It names no database: it runs in the one MYSQL_DSN names.
--
-- Layout, for the migration runner:
--   * The file is a list of steps. A line `-- migrate:step N <title>` starts step N;
--     steps are numbered 1, 2, 3... in order and are never edited once released:
--     a schema change is a new step at the end (e.g. step 2 adds callback_outbox and
--     provider_callbacks, a later one ALTERs a table).
--   * A step's statements each end with `;` at the end of a line and are sent one by
--     one. Whole lines that start with `--` are comments, dropped before splitting
--     (write no trailing comments after SQL on the same line).
--   * DDL commits implicitly, so a step can stop halfway (crash, lost connection).
--     Write each statement so it can run again: CREATE TABLE IF NOT EXISTS, and for
--     later ALTERs the IF [NOT] EXISTS forms (ADD COLUMN IF NOT EXISTS, ...).
--   * The runner records each applied step in schema_version.
--
-- Conventions: InnoDB, utf8mb4 with the binary collation (identifiers such as
-- request_id compare exactly: 'Order-1' and 'order-1' are two requests), enums as
-- TINYINT UNSIGNED holding the proto numbers, times as DATETIME(6) in UTC (the pool
-- sets the session time_zone to +00:00), money as BIGINT cents. Column sizes match
-- payments/validation.py, which refuses longer values before they get here.

-- migrate:step 1 payments, payment_events, schema_version

CREATE TABLE IF NOT EXISTS schema_version (
    version    INT         NOT NULL,
    applied_at DATETIME(6) NOT NULL,
    PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS payments (
    id                       BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT,
    request_id               VARCHAR(128)     NOT NULL,
    caller_service           VARCHAR(128)     NOT NULL,
    resource_type            VARCHAR(128)     NOT NULL,
    resource_id              VARCHAR(128)     NOT NULL,
    customer_ref             VARCHAR(128)     NOT NULL DEFAULT '',
    amount_cents             BIGINT           NOT NULL,
    currency                 CHAR(3)          NOT NULL,
    -- PaymentStatus, PaymentMethod, PaymentType, ProviderType: the proto numbers
    status                   TINYINT UNSIGNED NOT NULL,
    payment_method           TINYINT UNSIGNED NOT NULL,
    payment_type             TINYINT UNSIGNED NOT NULL,
    provider                 TINYINT UNSIGNED NOT NULL,
    recurring_interval       VARCHAR(16)      NOT NULL DEFAULT '',
    recurring_interval_count INT              NOT NULL DEFAULT 0,
    status_callback_url      VARCHAR(2048)    NOT NULL,
    success_url              VARCHAR(2048)    NOT NULL DEFAULT '',
    cancel_url               VARCHAR(2048)    NOT NULL DEFAULT '',
    provider_callback_hash   VARCHAR(64)      NOT NULL,
    provider_callback_url    VARCHAR(2048)    NOT NULL,
    -- sha256 of the create parameters: the same request_id with another one is a conflict
    request_fingerprint      CHAR(64)         NOT NULL,
    -- '' until the provider object exists (so these are not UNIQUE)
    provider_payment_id      VARCHAR(255)     NOT NULL DEFAULT '',
    provider_subscription_id VARCHAR(255)     NOT NULL DEFAULT '',
    checkout_url             VARCHAR(2048)    NOT NULL DEFAULT '',
    refunded_cents           BIGINT           NOT NULL DEFAULT 0,
    -- a JSON object of strings (up to 50 entries of 500 characters: more than TEXT holds)
    metadata                 MEDIUMTEXT       NOT NULL,
    created_at               DATETIME(6)      NOT NULL,
    updated_at               DATETIME(6)      NOT NULL,
    PRIMARY KEY (id),
    -- idempotency: (caller_service, request_id) names one payment forever
    UNIQUE KEY uq_payments_caller_request (caller_service, request_id),
    -- provider callbacks arrive under /webhooks/providers/{provider}/{hash}
    UNIQUE KEY uq_payments_callback_hash (provider_callback_hash),
    -- ListPayments: every filter, newest first (ORDER BY id DESC; InnoDB appends the
    -- primary key to each secondary index, so equality filters come back in id order)
    KEY ix_payments_caller_id (caller_service, id),
    KEY ix_payments_caller_status (caller_service, status, id),
    KEY ix_payments_request_id (request_id),
    KEY ix_payments_resource (resource_type, resource_id),
    -- provider events and reconciliation find the payment by the provider's ids
    KEY ix_payments_provider_payment_id (provider_payment_id),
    KEY ix_payments_provider_subscription_id (provider_subscription_id),
    -- jobs: stale PENDING payments to reconcile (updated_at) and to expire (created_at),
    -- also serves a status-only list filter
    KEY ix_payments_status_updated (status, updated_at),
    KEY ix_payments_status_created (status, created_at),
    CONSTRAINT ck_payments_metadata_json CHECK (JSON_VALID(metadata))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS payment_events (
    id                  BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT,
    -- no FOREIGN KEY: it would lock the parent row on every insert; the service writes
    -- events in the payment's own transaction and deletes them with it
    payment_id          BIGINT UNSIGNED  NOT NULL,
    -- payments.model.EventKind
    kind                VARCHAR(32)      NOT NULL,
    from_status         TINYINT UNSIGNED NOT NULL,
    to_status           TINYINT UNSIGNED NOT NULL,
    reason              TEXT             NOT NULL,
    -- NULL when the row is not from a provider event: the UNIQUE key allows many NULLs
    -- but only one row per provider event id, so a replayed event is detected
    provider_event_id   VARCHAR(255)     NULL DEFAULT NULL,
    provider_event_type VARCHAR(255)     NOT NULL DEFAULT '',
    created_at          DATETIME(6)      NOT NULL,
    PRIMARY KEY (id),
    KEY ix_payment_events_payment (payment_id, id),
    UNIQUE KEY uq_payment_events_provider_event (provider_event_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- migrate:step 2 callback_outbox, callback_attempts, provider_callbacks

-- One row per status callback owed to a caller, written in the transaction that moved
-- the payment to a terminal status. The dispatcher claims due rows with a lease
-- (claimed_by / claimed_until), so replicas never deliver one row at the same time.
CREATE TABLE IF NOT EXISTS callback_outbox (
    id              BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT,
    payment_id      BIGINT UNSIGNED  NOT NULL,
    -- the payment status this callback announces
    status          TINYINT UNSIGNED NOT NULL,
    -- webhook-id of Standard Webhooks: the same on every retry of this delivery
    delivery_id     VARCHAR(64)      NOT NULL,
    url             VARCHAR(2048)    NOT NULL,
    request_id      VARCHAR(128)     NOT NULL,
    -- the JSON body, fixed when the status changed
    payload         MEDIUMTEXT       NOT NULL,
    -- pending, delivered, failed
    state           VARCHAR(16)      NOT NULL,
    attempts        INT              NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(6)      NOT NULL,
    claimed_by      VARCHAR(64)      NOT NULL DEFAULT '',
    claimed_until   DATETIME(6)      NULL DEFAULT NULL,
    last_error      VARCHAR(500)     NOT NULL DEFAULT '',
    created_at      DATETIME(6)      NOT NULL,
    updated_at      DATETIME(6)      NOT NULL,
    delivered_at    DATETIME(6)      NULL DEFAULT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_callback_outbox_delivery (delivery_id),
    -- a payment announces each terminal status once
    UNIQUE KEY uq_callback_outbox_payment_status (payment_id, status),
    -- the dispatcher's sweep: due pending rows, oldest first
    KEY ix_callback_outbox_due (state, next_attempt_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Every delivery attempt of a status callback: when, what came back, how long it took.
CREATE TABLE IF NOT EXISTS callback_attempts (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    outbox_id    BIGINT UNSIGNED NOT NULL,
    attempt      INT             NOT NULL,
    attempted_at DATETIME(6)     NOT NULL,
    -- NULL when no HTTP answer came (connection refused, timeout, ...)
    status_code  INT             NULL DEFAULT NULL,
    error        VARCHAR(500)    NOT NULL DEFAULT '',
    latency_ms   INT             NOT NULL,
    PRIMARY KEY (id),
    KEY ix_callback_attempts_outbox (outbox_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Every inbound provider callback (webhook), processed or rejected with its reason.
CREATE TABLE IF NOT EXISTS provider_callbacks (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    provider      VARCHAR(32)     NOT NULL,
    callback_hash VARCHAR(64)     NOT NULL,
    -- NULL when the body could not be read as an event
    event_id      VARCHAR(255)    NULL DEFAULT NULL,
    event_type    VARCHAR(255)    NOT NULL DEFAULT '',
    payment_id    BIGINT UNSIGNED NULL DEFAULT NULL,
    -- processed, duplicate, rejected
    outcome       VARCHAR(16)     NOT NULL,
    reason        VARCHAR(500)    NOT NULL DEFAULT '',
    request_id    VARCHAR(128)    NOT NULL DEFAULT '',
    payload       MEDIUMTEXT      NOT NULL,
    received_at   DATETIME(6)     NOT NULL,
    PRIMARY KEY (id),
    KEY ix_provider_callbacks_event (event_id),
    KEY ix_provider_callbacks_payment (payment_id, id),
    KEY ix_provider_callbacks_received (received_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- migrate:step 3 refunds, refund_events

-- One row per refund of a payment, written (PENDING) under the payment's row lock
-- before Stripe is called, so concurrent refunds are summed against the amount.
CREATE TABLE IF NOT EXISTS refunds (
    id                  BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT,
    -- no FOREIGN KEY (see payment_events): written under the payment's own row lock
    payment_id          BIGINT UNSIGNED  NOT NULL,
    request_id          VARCHAR(128)     NOT NULL,
    caller_service      VARCHAR(128)     NOT NULL,
    amount_cents        BIGINT           NOT NULL,
    currency            CHAR(3)          NOT NULL,
    -- RefundStatus: the proto numbers
    status              TINYINT UNSIGNED NOT NULL,
    -- sha256 of the create parameters ('' for a refund made outside the service)
    request_fingerprint CHAR(64)         NOT NULL DEFAULT '',
    created_at          DATETIME(6)      NOT NULL,
    updated_at          DATETIME(6)      NOT NULL,
    -- '' or one of Stripe's duplicate, fraudulent, requested_by_customer
    reason              VARCHAR(32)      NOT NULL DEFAULT '',
    failure_reason      VARCHAR(500)     NOT NULL DEFAULT '',
    -- NULL until Stripe has the refund: the UNIQUE key allows many NULLs, one per re_ id
    provider_refund_id  VARCHAR(255)     NULL DEFAULT NULL,
    metadata            MEDIUMTEXT       NOT NULL,
    PRIMARY KEY (id),
    -- idempotency: (caller_service, request_id) names one refund forever
    UNIQUE KEY uq_refunds_caller_request (caller_service, request_id),
    -- a Stripe refund is recorded once (events about our own refunds find it here)
    UNIQUE KEY uq_refunds_provider_refund_id (provider_refund_id),
    -- a payment's refunds, oldest first, and their sums under the payment's lock
    KEY ix_refunds_payment (payment_id, id),
    -- the reconciler: PENDING refunds not updated for a while
    KEY ix_refunds_status_updated (status, updated_at),
    CONSTRAINT ck_refunds_metadata_json CHECK (JSON_VALID(metadata))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- A refund's history: one row per status change, like payment_events.
CREATE TABLE IF NOT EXISTS refund_events (
    id                  BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT,
    refund_id           BIGINT UNSIGNED  NOT NULL,
    payment_id          BIGINT UNSIGNED  NOT NULL,
    -- payments.model.EventKind
    kind                VARCHAR(32)      NOT NULL,
    from_status         TINYINT UNSIGNED NOT NULL,
    to_status           TINYINT UNSIGNED NOT NULL,
    reason              TEXT             NOT NULL,
    -- NULL when not from a provider event. One event (charge.refunded) may move several
    -- refunds, so the key is per refund: a replayed event is detected for each.
    provider_event_id   VARCHAR(255)     NULL DEFAULT NULL,
    provider_event_type VARCHAR(255)     NOT NULL DEFAULT '',
    created_at          DATETIME(6)      NOT NULL,
    PRIMARY KEY (id),
    KEY ix_refund_events_refund (refund_id, id),
    UNIQUE KEY uq_refund_events_provider_event (provider_event_id, refund_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- migrate:step 4 callback_outbox.traceparent

-- The W3C traceparent of the request or provider event that queued the callback, so
-- the delivery's span and its outgoing traceparent header continue that trace.
ALTER TABLE callback_outbox ADD COLUMN IF NOT EXISTS traceparent VARCHAR(55) NOT NULL DEFAULT '';

-- migrate:step 5 payments.claimed_by, payments.claimed_until

-- Who is talking to the provider about this payment, and until when (a lease taken and
-- committed before the call, so no row lock or pooled session is held across it):
-- create, cancel and the jobs take it, one at a time; a crashed holder's lease lapses.
ALTER TABLE payments ADD COLUMN IF NOT EXISTS claimed_by VARCHAR(64) NOT NULL DEFAULT '';
ALTER TABLE payments ADD COLUMN IF NOT EXISTS claimed_until DATETIME(6) NULL DEFAULT NULL;

-- migrate:step 6 callback deliveries: kind, refund, resends, gone, retention

-- A delivery announces a payment's or a refund's status (kind, refund_id 0 for a
-- payment); resend numbers the caller-requested repeats of one announcement, so an
-- announcement is written once by the status machine and may be resent at will.
-- state gains 'gone' (the receiver answered 410). Indexes: the operators' listing
-- (state, created_at) and the retention cleanup (state, updated_at).
ALTER TABLE callback_outbox ADD COLUMN IF NOT EXISTS kind VARCHAR(16) NOT NULL DEFAULT 'payment';
ALTER TABLE callback_outbox ADD COLUMN IF NOT EXISTS refund_id BIGINT UNSIGNED NOT NULL DEFAULT 0;
ALTER TABLE callback_outbox ADD COLUMN IF NOT EXISTS resend INT NOT NULL DEFAULT 0;
ALTER TABLE callback_outbox ADD UNIQUE KEY IF NOT EXISTS uq_callback_outbox_announcement (payment_id, kind, refund_id, status, resend);
ALTER TABLE callback_outbox DROP INDEX IF EXISTS uq_callback_outbox_payment_status;
ALTER TABLE callback_outbox ADD KEY IF NOT EXISTS ix_callback_outbox_state_created (state, created_at);
ALTER TABLE callback_outbox ADD KEY IF NOT EXISTS ix_callback_outbox_state_updated (state, updated_at);

-- migrate:step 7 payments' Stripe PaymentIntent and Charge ids

-- The PaymentIntent a refund is made against and the charge it paid, filled when the
-- service first resolves them (a refund, or the payment becoming PAID); refund events
-- name both, so each is indexed to route an event to its payment. MariaDB's IF NOT
-- EXISTS keeps the statements re-runnable (DDL commits one statement at a time).
ALTER TABLE payments
    ADD COLUMN IF NOT EXISTS provider_payment_intent_id VARCHAR(255) NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS provider_charge_id VARCHAR(255) NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS ix_payments_payment_intent ON payments (provider_payment_intent_id);
CREATE INDEX IF NOT EXISTS ix_payments_charge ON payments (provider_charge_id);
