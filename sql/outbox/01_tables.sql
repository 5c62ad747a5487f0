-- webhook_outbox, in data-path order (sql/outbox/NN_*.sql, each emitted after the one
-- before it): tables; the rules and helpers the API shares; announcements; endpoints;
-- enqueue; claim and acknowledge; views; statistics; repair and retention; privileges.
--
-- Naming: tables are singular (outbox.endpoint, outbox.event, outbox.delivery,
-- outbox.attempt); the views people query are plural (outbox.endpoints, outbox.deliveries,
-- outbox.attempts, outbox.dead_letters). Secrets live only in outbox.endpoint.secret, which
-- no view exposes. Functions named outbox._* are internal.

-------------------------------------------------------------------------------------------
-- Types
-------------------------------------------------------------------------------------------

-- The life of a delivery. Allowed transitions:
--   pending   -> in_flight (claim)          | cancelled (cancel, endpoint deleted)
--   in_flight -> delivered | dead (ack)     | pending (ack with retry)
--   in_flight -> in_flight (lease expired, claimed again by another sender)
-- delivered, dead and cancelled are final.
CREATE TYPE outbox.delivery_status AS ENUM ('pending', 'in_flight', 'delivered', 'dead', 'cancelled');

-- What one attempt ended with, as decided by the sender's retry policy; or, for the last
-- three, an operator's repair recorded in the same history (no request was sent).
CREATE TYPE outbox.attempt_outcome AS ENUM ('delivered', 'retry', 'dead', 'requeued', 'replayed', 'cancelled');

-- An endpoint's circuit breaker. closed: deliveries flow. open: after too many consecutive
-- failures nothing is claimed for it until next_probe_at. half_open: one probe delivery is
-- in flight; its success closes the circuit, its failure opens it again for longer.
CREATE TYPE outbox.circuit_state AS ENUM ('closed', 'open', 'half_open');

-- A finished attempt as the bookkeeping after it needs it (outbox._account): written by
-- outbox.ack_batch for claimed deliveries and by outbox._close_batch for first attempts
-- sent straight from a batch of the log.
CREATE TYPE outbox._settled AS (
    id            uuid,
    endpoint_id   uuid,
    event_id      text,
    tenant_id     text,
    created_at    timestamptz,
    attempt       integer,
    outcome       outbox.attempt_outcome,
    status_code   integer,
    error         text,
    duration_ms   double precision,
    response_body text,
    event_type    text
);

-- A first attempt the worker sent straight from a batch of the log (outbox._read_batch):
-- the event (by its place in the log), the endpoint, the delivery id it was sent as, and
-- what came of it (outcome NULL: still in flight) as outbox._decided judged it.
CREATE TYPE outbox._sent AS (
    id            uuid,
    txid          bigint,
    seq           bigint,
    endpoint_id   uuid,
    attempt       integer,
    outcome       outbox.attempt_outcome,
    status_code   integer,
    error         text,
    last_error    text,
    duration_ms   double precision,
    response_body text,
    next_at       timestamptz
);

-------------------------------------------------------------------------------------------
-- Tables
-------------------------------------------------------------------------------------------

CREATE TABLE outbox.endpoint (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    url             text        NOT NULL,
    -- NULL only once the endpoint is deleted: its secrets and headers go with it.
    secret          text,
    -- NULL = every event; otherwise exact names and 'prefix.*' patterns.
    event_types     text[],
    enabled         boolean     NOT NULL DEFAULT true,
    disabled_reason text,
    -- NULL = the outbox.request_timeout GUC.
    timeout         interval,
    headers         jsonb       NOT NULL DEFAULT '{}',
    tenant_id       text,
    description     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- Deleted endpoints stay as rows so that history keeps pointing at something real.
    deleted_at      timestamptz,
    -- During a secret rotation the old secret keeps signing (beside the new one) until then.
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    -- Delivery policy. ordered: strictly one at a time in enqueue order. rate_limit: most
    -- requests per second (NULL: unlimited). max_in_flight: most requests at once (NULL: the
    -- outbox.endpoint_max_in_flight GUC).
    ordered         boolean     NOT NULL DEFAULT false,
    rate_limit      integer,
    max_in_flight   integer,
    -- The caller's key for the endpoint (unique per tenant among live endpoints): creating
    -- it again under the same key returns it instead of making a second one.
    uid             text,
    CONSTRAINT endpoint_headers_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT endpoint_timeout_range CHECK (timeout IS NULL OR (timeout >= interval '100 milliseconds' AND timeout <= interval '5 minutes')),
    CONSTRAINT endpoint_rate_limit_range CHECK (rate_limit BETWEEN 1 AND 100000),
    CONSTRAINT endpoint_max_in_flight_range CHECK (max_in_flight BETWEEN 1 AND 10000),
    CONSTRAINT endpoint_secret_present CHECK (secret IS NOT NULL OR deleted_at IS NOT NULL),
    CONSTRAINT endpoint_uid_length CHECK (length(uid) BETWEEN 1 AND 256)
);

CREATE INDEX endpoint_tenant_idx ON outbox.endpoint (tenant_id) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX endpoint_uid_key ON outbox.endpoint ((coalesce(tenant_id, '')), uid)
    WHERE uid IS NOT NULL AND deleted_at IS NULL;

-- The event log: what producers write, and all they write. One row per enqueued event,
-- stamped with the producer's top-level transaction id; the worker reads it in batches
-- bounded by transaction snapshots (outbox._read_log) and fans each event out to its
-- endpoints after the producer committed. Rows are never updated or deleted one by one:
-- the log is three partitions by transaction-id window, and a partition is truncated
-- whole once every transaction that could have written to it was read
-- (outbox._rotate_log). So the producer's cost is one insert into a small table, and
-- neither an old snapshot nor VACUUM falling behind lets the log grow dead rows.
--
-- outbox._stamp() returns pg_current_xact_id() and, once per transaction, arranges for
-- the workers to be woken at commit: any insert into the log wakes them, however it came.
CREATE FUNCTION outbox._stamp()
RETURNS xid8
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'stamp_wrapper';

-- The partition a transaction id's rows go to: windows of 65,536 transaction ids, taking
-- turns over three partitions. While producers write to one, the one before it is being
-- read, and the one before that can be truncated.
CREATE FUNCTION outbox._log_part(txid xid8)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ((txid::text::bigint >> 16) % 3)::integer;

-- The rules every log row obeys (event type, tenant id, payload size: see the Rust
-- validate module), raising a clear error; true otherwise.
CREATE FUNCTION outbox._check_log(event_type text, tenant_id text, payload_bytes integer)
RETURNS boolean
LANGUAGE c STABLE PARALLEL SAFE
AS 'MODULE_PATHNAME', 'check_log_wrapper';

-- A counter of this backend's log rows: with the transaction id (a transaction belongs to
-- one backend) it orders and identifies a transaction's events, for a fraction of what a
-- sequence costs (no lock, no WAL).
CREATE FUNCTION outbox._seq()
RETURNS bigint
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'seq_wrapper';

CREATE TABLE outbox.log (
    txid        xid8        NOT NULL DEFAULT outbox._stamp(),
    -- Order within a transaction (ordered endpoints receive events in this order).
    seq         bigint      NOT NULL DEFAULT outbox._seq(),
    -- The `webhook-id`: the caller's event id, or the one outbox.enqueue made up; NULL from
    -- outbox.trigger, whose events get theirs when they are read (outbox._fan_out).
    id          text,
    event_type  text        NOT NULL,
    payload     jsonb       NOT NULL,
    tenant_id   text,
    -- Set when the event is for one endpoint (enqueue's endpoint_id) instead of a fan-out.
    endpoint_id uuid,
    deliver_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT log_valid CHECK (outbox._check_log(event_type, tenant_id, pg_column_size(payload)))
) PARTITION BY LIST (outbox._log_part(txid));

CREATE TABLE outbox.log_0 PARTITION OF outbox.log FOR VALUES IN (0);
CREATE TABLE outbox.log_1 PARTITION OF outbox.log FOR VALUES IN (1);
CREATE TABLE outbox.log_2 PARTITION OF outbox.log FOR VALUES IN (2);
-- The reader's range scans, in the order events are fanned out.
CREATE INDEX log_txid_idx ON outbox.log (txid, seq);

-- Where reading the log stands: a row per read step, the newest row counting (rows are
-- appended, never updated, so an old snapshot leaves no chain of dead versions to walk;
-- outbox._rotate_log truncates the old ones). `done`: every transaction visible in this
-- snapshot has been read. `batch`: the snapshot of a batch read in parts, and `pos_txid`,
-- `pos_seq` the last event of it already read (a batch's events are fixed once its
-- snapshot is taken: every transaction in it has ended).
CREATE TABLE outbox.log_cursor (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    done       pg_snapshot NOT NULL,
    batch      pg_snapshot,
    pos_txid   xid8,
    pos_seq    bigint,
    events     integer     NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Reading starts here: events committed from now on.
INSERT INTO outbox.log_cursor (done) VALUES (pg_current_snapshot());

-- One row per enqueued event; its id is the `webhook-id` receivers deduplicate on. A
-- caller's ids are its tenant's own: the same id in two tenants is two events.
CREATE TABLE outbox.event (
    id          text        NOT NULL,
    event_type  text        NOT NULL,
    payload     jsonb       NOT NULL,
    tenant_id   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The tenant as a key column: '' for none (a tenant id is never empty).
    tenant_key  text        NOT NULL GENERATED ALWAYS AS (coalesce(tenant_id, '')) STORED,
    CONSTRAINT event_pkey PRIMARY KEY (id, tenant_key)
);
-- Retention finds the events no delivery refers to any more by age (outbox._purge_batch).
CREATE INDEX event_created_idx ON outbox.event (created_at);

-- The ids callers gave their events (outbox.enqueue's event_id), so that enqueueing one
-- again does nothing: two tables taking turns, so that forgetting old ids is a TRUNCATE,
-- never a DELETE (no dead rows where producers look, nothing left for VACUUM). New ids go
-- into the one outbox.event_key_rotation names (a known id enqueued again too); enqueue
-- looks in both. Each turn lasts outbox.retention_delivered, so an id is remembered that
-- long at least after it was last enqueued, twice that at most (outbox._rotate_event_keys).
CREATE TABLE outbox.event_key_0 (
    id           text        NOT NULL,
    tenant_key   text        NOT NULL,
    event_type   text        NOT NULL,
    -- SHA-256 of the payload as text: what tells the same event from another under its id.
    payload_hash bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, tenant_key)
);
CREATE TABLE outbox.event_key_1 (LIKE outbox.event_key_0 INCLUDING ALL);

-- Which of the two takes new ids (`current`), since when, and the rotation's number: also
-- the last value of outbox.event_key_generation, which a rotation advances before it
-- commits (a sequence is seen at once by everyone, whatever their snapshot; see
-- outbox.enqueue).
CREATE SEQUENCE outbox.event_key_generation;
CREATE TABLE outbox.event_key_rotation (
    current    smallint    NOT NULL CHECK (current IN (0, 1)),
    generation bigint      NOT NULL,
    since      timestamptz NOT NULL
);
CREATE UNIQUE INDEX event_key_rotation_one_row ON outbox.event_key_rotation ((true));
INSERT INTO outbox.event_key_rotation VALUES (0, nextval('outbox.event_key_generation'), now());

-- One row per (event, endpoint): the unit that is claimed, sent, retried and acknowledged.
CREATE TABLE outbox.delivery (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id         text        NOT NULL,
    endpoint_id      uuid        NOT NULL REFERENCES outbox.endpoint (id),
    tenant_id        text,
    status           outbox.delivery_status NOT NULL DEFAULT 'pending',
    -- Attempts started so far; a claim increments it, and an ack must name it (fencing).
    attempts         integer     NOT NULL DEFAULT 0,
    -- pending: when it becomes due; in_flight: when its lease expires (then it is due again).
    -- One column for both lets a single partial index serve the claim.
    due_at           timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    -- Set on deliveries made by outbox.replay: the delivery whose event is sent again.
    replay_of        uuid,
    -- Enqueue order, set only for deliveries to ordered endpoints (outbox.delivery_seq).
    seq              bigint,
    -- The event's tenant as a key column, as in outbox.event.
    tenant_key       text        NOT NULL GENERATED ALWAYS AS (coalesce(tenant_id, '')) STORED,
    -- Attempts made before the last outbox.retry_dead: the attempt number (the fencing
    -- token) only ever grows, and the retry schedule counts from here.
    retry_base       integer     NOT NULL DEFAULT 0,
    CONSTRAINT delivery_event_fkey FOREIGN KEY (event_id, tenant_key) REFERENCES outbox.event (id, tenant_key)
) WITH (fillfactor = 80);

CREATE SEQUENCE outbox.delivery_seq;

-- Idempotent enqueue: one delivery per (event, endpoint), NULL replay_of counting as one
-- value; each replay is an extra delivery. Led by event_id, it also serves every lookup of
-- an event's deliveries (the foreign key's checks when retention deletes events).
CREATE UNIQUE INDEX delivery_event_endpoint_key ON outbox.delivery (event_id, endpoint_id, replay_of) NULLS NOT DISTINCT;
-- The claim, endpoint by endpoint: each endpoint's pending rows in due order. Claiming per
-- endpoint keeps one endpoint's backlog (behind an open circuit, a rate limit, a disabled
-- endpoint) from ever sitting in front of another's due rows.
CREATE INDEX delivery_pending_idx ON outbox.delivery (endpoint_id, due_at) WHERE status = 'pending';
-- Each endpoint's requests in flight by lease expiry: expired leases are found here. Kept
-- apart from the pending rows so that neither scan walks the other's entries.
CREATE INDEX delivery_in_flight_idx ON outbox.delivery (endpoint_id, due_at) WHERE status = 'in_flight';
-- The head of an ordered endpoint's queue.
CREATE INDEX delivery_ordered_idx ON outbox.delivery (endpoint_id, seq) WHERE seq IS NOT NULL AND status IN ('pending', 'in_flight');
-- Finished rows by age: recent-hour statistics and retention.
CREATE INDEX delivery_finished_idx ON outbox.delivery (finished_at) WHERE finished_at IS NOT NULL;
-- Dead letters are few and listed often.
CREATE INDEX delivery_dead_idx ON outbox.delivery (finished_at) WHERE status = 'dead';

-- Append-only history: one row per acknowledged attempt (and per operator action later).
CREATE TABLE outbox.attempt (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   uuid        NOT NULL REFERENCES outbox.delivery (id) ON DELETE CASCADE,
    attempt       integer     NOT NULL,
    outcome       outbox.attempt_outcome NOT NULL,
    status_code   integer,
    error         text,
    duration_ms   double precision,
    response_body text,
    worker        text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX attempt_delivery_idx ON outbox.attempt (delivery_id, attempt);
-- Failed attempts and operator actions by time (recent failures, the failure count of the
-- last hour). Successes, the bulk of the history, stay out of it: one index fewer to write
-- per delivery.
CREATE INDEX attempt_failed_idx ON outbox.attempt (created_at) WHERE outcome <> 'delivered';

-- Deliveries whose first attempt, sent straight from a batch of the log, succeeded: the
-- bulk of all deliveries, and nothing is left to do with them. Each is this one row,
-- appended once and never updated: the delivery, its event (for outbox.replay) and its
-- one attempt together. outbox.deliveries and outbox.attempts show them beside the rows
-- of outbox.delivery and outbox.attempt. The table is three partitions written in turn
-- (outbox.history_rotation says which is being written); retention empties the oldest
-- with TRUNCATE instead of deleting rows (outbox._rotate_history), so it leaves no dead
-- tuples behind and owes nothing to VACUUM.
CREATE TABLE outbox.history (
    part          smallint    NOT NULL,
    delivery_id   uuid        NOT NULL,
    event_id      text        NOT NULL,
    endpoint_id   uuid        NOT NULL,
    tenant_id     text,
    event_type    text        NOT NULL,
    payload       jsonb       NOT NULL,
    -- When the event was enqueued (a delivery's created_at).
    created_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    -- The attempt, numbered like the rows of outbox.attempt.
    attempt_id    bigint      NOT NULL DEFAULT nextval('outbox.attempt_id_seq'),
    status_code   integer,
    duration_ms   double precision,
    response_body text,
    worker        text
) PARTITION BY LIST (part);

CREATE TABLE outbox.history_0 PARTITION OF outbox.history FOR VALUES IN (0);
CREATE TABLE outbox.history_1 PARTITION OF outbox.history FOR VALUES IN (1);
CREATE TABLE outbox.history_2 PARTITION OF outbox.history FOR VALUES IN (2);
-- A delivery by its id, an event's deliveries; rows by age (recent statistics, replay of a
-- time range): a BRIN index, almost free to keep for rows appended in time order.
CREATE INDEX history_delivery_idx ON outbox.history (delivery_id);
CREATE INDEX history_event_idx ON outbox.history (event_id);
CREATE INDEX history_finished_idx ON outbox.history USING brin (finished_at);

-- Which partition of outbox.history is written (the one with `until` NULL) since when, and
-- when each of the others stopped being written: a partition is emptied for reuse only
-- once its newest row is past retention.
CREATE TABLE outbox.history_rotation (
    part  smallint    PRIMARY KEY CHECK (part BETWEEN 0 AND 2),
    since timestamptz NOT NULL,
    until timestamptz
);
CREATE UNIQUE INDEX history_rotation_current_key ON outbox.history_rotation ((true)) WHERE until IS NULL;
INSERT INTO outbox.history_rotation VALUES (0, now(), NULL), (1, now(), now()), (2, now(), now());

-- The partition of outbox.history written now.
CREATE FUNCTION outbox._history_part()
RETURNS smallint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT r.part FROM outbox.history_rotation r WHERE r.until IS NULL);

-- What senders learned about each endpoint, kept apart from outbox.endpoint so that the
-- worker's updates never wait on (or block) producers and operators using the endpoint row.
CREATE TABLE outbox.endpoint_state (
    endpoint_id          uuid        PRIMARY KEY REFERENCES outbox.endpoint (id) ON DELETE CASCADE,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    last_success_at      timestamptz,
    last_failure_at      timestamptz,
    last_error           text,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    -- Circuit breaker: see outbox.circuit_state and outbox._circuit_next.
    circuit              outbox.circuit_state NOT NULL DEFAULT 'closed',
    circuit_changed_at   timestamptz,
    -- When the circuit last opened from closed (kept while it stays open or half-open).
    circuit_opened_at    timestamptz,
    next_probe_at        timestamptz,
    cooldown             interval,
    -- Start of the current run of failures without a success (auto-disable counts from it).
    failing_since        timestamptz,
    -- Rate limit (GCRA): the endpoint's "theoretical arrival time"; one more request may go
    -- while it is less than a second ahead of now.
    rate_tat             timestamptz,
    -- Its deliveries in_flight: +1 per claim, -1 per accepted ack, cancel or expired lease,
    -- in the same statements that change their status. The claim checks max_in_flight
    -- against it (counting rows instead would walk every version the index still holds).
    in_flight            integer     NOT NULL DEFAULT 0
);

-- Every endpoint has its state row from the start, however it was inserted: the claim
-- serves an endpoint only together with its state row, and acks only update it.
CREATE FUNCTION outbox._endpoint_created()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO outbox.endpoint_state (endpoint_id) VALUES (NEW.id) ON CONFLICT (endpoint_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER endpoint_created AFTER INSERT ON outbox.endpoint
    FOR EACH ROW EXECUTE FUNCTION outbox._endpoint_created();

-- Hourly rollup of finished deliveries, written with each acknowledged batch. Statistics
-- over hours or weeks read these few rows instead of millions of deliveries, and survive
-- retention. Latency (enqueue to final outcome) is kept as a histogram: latency_bucket i
-- counts latencies in [outbox._bucket_lower(i), outbox._bucket_lower(i + 1)) ms.
CREATE TABLE outbox.stats_hourly (
    hour           timestamptz NOT NULL,
    endpoint_id    uuid        NOT NULL,
    event_type     text        NOT NULL,
    tenant_id      text        NOT NULL DEFAULT '',
    outcome        outbox.delivery_status NOT NULL,
    latency_bucket smallint    NOT NULL,
    deliveries     bigint      NOT NULL,
    attempts       bigint      NOT NULL,
    latency_ms_sum double precision NOT NULL,
    PRIMARY KEY (hour, endpoint_id, event_type, tenant_id, outcome, latency_bucket)
);

-- What retention removed from outbox.stats_hourly, summed per endpoint, outcome and latency
-- bucket. Added to what the rollup still holds, it gives totals that never go down, so the
-- counters exported from outbox.metrics show no false reset when old hours are deleted.
CREATE TABLE outbox.stats_retired (
    endpoint_id    uuid        NOT NULL,
    outcome        outbox.delivery_status NOT NULL,
    latency_bucket smallint    NOT NULL,
    deliveries     bigint      NOT NULL,
    attempts       bigint      NOT NULL,
    latency_ms_sum double precision NOT NULL,
    PRIMARY KEY (endpoint_id, outcome, latency_bucket)
);
