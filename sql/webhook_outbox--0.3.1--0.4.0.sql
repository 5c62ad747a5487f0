-- webhook_outbox 0.3.1 -> 0.4.0: the event log.
--
-- Producers append one row to outbox.log and nothing else; the worker (or outbox.claim)
-- reads the log in snapshot-bounded batches and fans each event out to its endpoints after
-- the producer committed. outbox.enqueue returns the event id instead of delivery ids.
-- The worker sends first attempts straight from a batch and writes each delivery once, as
-- its attempt left it; outbox.ack_batch and the batch's close share their bookkeeping.
-- A first attempt that succeeds is one row of outbox.history, rotated by TRUNCATE.
-- Functions that change are restated whole; queued deliveries are kept as they are.

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

-- Retention finds the events no delivery refers to any more by age (outbox._purge_batch).
CREATE INDEX event_created_idx ON outbox.event (created_at);

-- The history's partitions hold its rows (which partition is written next is not dumped:
-- a restored database starts a new turn).
SELECT pg_catalog.pg_extension_config_dump('outbox.history_0', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.history_1', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.history_2', '');

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
-- The ids callers gave before (kept until now as rows of outbox.event, which also holds
-- the events of queued deliveries; every one is taken: the generated ones are unique).
INSERT INTO outbox.event_key_0 (id, tenant_key, event_type, payload_hash, created_at)
SELECT e.id, e.tenant_key, e.event_type, sha256(convert_to(e.payload::text, 'UTF8')), e.created_at FROM outbox.event e;
-- Callers' ids, so that a restored database still knows them (both tables are looked in;
-- which takes new ones is not dumped: a restored database starts a new turn).
SELECT pg_catalog.pg_extension_config_dump('outbox.event_key_0', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_key_1', '');

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
SELECT pg_catalog.pg_extension_config_dump('outbox.stats_retired', '');

-- Endpoints get the caller's key (uid) that makes creating them idempotent.
ALTER TABLE outbox.endpoint ADD COLUMN uid text;
ALTER TABLE outbox.endpoint ADD CONSTRAINT endpoint_uid_length CHECK (length(uid) BETWEEN 1 AND 256);
CREATE UNIQUE INDEX endpoint_uid_key ON outbox.endpoint ((coalesce(tenant_id, '')), uid)
    WHERE uid IS NOT NULL AND deleted_at IS NULL;

-- outbox.create_endpoint takes uid: a new signature, so it is dropped and made again, and
-- whoever could run it gets it back.
SELECT set_config('webhook_outbox_upgrade.admins',
                  coalesce(string_agg(DISTINCT a.grantee::regrole::text, ','), ''), true)
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean, boolean, integer, integer)'::regprocedure
   AND a.grantee NOT IN (0, p.proowner);
DROP FUNCTION outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean, boolean, integer, integer);

-- outbox.update_endpoint takes uid too: the same again.
SELECT set_config('webhook_outbox_upgrade.updaters',
                  coalesce(string_agg(DISTINCT a.grantee::regrole::text, ','), ''), true)
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text, boolean, integer, integer)'::regprocedure
   AND a.grantee NOT IN (0, p.proowner);
DROP FUNCTION outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text, boolean, integer, integer);

-- Whether the caller runs inside a transaction block: outbox.claim reads the log only
-- outside one.
CREATE FUNCTION outbox._in_transaction_block() RETURNS bool
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'in_transaction_block_wrapper';

-- outbox.enqueue returns the event id now: a new signature, so it is dropped and made
-- again, and whoever could run it gets it back (with what outbox.trigger needs).
SELECT set_config('webhook_outbox_upgrade.producers',
                  coalesce(string_agg(DISTINCT a.grantee::regrole::text, ','), ''), true)
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'outbox.enqueue(text, jsonb, uuid, text, text, timestamptz)'::regprocedure
   AND a.grantee NOT IN (0, p.proowner);
DROP FUNCTION outbox.enqueue(text, jsonb, uuid, text, text, timestamptz);


-- The partition of outbox.history written now.
CREATE OR REPLACE FUNCTION outbox._history_part()
RETURNS smallint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT r.part FROM outbox.history_rotation r WHERE r.until IS NULL);

-- A new event id (the `webhook-id` of an event enqueued without one): `msg_` and 32 hex
-- digits of a random UUID.
CREATE OR REPLACE FUNCTION outbox._new_event_id()
RETURNS text
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN 'msg_' || replace(gen_random_uuid()::text, '-', '');

-- The id of an event outbox.trigger appended without one, from its place in the log and
-- its time (see the Rust ids module): every read of it, a repeated one too, gives the same
-- `webhook-id`.
CREATE OR REPLACE FUNCTION outbox._log_event_id(txid xid8, seq bigint, created_at timestamptz)
RETURNS text
LANGUAGE c STABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'log_event_id_wrapper';

-- An event's `webhook-id`, wherever the log is read: the one it was appended with (the
-- caller's, or the one outbox.enqueue made up), else the one derived from its place.
CREATE OR REPLACE FUNCTION outbox._event_id(id text, txid xid8, seq bigint, created_at timestamptz)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(id, outbox._log_event_id(txid, seq, created_at));

-- The request body of an event, as every sender sends it (Standard Webhooks' shape).
CREATE OR REPLACE FUNCTION outbox._body(p_event_type text, p_created_at timestamptz, p_payload jsonb)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN json_build_object('type', p_event_type,
                         'timestamp', to_char(p_created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                         'data', p_payload)::text;

-- Creates an endpoint and returns its id. With uid (the caller's key for it, unique per
-- tenant among live endpoints) it can run again, as a deploy script does: the endpoint the
-- key made before is returned, if the arguments describe it (its secret is compared only
-- when one is given, enabled not at all: operators and auto-disable change it); other
-- arguments are refused, for outbox.update_endpoint to apply.
CREATE OR REPLACE FUNCTION outbox.create_endpoint(
    url         text,
    event_types text[]   DEFAULT NULL,
    secret      text     DEFAULT NULL,
    headers     jsonb    DEFAULT '{}',
    timeout     interval DEFAULT NULL,
    tenant_id   text     DEFAULT NULL,
    description text     DEFAULT NULL,
    enabled     boolean  DEFAULT true,
    ordered     boolean  DEFAULT false,
    rate_limit  integer  DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    uid         text     DEFAULT NULL
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id  uuid;
    v_known outbox.endpoint;
    -- Checked (and normalised) once: what is stored, and what a known endpoint must match.
    v_url     text     := outbox._check_url(create_endpoint.url);
    v_types   text[]   := outbox._check_event_types(create_endpoint.event_types);
    v_headers jsonb    := outbox._check_headers(coalesce(create_endpoint.headers, '{}'));
    v_timeout interval := outbox._check_timeout(create_endpoint.timeout);
    v_tenant  text     := outbox._check_tenant(create_endpoint.tenant_id);
    v_rate    integer  := outbox._check_limit('rate_limit', create_endpoint.rate_limit, 100000);
    v_max     integer  := outbox._check_limit('max_in_flight', create_endpoint.max_in_flight, 10000);
BEGIN
    IF create_endpoint.uid IS NOT NULL AND length(create_endpoint.uid) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'an endpoint uid is 1 to 256 characters, not %', length(create_endpoint.uid)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A concurrent create under the same key makes this wait for it, then do nothing; an
    -- endpoint deleted in between frees the key, and the insert is tried again.
    FOR i IN 1 .. 3 LOOP
        INSERT INTO outbox.endpoint (url, secret, event_types, headers, timeout, tenant_id, description, enabled,
                                     ordered, rate_limit, max_in_flight, uid)
        VALUES (
            v_url,
            CASE WHEN create_endpoint.secret IS NULL THEN outbox.generate_secret()
                 ELSE outbox._check_secret(create_endpoint.secret) END,
            v_types, v_headers, v_timeout, v_tenant,
            create_endpoint.description,
            coalesce(create_endpoint.enabled, true),
            coalesce(create_endpoint.ordered, false),
            v_rate, v_max, create_endpoint.uid
        )
        ON CONFLICT ((coalesce(tenant_id, '')), uid) WHERE uid IS NOT NULL AND deleted_at IS NULL DO NOTHING
        RETURNING id INTO new_id;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        SELECT * INTO v_known FROM outbox.endpoint e
         WHERE coalesce(e.tenant_id, '') = coalesce(v_tenant, '') AND e.uid = create_endpoint.uid
           AND e.deleted_at IS NULL;
        EXIT WHEN FOUND;
    END LOOP;
    IF v_known.id IS NULL THEN
        RAISE EXCEPTION 'endpoint uid % is being created and deleted concurrently', quote_literal(create_endpoint.uid)
            USING ERRCODE = 'serialization_failure', HINT = 'Try again.';
    END IF;
    IF v_known.url IS DISTINCT FROM v_url
       OR v_known.event_types IS DISTINCT FROM v_types
       OR (create_endpoint.secret IS NOT NULL AND v_known.secret IS DISTINCT FROM create_endpoint.secret)
       OR v_known.headers IS DISTINCT FROM v_headers
       OR v_known.timeout IS DISTINCT FROM v_timeout
       OR v_known.description IS DISTINCT FROM create_endpoint.description
       OR v_known.ordered IS DISTINCT FROM coalesce(create_endpoint.ordered, false)
       OR v_known.rate_limit IS DISTINCT FROM v_rate
       OR v_known.max_in_flight IS DISTINCT FROM v_max THEN
        RAISE EXCEPTION 'endpoint uid % exists with other settings', quote_literal(create_endpoint.uid)
            USING ERRCODE = 'unique_violation',
                  DETAIL = format('Its id is %s.', v_known.id),
                  HINT = 'Change it with outbox.update_endpoint(endpoint_id, ...), or create another under a new uid.';
    END IF;
    RETURN v_known.id;
END
$$;

-- NULL arguments leave a field unchanged. event_types => '{*}' makes the endpoint receive
-- every event again; timeout => '0' returns it to the outbox.request_timeout default;
-- rate_limit => 0 removes the limit; max_in_flight => 0 returns it to the
-- outbox.endpoint_max_in_flight default; uid => '' removes the caller's key (a deploy script
-- can give an endpoint made without one a key). Making an endpoint ordered puts what it has
-- queued in enqueue order first.
CREATE FUNCTION outbox.update_endpoint(
    endpoint_id uuid,
    url         text     DEFAULT NULL,
    event_types text[]   DEFAULT NULL,
    secret      text     DEFAULT NULL,
    headers     jsonb    DEFAULT NULL,
    timeout     interval DEFAULT NULL,
    description text     DEFAULT NULL,
    ordered     boolean  DEFAULT NULL,
    rate_limit  integer  DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    uid         text     DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM outbox._endpoint_or_raise(update_endpoint.endpoint_id);
    IF length(update_endpoint.uid) > 256 THEN
        RAISE EXCEPTION 'an endpoint uid is 1 to 256 characters, not %', length(update_endpoint.uid)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass uid => '''' to remove the endpoint''s uid.';
    END IF;
    -- Another live endpoint of the tenant with that uid: refused, as create_endpoint
    -- refuses a clash.
    IF update_endpoint.uid <> '' AND EXISTS (
           SELECT 1 FROM outbox.endpoint o, outbox.endpoint e
            WHERE e.id = update_endpoint.endpoint_id AND o.id <> e.id AND o.deleted_at IS NULL
              AND coalesce(o.tenant_id, '') = coalesce(e.tenant_id, '') AND o.uid = update_endpoint.uid) THEN
        RAISE EXCEPTION 'endpoint uid % belongs to another endpoint', quote_literal(update_endpoint.uid)
            USING ERRCODE = 'unique_violation',
                  HINT = 'A uid is unique among a tenant''s live endpoints: delete the other endpoint first, or choose another uid.';
    END IF;
    UPDATE outbox.endpoint e SET
        url         = coalesce(outbox._check_url(update_endpoint.url), e.url),
        event_types = CASE WHEN update_endpoint.event_types IS NULL THEN e.event_types
                           ELSE outbox._check_event_types(update_endpoint.event_types) END,
        secret      = coalesce(outbox._check_secret(update_endpoint.secret), e.secret),
        headers     = coalesce(outbox._check_headers(update_endpoint.headers), e.headers),
        timeout     = CASE WHEN update_endpoint.timeout IS NULL THEN e.timeout
                           WHEN update_endpoint.timeout = interval '0' THEN NULL
                           ELSE outbox._check_timeout(update_endpoint.timeout) END,
        description = coalesce(update_endpoint.description, e.description),
        ordered     = coalesce(update_endpoint.ordered, e.ordered),
        rate_limit  = CASE WHEN update_endpoint.rate_limit IS NULL THEN e.rate_limit
                           WHEN update_endpoint.rate_limit = 0 THEN NULL
                           ELSE outbox._check_limit('rate_limit', update_endpoint.rate_limit, 100000) END,
        max_in_flight = CASE WHEN update_endpoint.max_in_flight IS NULL THEN e.max_in_flight
                             WHEN update_endpoint.max_in_flight = 0 THEN NULL
                             ELSE outbox._check_limit('max_in_flight', update_endpoint.max_in_flight, 10000) END,
        uid         = CASE WHEN update_endpoint.uid IS NULL THEN e.uid
                           WHEN update_endpoint.uid = '' THEN NULL
                           ELSE update_endpoint.uid END,
        updated_at  = now()
    WHERE e.id = update_endpoint.endpoint_id;
    IF update_endpoint.ordered THEN
        -- Its queue needs an order: wait for transactions enqueueing right now (they may have
        -- seen the endpoint unordered), then number what is queued, oldest first (rows of one
        -- transaction share created_at; their physical order is their insert order).
        LOCK TABLE outbox.delivery IN SHARE ROW EXCLUSIVE MODE;
        UPDATE outbox.delivery d SET seq = o.n
          FROM (SELECT q.id, nextval('outbox.delivery_seq') AS n
                  FROM (SELECT q.id FROM outbox.delivery q
                         WHERE q.endpoint_id = update_endpoint.endpoint_id AND q.seq IS NULL
                           AND q.status IN ('pending', 'in_flight')
                         ORDER BY q.created_at, q.ctid) q) o
         WHERE d.id = o.id;
    END IF;
END
$$;

-- Records a caller's id in table p_part of the two; false when the id is there already
-- (committed, or committed by a transaction this one waited for). A row there this
-- transaction could not see (REPEATABLE READ: committed after its snapshot) fails to
-- serialize.
CREATE OR REPLACE FUNCTION outbox._remember_event_key(p_part smallint, p_id text, p_tenant text, p_event_type text, p_hash bytea)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- One statement per table, so that each names only its own: a rotation may be
    -- emptying the other.
    IF p_part = 0 THEN
        INSERT INTO outbox.event_key_0 (id, tenant_key, event_type, payload_hash)
        VALUES (p_id, p_tenant, p_event_type, p_hash) ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO outbox.event_key_1 (id, tenant_key, event_type, payload_hash)
        VALUES (p_id, p_tenant, p_event_type, p_hash) ON CONFLICT DO NOTHING;
    END IF;
    RETURN FOUND;
END
$$;

-- What a caller's id named, from table p_part of the two.
CREATE OR REPLACE FUNCTION outbox._event_key(p_part smallint, p_id text, p_tenant text)
RETURNS TABLE (event_type text, payload_hash bytea)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_part = 0 THEN
        RETURN QUERY SELECT k.event_type, k.payload_hash FROM outbox.event_key_0 k
                      WHERE k.id = p_id AND k.tenant_key = p_tenant;
    ELSE
        RETURN QUERY SELECT k.event_type, k.payload_hash FROM outbox.event_key_1 k
                      WHERE k.id = p_id AND k.tenant_key = p_tenant;
    END IF;
END
$$;

-- Appends one event to the log, in the caller's transaction, and returns its id (the
-- `webhook-id`). Nothing else happens here: after the transaction commits, the worker (or
-- outbox.claim) reads the event and fans it out to the endpoints subscribed at that moment
-- (outbox._fan_out), or to endpoint_id alone when it is given (it must be the tenant's own;
-- its filter and enabled flag are not consulted: a disabled endpoint's delivery waits until
-- it is enabled). With event_id (unique per tenant), enqueueing the same event again does
-- nothing and returns the id, for outbox.retention_delivered at least after it was last
-- enqueued; the same id with another event type or payload (its JSON text, as jsonb
-- writes it) is refused.
CREATE OR REPLACE FUNCTION outbox.enqueue(
    event_type  text,
    payload     jsonb,
    endpoint_id uuid        DEFAULT NULL,
    event_id    text        DEFAULT NULL,
    tenant_id   text        DEFAULT NULL,
    deliver_at  timestamptz DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_endpoint   outbox.endpoint;
    v_id         text;
    v_due        timestamptz;
    v_tenant     text := coalesce(enqueue.tenant_id, '');
    v_rc         boolean;
    v_part       smallint;
    v_gen        bigint;
    v_latest     bigint;
    v_hash       bytea;
    v_known_type text;
    v_known_hash bytea;
    v_new        boolean;
BEGIN
    -- The payload counts by its stored size, as the log's CHECK counts it: one rule, and
    -- no conversion of the JSON to text to measure it.
    PERFORM outbox._check_event(enqueue.event_type, enqueue.event_id, enqueue.tenant_id,
                                pg_column_size(enqueue.payload));
    IF enqueue.deliver_at IS NOT NULL THEN
        v_due := outbox._check_deliver_at(enqueue.deliver_at);
    END IF;

    IF enqueue.endpoint_id IS NOT NULL THEN
        v_endpoint := outbox._endpoint_or_raise(enqueue.endpoint_id, false);
        IF v_endpoint.tenant_id IS DISTINCT FROM enqueue.tenant_id THEN
            -- Said as if it did not exist: another tenant's endpoints are not to be probed.
            RAISE EXCEPTION 'endpoint % does not exist for tenant %', enqueue.endpoint_id,
                            coalesce(quote_literal(enqueue.tenant_id), 'NULL')
                USING ERRCODE = 'no_data_found',
                      HINT = 'Pass the endpoint''s own tenant_id; list them with: SELECT id, tenant_id FROM outbox.endpoints;';
        END IF;
    END IF;

    IF enqueue.event_id IS NULL THEN
        v_id := outbox._new_event_id();
        INSERT INTO outbox.log (id, event_type, payload, tenant_id, endpoint_id, deliver_at)
        VALUES (v_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id, enqueue.endpoint_id, v_due);
        RETURN v_id;
    END IF;

    -- A caller's id (outbox.event_key_0/_1). It goes into the table taking new ids, whose
    -- unique key makes a twin being enqueued at the same moment wait for this one (or this
    -- one for it, then find it); and it must not be known from the table before (an id
    -- outlives one turn). Under READ COMMITTED each look sees what committed before it.
    v_rc := current_setting('transaction_isolation') = 'read committed';
    SELECT r.current, r.generation, (SELECT g.last_value FROM outbox.event_key_generation g)
      INTO v_part, v_gen, v_latest
      FROM outbox.event_key_rotation r;
    -- Under REPEATABLE READ or SERIALIZABLE the looks see the transaction's snapshot. An id
    -- committed since then into the table this one goes to fails to serialize there; one
    -- committed into the other means the tables took turns since the snapshot (a rotation
    -- waits for the ids going into the table whose turn it ends), which the generation,
    -- read past any snapshot, tells.
    IF NOT v_rc AND v_gen <> v_latest THEN
        RAISE EXCEPTION 'the table of event ids was rotated after this transaction''s snapshot was taken'
            USING ERRCODE = 'serialization_failure',
                  HINT = 'Retry the transaction.';
    END IF;
    -- As UTF-8 whatever the client's encoding (textsend would convert to that).
    v_hash := sha256(convert_to(enqueue.payload::text, 'UTF8'));
    v_new := outbox._remember_event_key(v_part, enqueue.event_id, v_tenant, enqueue.event_type, v_hash);
    IF v_new AND (SELECT g.last_value FROM outbox.event_key_generation g) <> v_gen THEN
        -- A rotation begun since `current` was read ends that table's turn once this
        -- transaction ends: the id goes into the next one too, where a later snapshot
        -- looks first, and where a twin enqueued meanwhile is met. (Under REPEATABLE READ,
        -- retried instead.)
        IF NOT v_rc THEN
            RAISE EXCEPTION 'the table of event ids was rotated while this transaction enqueued %', quote_literal(enqueue.event_id)
                USING ERRCODE = 'serialization_failure',
                      HINT = 'Retry the transaction.';
        END IF;
        v_part := 1 - v_part;
        v_new := outbox._remember_event_key(v_part, enqueue.event_id, v_tenant, enqueue.event_type, v_hash);
    ELSIF v_new THEN
        -- New in this turn's table: it may be known from the turn before.
        SELECT k.event_type, k.payload_hash INTO v_known_type, v_known_hash
          FROM outbox._event_key((1 - v_part)::smallint, enqueue.event_id, v_tenant) k;
        v_new := NOT FOUND;
    ELSE
        SELECT k.event_type, k.payload_hash INTO v_known_type, v_known_hash
          FROM outbox._event_key(v_part, enqueue.event_id, v_tenant) k;
    END IF;
    IF NOT v_new THEN
        IF v_known_type IS DISTINCT FROM enqueue.event_type OR v_known_hash IS DISTINCT FROM v_hash THEN
            RAISE EXCEPTION 'event id % was enqueued before with another event type or payload', quote_literal(enqueue.event_id)
                USING ERRCODE = 'unique_violation',
                      HINT = 'An event id names one event (receivers deduplicate on it): enqueue a new event under a new id.';
        END IF;
        RETURN enqueue.event_id;
    END IF;
    INSERT INTO outbox.log (id, event_type, payload, tenant_id, endpoint_id, deliver_at)
    VALUES (enqueue.event_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id, enqueue.endpoint_id, v_due);
    RETURN enqueue.event_id;
END
$$;

-- What an outbox.trigger with options makes of a row change: the event type, payload and
-- tenant, or an error that says what is wrong with the trigger. Called only when the
-- trigger has arguments after the prefix (or is misused); the common case never gets here.
CREATE OR REPLACE FUNCTION outbox._trigger_event(
    tg_when text, tg_level text, tg_op text, tg_table_schema name, tg_table_name name, tg_argv text[],
    v_new jsonb, v_old jsonb,
    OUT event_type text, OUT payload jsonb, OUT tenant_id text
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- TG_ARGV counts from 0; a slice counts from 1.
    v_args     text[] := tg_argv[array_lower(tg_argv, 1):array_upper(tg_argv, 1)];
    v_prefix   text := coalesce(v_args[1], tg_table_name);
    v_column   text;
    v_exclude  text[];
    v_supabase boolean := false;
    v_opt      text;
BEGIN
    IF tg_level <> 'ROW' OR tg_when <> 'AFTER' THEN
        RAISE EXCEPTION 'outbox.trigger() must be used as an AFTER ... FOR EACH ROW trigger'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 2 .. coalesce(cardinality(v_args), 0) LOOP
        v_opt := v_args[i];
        IF strpos(v_opt, '=') = 0 AND i = 2 THEN
            v_column := v_opt;
        ELSIF starts_with(v_opt, 'tenant=') THEN
            v_column := substr(v_opt, 8);
        ELSIF starts_with(v_opt, 'exclude=') THEN
            v_exclude := regexp_split_to_array(btrim(substr(v_opt, 9)), '\s*,\s*');
        ELSIF v_opt IN ('shape=supabase', 'shape=outbox') THEN
            v_supabase := v_opt = 'shape=supabase';
        ELSE
            RAISE EXCEPTION 'outbox.trigger(): unknown argument "%" on table %.%', v_opt, tg_table_schema, tg_table_name
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Arguments: the event type prefix, then tenant=<column> (or the column alone), exclude=<column>[,<column>...], shape=outbox or shape=supabase.';
        END IF;
    END LOOP;
    IF tg_op = 'INSERT' THEN
        event_type := v_prefix || '.created';
        v_old := NULL;
    ELSIF tg_op = 'UPDATE' THEN
        event_type := v_prefix || '.updated';
    ELSIF tg_op = 'DELETE' THEN
        event_type := v_prefix || '.deleted';
        v_new := NULL;
    ELSE
        RAISE EXCEPTION 'outbox.trigger() handles INSERT, UPDATE and DELETE, not %', tg_op
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_column IS NOT NULL THEN
        IF NOT coalesce(v_new, v_old) ? v_column THEN
            RAISE EXCEPTION 'outbox.trigger(): table %.% has no column "%" for the tenant id', tg_table_schema, tg_table_name, v_column
                USING ERRCODE = 'undefined_column';
        END IF;
        tenant_id := coalesce(v_new, v_old) ->> v_column;
    END IF;
    IF v_exclude IS NOT NULL THEN
        IF NOT coalesce(v_new, v_old) ?& v_exclude THEN
            RAISE EXCEPTION 'outbox.trigger(): table %.% lacks a column of exclude=%', tg_table_schema, tg_table_name, array_to_string(v_exclude, ',')
                USING ERRCODE = 'undefined_column',
                      HINT = 'Name existing columns only: a misspelled one would be sent.';
        END IF;
        v_new := v_new - v_exclude;
        v_old := v_old - v_exclude;
    END IF;
    IF v_supabase THEN
        payload := jsonb_build_object('type', tg_op, 'table', tg_table_name, 'schema', tg_table_schema,
                                      'record', v_new, 'old_record', v_old);
    ELSIF tg_op = 'UPDATE' THEN
        payload := jsonb_build_object('schema', tg_table_schema, 'table', tg_table_name, 'op', tg_op,
                                      'record', v_new, 'old_record', v_old);
    ELSE
        payload := jsonb_build_object('schema', tg_table_schema, 'table', tg_table_name, 'op', tg_op,
                                      'record', coalesce(v_new, v_old));
    END IF;
END
$$;

-- Trigger function: AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION
-- outbox.trigger('order') enqueues order.created / order.updated / order.deleted.
-- Arguments: the event type prefix (default: the table's name); then, optionally, the
-- column holding the tenant id; then options written name=value:
--   tenant=<column>            the tenant column, as an option
--   exclude=<column>[,...]     columns left out of record and old_record (password hashes,
--                              tokens); each must exist, so a typo cannot leak a column
--   shape=supabase             the payload Supabase Database Webhooks send: {"type":
--                              "INSERT" | "UPDATE" | "DELETE", "table", "schema", "record",
--                              "old_record"} (record NULL for deletes, old_record for inserts)
-- The default shape (shape=outbox) is {"schema", "table", "op", "record", "old_record"}:
-- record is the new row (the deleted row for deletes), old_record the row before an update.
-- Without options, nothing is parsed per row (options: outbox._trigger_event). It runs as
-- the user whose statement fired it (never as the extension's owner: building the payload runs the table's types' casts and
-- output functions, which that user may have written), with the privilege grant_producer
-- gives: inserting an event into outbox.log.
CREATE OR REPLACE FUNCTION outbox.trigger()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- The common case (a row trigger with at most a prefix) in one statement: plpgsql sets
    -- up each expression it evaluates once per transaction, and a producer that writes one
    -- row per transaction pays for every one. No SET clause either (it costs a GUC save and
    -- restore per row): every name below is schema-qualified instead, so nothing on the
    -- caller's search_path can stand in for it.
    IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' AND TG_WHEN OPERATOR(pg_catalog.=) 'AFTER'
       AND TG_NARGS OPERATOR(pg_catalog.<=) 1 THEN
        INSERT INTO outbox.log (event_type, payload)
        VALUES (coalesce(TG_ARGV[0], TG_TABLE_NAME::text) OPERATOR(pg_catalog.||)
                    CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN '.created'
                         WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN '.updated'
                         ELSE '.deleted' END,
                CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE'
                     THEN pg_catalog.jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                                        'record', pg_catalog.to_jsonb(NEW), 'old_record', pg_catalog.to_jsonb(OLD))
                     ELSE pg_catalog.jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                                        'record', pg_catalog.to_jsonb(coalesce(NEW, OLD))) END);
    ELSE
        INSERT INTO outbox.log (event_type, payload, tenant_id)
        SELECT e.event_type, e.payload, e.tenant_id
          FROM outbox._trigger_event(TG_WHEN, TG_LEVEL, TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV,
                                     pg_catalog.to_jsonb(NEW), pg_catalog.to_jsonb(OLD)) e;
    END IF;
    RETURN NULL;
END
$$;

-- Who receives each event of p_events (n: its place there): the endpoint it was enqueued
-- for, unless that was deleted; otherwise every endpoint that is enabled, not deleted, of
-- the event's tenant and subscribed to its type (outbox._filter_matches) at this moment.
-- Events from outbox.trigger get their id here (outbox._log_event_id: the same on every
-- read).
CREATE OR REPLACE FUNCTION outbox._targets(p_events outbox.log[])
RETURNS TABLE (n bigint, txid xid8, seq bigint, id text, event_type text, payload jsonb, tenant_id text,
               deliver_at timestamptz, created_at timestamptz, endpoint_id uuid, ordered boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    -- plpgsql, not sql: its plan is prepared once per session instead of on every call.
    RETURN QUERY
    WITH ev AS MATERIALIZED (
        SELECT e.n, e.txid, e.seq, outbox._event_id(e.id, e.txid, e.seq, e.created_at) AS id, e.event_type,
               e.payload, e.tenant_id, e.endpoint_id, e.deliver_at, e.created_at
          FROM unnest(p_events) WITH ORDINALITY
            AS e(txid, seq, id, event_type, payload, tenant_id, endpoint_id, deliver_at, created_at, n)
    )
    SELECT ev.n, ev.txid, ev.seq, ev.id, ev.event_type, ev.payload, ev.tenant_id, ev.deliver_at,
           ev.created_at, ep.id, ep.ordered
      FROM ev JOIN outbox.endpoint ep ON ep.id = ev.endpoint_id AND ep.deleted_at IS NULL
    UNION ALL
    SELECT ev.n, ev.txid, ev.seq, ev.id, ev.event_type, ev.payload, ev.tenant_id, ev.deliver_at,
           ev.created_at, ep.id, ep.ordered
      FROM ev JOIN outbox.endpoint ep
        ON ev.endpoint_id IS NULL AND ep.enabled AND ep.deleted_at IS NULL
       AND ep.tenant_id IS NOT DISTINCT FROM ev.tenant_id
       AND outbox._filter_matches(ep.event_types, ev.event_type);
END
$$;

-- Turns events into deliveries, one per target (outbox._targets); returns how many it
-- made. Deliveries to ordered endpoints are numbered in the order of p_events. p_sent are
-- the first attempts the worker already sent from this batch (outbox._read_batch): their
-- deliveries are made as those attempts left them (dead, retrying, or still in flight
-- under p_worker's lease of p_lease) instead of pending, and are made even if the
-- endpoint no longer takes the event (it was sent: it is recorded). One that was
-- delivered is a row of outbox.history, in partition p_part, and nothing else: its event
-- gets no row of outbox.event unless another delivery needs it.
CREATE OR REPLACE FUNCTION outbox._fan_out(p_events outbox.log[], p_sent outbox._sent[] DEFAULT '{}',
                                p_worker text DEFAULT NULL, p_lease interval DEFAULT NULL,
                                p_part smallint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_made integer;
    v_fed  integer;
    v_feed boolean := outbox._feed_on();
BEGIN
    WITH target AS MATERIALIZED (
        SELECT * FROM outbox._targets(p_events)
    ),
    sent AS (
        SELECT * FROM unnest(p_sent)
    ),
    matched AS MATERIALIZED (
        -- Each target with its attempt, if one was sent, and each attempt sent to an
        -- endpoint that no longer takes the event (a full join: hashed, never a loop over
        -- the targets for every attempt).
        SELECT t.*, s.id AS d_id, s.outcome, s.status_code, s.last_error, s.next_at,
               s.txid AS s_txid, s.seq AS s_seq, s.endpoint_id AS s_endpoint_id
          FROM target t
          FULL JOIN sent s ON s.txid = t.txid::text::bigint AND s.seq = t.seq AND s.endpoint_id = t.endpoint_id
    ),
    pair AS (
        SELECT m.n, m.txid, m.seq, m.id, m.event_type, m.payload, m.tenant_id, m.deliver_at, m.created_at,
               m.endpoint_id, m.ordered, m.d_id, m.outcome, m.status_code, m.last_error, m.next_at
          FROM matched m
         WHERE m.n IS NOT NULL
        UNION ALL
        SELECT e.n, e.txid, e.seq, outbox._event_id(e.id, e.txid, e.seq, e.created_at), e.event_type,
               e.payload, e.tenant_id, e.deliver_at, e.created_at, m.s_endpoint_id, ep.ordered,
               m.d_id, m.outcome, m.status_code, m.last_error, m.next_at
          FROM matched m
          JOIN unnest(p_events) WITH ORDINALITY
            AS e(txid, seq, id, event_type, payload, tenant_id, endpoint_id, deliver_at, created_at, n)
            ON e.txid::text::bigint = m.s_txid AND e.seq = m.s_seq
          JOIN outbox.endpoint ep ON ep.id = m.s_endpoint_id
         WHERE m.n IS NULL
    ),
    judged AS (
        -- What each delivery is made as. One sent to an endpoint deleted since is done with
        -- unless it ended already: cancelled, as the delete cancelled the rest of its queue.
        SELECT p.*,
               CASE WHEN p.d_id IS NOT NULL AND (p.outcome IS NULL OR p.outcome = 'retry')
                         AND EXISTS (SELECT 1 FROM outbox.endpoint x WHERE x.id = p.endpoint_id AND x.deleted_at IS NOT NULL)
                         THEN 'cancelled'
                    WHEN p.d_id IS NULL OR p.outcome = 'retry' THEN 'pending'
                    WHEN p.outcome IS NULL THEN 'in_flight'
                    WHEN p.outcome = 'delivered' THEN 'delivered'
                    ELSE 'dead' END::outbox.delivery_status AS status
          FROM pair p
    ),
    stateful AS (
        SELECT j.* FROM judged j WHERE j.status <> 'delivered'
    ),
    events AS (
        -- An event gets its row with the first delivery that needs one.
        INSERT INTO outbox.event (id, event_type, payload, tenant_id, created_at)
        SELECT DISTINCT ON (p.id, coalesce(p.tenant_id, '')) p.id, p.event_type, p.payload, p.tenant_id, p.created_at
          FROM stateful p
        ON CONFLICT (id, tenant_key) DO NOTHING
    ),
    logged AS (
        INSERT INTO outbox.history (part, delivery_id, event_id, endpoint_id, tenant_id, event_type, payload,
                                    created_at, status_code, duration_ms, response_body, worker)
        SELECT p_part, j.d_id, j.id, j.endpoint_id, j.tenant_id, j.event_type, j.payload, j.created_at,
               j.status_code, s.duration_ms, s.response_body, p_worker
          FROM judged j
          JOIN sent s ON s.id = j.d_id
         WHERE j.status = 'delivered'
        RETURNING delivery_id AS id, endpoint_id, tenant_id, event_id
    ),
    made AS (
        INSERT INTO outbox.delivery (id, event_id, endpoint_id, tenant_id, status, attempts, due_at, lease_owner,
                                     seq, created_at, finished_at, last_attempt_at, last_status_code, last_error)
        SELECT coalesce(j.d_id, gen_random_uuid()), j.id, j.endpoint_id, j.tenant_id, j.status,
               CASE WHEN j.d_id IS NULL THEN 0 ELSE 1 END,
               CASE WHEN j.d_id IS NULL THEN coalesce(j.deliver_at, now())
                    WHEN j.status = 'in_flight' THEN now() + p_lease
                    WHEN j.status = 'pending' THEN j.next_at
                    ELSE now() END,
               CASE WHEN j.status = 'in_flight' THEN p_worker END,
               -- Every unfinished delivery to an ordered endpoint has its place in the
               -- order (one sent may have been made ordered since it was read), taken in
               -- the order of the events: the rows come sorted from the subquery, which
               -- the planner keeps as it is (it has an ORDER BY).
               CASE WHEN j.ordered AND j.status IN ('pending', 'in_flight') THEN nextval('outbox.delivery_seq') END,
               j.created_at,
               CASE WHEN j.status IN ('delivered', 'dead', 'cancelled') THEN now() END,
               CASE WHEN j.outcome IS NOT NULL THEN now() END,
               j.status_code, j.last_error
          FROM (SELECT * FROM stateful ORDER BY stateful.n, stateful.endpoint_id) j
        ON CONFLICT (event_id, endpoint_id, replay_of) DO NOTHING
        RETURNING id, endpoint_id, tenant_id, event_id
    )
    -- The live feed, when it is on, hears of each new delivery; its event type comes from
    -- a join (an event's id is unique within its tenant), not a lookup per delivery.
    SELECT count(*), count(outbox._feed(m.id, m.endpoint_id, m.tenant_id, e.event_type, 'queued', 0)) FILTER (WHERE v_feed)
      INTO v_made, v_fed
      FROM (SELECT * FROM made UNION ALL SELECT * FROM logged) m
      JOIN (SELECT DISTINCT ON (p.id, p.tenant_id) p.id, p.tenant_id, p.event_type FROM pair p) e
        ON e.id = m.event_id AND e.tenant_id IS NOT DISTINCT FROM m.tenant_id;
    RETURN v_made;
END
$$;

-- The next part of the log after cursor row c, in the batch whose snapshot is p_batch: at
-- most p_max events, and no more once their payloads reach p_max_bytes as stored (a batch
-- of large payloads must not become one array past what a backend can allocate); `more`
-- when the batch goes on beyond it. The same arguments give the same part every time: a
-- batch's events are fixed once its snapshot is taken (every transaction in it has ended),
-- and rotation keeps them until the cursor moves past them.
CREATE OR REPLACE FUNCTION outbox._read_part(c outbox.log_cursor, p_batch pg_snapshot, p_max integer, p_max_bytes bigint,
                                  OUT events outbox.log[], OUT more boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp SET enable_sort = off SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    v_late     xid8[];
    v_from     xid8;
    v_from_seq bigint;
    r          outbox.log;
    v_n        integer := 0;
    v_bytes    bigint := 0;
    v_rows     refcursor;
BEGIN
    events := '{}';
    more := false;
    -- Transactions in progress when `done` was taken that have ended since: their events
    -- lie below the range scanned last.
    v_late := ARRAY(SELECT x FROM pg_snapshot_xip(c.done) x WHERE pg_visible_in_snapshot(x, p_batch));
    -- Where the last part of this batch ended, if it is read in parts.
    v_from := coalesce(c.pos_txid, '0'::xid8);
    v_from_seq := coalesce(c.pos_seq, 0);
    -- Three ranges of the index, in (txid, seq) order one after the other, each scanned
    -- from where it starts and only as far as the part goes: the rest of the transaction
    -- the last part ended in (a transaction of many events is read in many parts), the
    -- transactions that were in progress when `done` was taken, and the newer ones the
    -- batch sees. (One query over the three would be sorted whole, the entire batch read
    -- for every part of it.)
    FOR k IN 1 .. 3 LOOP
        CASE k
        WHEN 1 THEN
            OPEN v_rows FOR SELECT l.* FROM outbox.log l
                             WHERE l.txid = v_from AND l.seq > v_from_seq
                             ORDER BY l.txid, l.seq;
        WHEN 2 THEN
            OPEN v_rows FOR SELECT l.* FROM outbox.log l
                             WHERE l.txid = ANY (v_late) AND l.txid > v_from
                             ORDER BY l.txid, l.seq;
        ELSE
            OPEN v_rows FOR SELECT l.* FROM outbox.log l
                             WHERE l.txid > v_from AND l.txid >= pg_snapshot_xmax(c.done)
                               AND l.txid < pg_snapshot_xmax(p_batch) AND pg_visible_in_snapshot(l.txid, p_batch)
                             ORDER BY l.txid, l.seq;
        END CASE;
        LOOP
            FETCH v_rows INTO r;
            EXIT WHEN NOT FOUND;
            IF v_n >= greatest(p_max, 1) OR v_bytes >= p_max_bytes THEN
                more := true;
                CLOSE v_rows;
                RETURN;
            END IF;
            events := events || r;
            v_n := v_n + 1;
            v_bytes := v_bytes + pg_column_size(r.payload);
        END LOOP;
        CLOSE v_rows;
    END LOOP;
END
$$;

-- Moves the cursor past a part read from cursor row c (p_events, of the batch p_batch).
CREATE OR REPLACE FUNCTION outbox._advance_cursor(c outbox.log_cursor, p_batch pg_snapshot, p_events outbox.log[], p_more boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n integer := cardinality(p_events);
BEGIN
    IF p_more THEN
        -- More of this batch follows: remember where this part ended.
        INSERT INTO outbox.log_cursor (done, batch, pos_txid, pos_seq, events)
        VALUES (c.done, p_batch, (p_events[v_n]).txid, (p_events[v_n]).seq, v_n);
    ELSIF v_n > 0 OR c.batch IS NOT NULL OR c.created_at < now() - interval '10 seconds' THEN
        -- The batch is read. An empty one is recorded only now and then: what it would
        -- save the next read is an index probe, and a row per idle cycle is not worth it;
        -- but `done` must move on for rotation to free old partitions.
        INSERT INTO outbox.log_cursor (done, events) VALUES (p_batch, v_n);
    END IF;
END
$$;

-- Reads the next part of the log (outbox._read_part: at most p_max events or p_max_bytes
-- of payloads) and fans it out; returns how many events it read. One reader at a time:
-- another caller meanwhile (or anyone while the worker holds a batch open) returns 0 at
-- once (its claim goes on with what is fanned out already). A batch larger than a part is
-- read over several calls, from where the last stopped. Only under READ COMMITTED: a
-- transaction whose snapshot is older than the cursor's could move it backwards.
CREATE OR REPLACE FUNCTION outbox._read_log(p_max integer DEFAULT 5000, p_max_bytes bigint DEFAULT 64 * 1024 * 1024)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c       outbox.log_cursor;
    v_batch pg_snapshot;
    v_part  record;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed'
       OR NOT pg_try_advisory_xact_lock(outbox._log_lock(), 0) THEN
        RETURN 0;
    END IF;
    SELECT * INTO c FROM outbox.log_cursor ORDER BY id DESC LIMIT 1;
    IF c.id IS NULL THEN
        RETURN 0;
    END IF;
    -- Taken before the rows are read: the read then sees at least every transaction this
    -- snapshot shows as finished (never the other way round, which would skip a commit).
    v_batch := coalesce(c.batch, pg_current_snapshot());
    SELECT * INTO v_part FROM outbox._read_part(c, v_batch, p_max, p_max_bytes);
    IF cardinality(v_part.events) > 0 THEN
        PERFORM outbox._fan_out(v_part.events);
        -- The other workers claim too: they were woken by the producers' commits, found
        -- nothing fanned out yet, and would otherwise sleep until their poll interval.
        PERFORM outbox._wake_at_commit();
    END IF;
    PERFORM outbox._advance_cursor(c, v_batch, v_part.events, v_part.more);
    RETURN cardinality(v_part.events);
END
$$;

-- Whether the attempts of the reader's open batch count in their endpoints' state rows
-- (outbox._read_batch, outbox._close_batch, outbox._account): only when other workers
-- claim beside it. A single worker keeps them in its memory, claims nothing while the
-- batch is open, and so writes an endpoint's state row about once a second under a flow
-- of successes. (An external outbox.claim of the same endpoint meanwhile does not see
-- them.)
CREATE OR REPLACE FUNCTION outbox._batches_counted()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN coalesce(nullif(current_setting('outbox.workers', true), '')::integer, 1) > 1;

-- The worker's read: the next part of the log, as outbox._read_log reads it, with the
-- first attempts that may go at once returned for sending instead of made into deliveries
-- — up to p_free of them, to endpoints that are enabled, not ordered, without a rate limit
-- and with a closed circuit, for events not scheduled later. With one worker (outcomes
-- counted in memory, see outbox._batches_counted) they are returned whatever room their
-- endpoints have, with the endpoint's max_in_flight (`cap`, NULL: no limit) and in-flight
-- count (`busy`): the worker paces them, starting each when the endpoint has room (its own
-- requests and, from `busy`, everyone else's), and those it has not started when the batch
-- closes become deliveries claimed later. So a receiver that is quick but full for a
-- moment gets its events from the batch a few milliseconds later instead of as state rows.
-- With several workers the others claim meanwhile: the attempts are counted in the state
-- rows from here on, and only those with room under max_in_flight are returned. The part
-- ends before the first event that would have to wait only for lack of room (p_free, or,
-- counted, an endpoint's max_in_flight): it stays in the log for the next read rather than
-- become a delivery claimed later. One row per attempt, each carrying the cursor row,
-- batch snapshot and part size the part was read with, which outbox._close_batch takes
-- back together with the outcomes: it reads the same part again, makes every delivery
-- (those sent as their outcomes left them, those never started pending) and moves the
-- cursor, in one transaction. Nothing of the part is
-- recorded until then: a worker that dies meanwhile leaves the part to be read again (its
-- attempts are sent again, under the same event ids). The caller must hold the reader's
-- lock (outbox._log_lock) for its session, so that no one reads the part while its
-- attempts are out. When nothing can go (or p_free is 0) the part is fanned out and the
-- cursor moved here, and no rows are returned.
CREATE OR REPLACE FUNCTION outbox._read_batch(p_free integer, p_max integer, p_max_bytes bigint,
                                   p_open_cursor bigint DEFAULT NULL, p_open_batch pg_snapshot DEFAULT NULL,
                                   p_open_more boolean DEFAULT NULL, p_open_txid bigint DEFAULT NULL,
                                   p_open_seq bigint DEFAULT NULL)
RETURNS TABLE (cursor_id bigint, batch text, part_events integer, delivery_id uuid, txid bigint, seq bigint,
               endpoint_id uuid, event_id text, url text, secret text, headers text,
               timeout_ms double precision, body text, previous_secret text, cap integer, busy integer,
               part_more boolean, part_last_txid bigint, part_last_seq bigint, part_held boolean)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    c       outbox.log_cursor;
    v_batch pg_snapshot;
    v_part  record;
    v_cap   integer := nullif((outbox._policy()).endpoint_max_in_flight, 0);
    v_paced boolean := NOT outbox._batches_counted();
    v_room  bigint;
    v_sent  integer;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed'
       OR NOT pg_try_advisory_xact_lock(outbox._log_lock(), 0) THEN
        RETURN;
    END IF;
    SELECT * INTO c FROM outbox.log_cursor ORDER BY id DESC LIMIT 1;
    IF c.id IS NULL THEN
        RETURN;
    END IF;
    IF p_open_cursor IS NOT NULL THEN
        -- The part after a batch still open (read from cursor row p_open_cursor, which must
        -- still be the newest, with snapshot p_open_batch, ending at p_open_txid/seq with
        -- p_open_more of its batch left): read from where the cursor will be once that one
        -- closes, writing nothing, so that the worker need not wait for the close to send
        -- what has committed since. One worker only (paced): with several, the others
        -- claim by the state rows, which count only what is closed. A part that has
        -- nothing to send now is left to be read after the close. (The rows returned carry
        -- p_open_cursor: the worker closes this part from the row that close writes.)
        IF NOT v_paced OR c.id <> p_open_cursor THEN
            RETURN;
        END IF;
        IF p_open_more THEN
            c := row(p_open_cursor, c.done, p_open_batch, p_open_txid::text::xid8, p_open_seq, 0, now())::outbox.log_cursor;
        ELSE
            c := row(p_open_cursor, p_open_batch, NULL, NULL, NULL, 0, now())::outbox.log_cursor;
        END IF;
    END IF;
    -- Counted: no more events than could go now, when some can: the rest would only be
    -- read again next time (the endpoints' room is an upper bound: an event goes to one or
    -- more). Paced, the worker finds the room: only p_max (its free slots) bounds the part.
    SELECT sum(greatest(least(coalesce(coalesce(e.max_in_flight, v_cap) - s.in_flight, p_free), p_free), 0))
      INTO v_room
      FROM outbox.endpoint e
      JOIN outbox.endpoint_state s ON s.endpoint_id = e.id
     WHERE e.enabled AND e.deleted_at IS NULL AND NOT e.ordered AND e.rate_limit IS NULL
       AND s.circuit = 'closed' AND NOT v_paced;
    IF v_room > 0 AND p_free > 0 THEN
        p_max := least(p_max, v_room);
    END IF;
    v_batch := coalesce(c.batch, pg_current_snapshot());
    SELECT * INTO v_part FROM outbox._read_part(c, v_batch, p_max, p_max_bytes);
    IF cardinality(v_part.events) = 0 THEN
        IF p_open_cursor IS NULL THEN
            PERFORM outbox._advance_cursor(c, v_batch, v_part.events, v_part.more);
        END IF;
        RETURN;
    END IF;

    RETURN QUERY
    WITH target AS MATERIALIZED (
        SELECT * FROM outbox._targets(v_part.events)
    ),
    free AS (
        -- State rows someone holds (an operator, another sender's ack) are passed by: those
        -- endpoints' events become deliveries, claimed later.
        SELECT s.endpoint_id, s.in_flight FROM outbox.endpoint_state s
         WHERE s.endpoint_id IN (SELECT t.endpoint_id FROM target t) AND s.circuit = 'closed'
         ORDER BY s.endpoint_id
           FOR UPDATE SKIP LOCKED
    ),
    candidate AS (
        SELECT t.*, e.url, e.secret, e.headers, e.timeout,
               CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END AS previous_secret,
               f.in_flight, coalesce(e.max_in_flight, v_cap) AS cap,
               row_number() OVER (PARTITION BY t.endpoint_id ORDER BY t.n) AS k
          FROM target t
          JOIN outbox.endpoint e ON e.id = t.endpoint_id
          JOIN free f ON f.endpoint_id = t.endpoint_id
         WHERE e.enabled AND e.deleted_at IS NULL AND NOT e.ordered AND e.rate_limit IS NULL
           AND (t.deliver_at IS NULL OR t.deliver_at <= now())
    ),
    roomy AS (
        -- Counted: room under the endpoint's max_in_flight (NULL: no limit), then a free
        -- request slot. Paced: the worker finds the room as the requests go.
        SELECT x.*, v_paced OR coalesce(x.in_flight + x.k <= x.cap, true) AS room
          FROM candidate x
    ),
    ranked AS MATERIALIZED (
        SELECT y.*,
               y.room AND row_number() OVER (PARTITION BY y.room ORDER BY y.n, y.endpoint_id) <= p_free AS go,
               -- The part ends before an attempt that finds no free slot (so that a crash
               -- sends again at most as many attempts as the worker has request slots), or,
               -- counted, none left at an endpoint that had room when the part was read. An
               -- endpoint full from the start (a slow receiver) ends nothing: its events
               -- become deliveries claimed as it drains, and the others' go on.
               CASE WHEN y.room THEN row_number() OVER (PARTITION BY y.room ORDER BY y.n, y.endpoint_id) > p_free
                    ELSE y.in_flight < y.cap END AS ends_part
          FROM roomy y
    ),
    cut AS (
        -- The first event (after the first) with an attempt that ends the part.
        SELECT coalesce(min(r.n) FILTER (WHERE r.ends_part AND r.n > 1), cardinality(v_part.events) + 1) AS n
          FROM ranked r
    ),
    chosen AS (
        SELECT r.* FROM ranked r, cut
         WHERE r.n < cut.n AND r.go
    ),
    held AS (
        -- Whether the close makes queued deliveries of the part (targets not sent from it:
        -- held endpoints, scheduled events, no room), which only a claim sends.
        SELECT (SELECT count(*) FROM target t, cut WHERE t.n < cut.n) > (SELECT count(*) FROM chosen) AS some
    ),
    counted AS (
        UPDATE outbox.endpoint_state s SET in_flight = s.in_flight + x.n
          FROM (SELECT ch.endpoint_id, count(*)::integer AS n FROM chosen ch GROUP BY ch.endpoint_id) x
         WHERE s.endpoint_id = x.endpoint_id AND outbox._batches_counted()
    )
    SELECT c.id, v_batch::text, (cut.n - 1)::integer, gen_random_uuid(), ch.txid::text::bigint, ch.seq,
           ch.endpoint_id, ch.id, ch.url, ch.secret, ch.headers::text,
           extract(epoch FROM ch.timeout)::double precision * 1000,
           outbox._body(ch.event_type, ch.created_at, ch.payload), ch.previous_secret,
           CASE WHEN v_paced THEN ch.cap END, CASE WHEN v_paced THEN ch.in_flight END,
           -- Where the cursor will be once the part closes (as outbox._advance_cursor puts
           -- it after outbox._close_batch reads the cut part again): for the next read
           -- while this part is open.
           v_part.more OR cut.n - 1 < cardinality(v_part.events),
           (v_part.events[cut.n - 1]).txid::text::bigint, (v_part.events[cut.n - 1]).seq,
           held.some
      FROM chosen ch, cut, held
     ORDER BY ch.n, ch.endpoint_id;
    GET DIAGNOSTICS v_sent = ROW_COUNT;
    IF v_sent = 0 AND p_open_cursor IS NULL THEN
        -- Nothing can go at once: the whole part becomes deliveries, claimed as they can go.
        PERFORM outbox._fan_out(v_part.events);
        PERFORM outbox._wake_at_commit();
        PERFORM outbox._advance_cursor(c, v_batch, v_part.events, v_part.more);
    END IF;
END
$$;

-- The advisory lock that makes one reader at a time (its second key is 0); derived from
-- the log's OID, so it names this database's log and no user's own lock.
CREATE OR REPLACE FUNCTION outbox._log_lock()
RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ('outbox.log'::regclass::oid::bigint % 2147483647)::integer;

-- Sets every endpoint's in-flight count to its deliveries in flight where the two differ;
-- returns how many it corrected. The reader runs it when it starts and once a second: an
-- attempt from a batch whose endpoint's state row someone held when the batch closed is
-- written in flight without being counted (outbox._close_batch never waits), and its
-- acknowledgement later takes one off. State rows someone holds are passed by; a row is
-- written only when its count is wrong.
CREATE OR REPLACE FUNCTION outbox._recount_endpoints()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_n  integer := 0;
    v_id uuid;
BEGIN
    -- Candidates first, without locking anything; each is then locked (passed by if
    -- someone holds it) and counted again by a statement that starts after the lock: a
    -- claim or ack that committed in between is in that count, and later ones wait.
    FOR v_id IN
        SELECT s.endpoint_id FROM outbox.endpoint_state s
         WHERE s.in_flight <> (SELECT count(*) FROM outbox.delivery d
                                WHERE d.endpoint_id = s.endpoint_id AND d.status = 'in_flight')
    LOOP
        PERFORM 1 FROM outbox.endpoint_state s WHERE s.endpoint_id = v_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        UPDATE outbox.endpoint_state s
           SET in_flight = (SELECT count(*) FROM outbox.delivery d
                             WHERE d.endpoint_id = v_id AND d.status = 'in_flight')
         WHERE s.endpoint_id = v_id;
        v_n := v_n + 1;
    END LOOP;
    RETURN v_n;
END
$$;

-- Makes the calling session the log's reader for as long as it lasts (the session lock
-- of outbox._log_lock), if no one else is; returns whether it is. Every endpoint's
-- in-flight count is set to its deliveries in flight then, correcting any count left wrong
-- (state rows someone holds are left for the claim's own recount).
CREATE OR REPLACE FUNCTION outbox._become_reader()
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
BEGIN
    IF NOT pg_try_advisory_lock(outbox._log_lock(), 0) THEN
        RETURN false;
    END IF;
    PERFORM outbox._recount_endpoints();
    RETURN true;
END
$$;

-- Whether a batch is read in part: the worker then comes back at once instead of sleeping.
CREATE OR REPLACE FUNCTION outbox._log_behind()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT c.batch IS NOT NULL FROM outbox.log_cursor c ORDER BY c.id DESC LIMIT 1);

-- Frees what has been read, without DELETE: truncates each log partition all of whose
-- rows were read, and the cursor's old rows. A partition takes the transaction ids of every
-- third window of 65,536 (outbox._log_part): it may go once every transaction id of the
-- windows it has taken so far is below the xmin of the cursor's `done` snapshot (all ended
-- and read). Producers are writing to another partition then, so this never waits on them
-- and they never wait on it; a lock anyone else holds (a query reading the log) makes it
-- try again later (NOWAIT). Returns how many tables it truncated.
CREATE OR REPLACE FUNCTION outbox._rotate_log()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_done    pg_snapshot;
    v_n       integer := 0;
    v_keep    outbox.log_cursor;
    v_rows    boolean;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN 0;
    END IF;
    FOR p IN 0 .. 2 LOOP
        SELECT c.done INTO v_done FROM outbox.log_cursor c ORDER BY c.id DESC LIMIT 1;
        CONTINUE WHEN v_done IS NULL OR NOT outbox._log_part_read(p, v_done);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM outbox.%I)', 'log_' || p) INTO v_rows;
        CONTINUE WHEN NOT v_rows;
        BEGIN
            EXECUTE format('LOCK TABLE outbox.%I IN ACCESS EXCLUSIVE MODE NOWAIT', 'log_' || p);
            -- Again under the lock, with a new snapshot: whoever wrote to the partition has
            -- ended (or waits for this lock, and writes after the truncation).
            IF outbox._log_part_read(p, v_done) THEN
                EXECUTE format('TRUNCATE outbox.%I', 'log_' || p);
                v_n := v_n + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;

    -- The cursor's history: only its newest row counts.
    IF (SELECT count(*) FROM (SELECT 1 FROM outbox.log_cursor LIMIT 1001) x) > 1000
       AND pg_try_advisory_xact_lock(outbox._log_lock(), 0) THEN
        BEGIN
            LOCK TABLE outbox.log_cursor IN ACCESS EXCLUSIVE MODE NOWAIT;
            SELECT * INTO v_keep FROM outbox.log_cursor c ORDER BY c.id DESC LIMIT 1;
            TRUNCATE outbox.log_cursor;
            INSERT INTO outbox.log_cursor OVERRIDING SYSTEM VALUE SELECT v_keep.*;
            v_n := v_n + 1;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END IF;
    RETURN v_n;
END
$$;

-- Whether every row that partition p (of outbox._log_part) can hold so far was read by
-- the cursor whose `done` snapshot is given: its newest window that has begun (judged by
-- a snapshot taken now) ends at or below done's xmin.
CREATE OR REPLACE FUNCTION outbox._log_part_read(p integer, done pg_snapshot)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Every transaction that has ended is below it.
    v_hi     bigint := pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1;
    v_window bigint := v_hi >> 16;
BEGIN
    -- The newest window up to v_window that maps to p.
    v_window := v_window - ((v_window % 3) - p + 3) % 3;
    RETURN ((v_window + 1) << 16) <= pg_snapshot_xmin(done)::text::bigint;
END
$$;

-- Claims up to p_batch_size due deliveries: each is set in_flight with its lease running
-- until now() + lease and its attempt number incremented; the attempt number is the fencing
-- token the ack must present. Leases that expired are first made pending again
-- (outbox._requeue_expired), so their deliveries are claimed like any other.
--
-- It goes endpoint by endpoint, the endpoint with the oldest due delivery first, and takes
-- from each what its policy allows right now:
--   circuit open (before its probe time): nothing; open after it, or half-open: one probe,
--     when nothing else is in flight there;
--   ordered: its oldest unfinished delivery, when that is due (so never while one is in
--     flight);
--   max_in_flight (or outbox.endpoint_max_in_flight): up to the free slots;
--   rate_limit: what the token bucket holds (one second's worth at most).
-- The endpoint's state row is locked (SKIP LOCKED) while it is served: its in-flight
-- counter, token bucket and circuit change with the claim, and another claimer serving the
-- same endpoint at that moment makes this one pass it by. Each endpoint's rows come from
-- its own range of delivery_pending_idx in due order, so a blocked endpoint's backlog is
-- never read by the claims of the others. Sequential scans, sorts and bitmap scans are
-- priced out: the plans, prepared once per session, stay index scans in due order whatever
-- the statistics said when they were made (a plan made while the tables were small would
-- otherwise hash-join whole tables once they are large). (JIT is off: the priced-out sort
-- of the few endpoints would otherwise look expensive enough to compile, which costs far
-- more than the claim.)
CREATE OR REPLACE FUNCTION outbox._claim(
    p_batch_size integer, p_worker text, p_lease interval, p_endpoint_id uuid, p_tenant_id text
)
RETURNS TABLE (o_delivery_id uuid, o_event_id text, o_attempt integer, o_endpoint_id uuid, o_url text,
               o_secret text, o_headers jsonb, o_timeout interval, o_event_type text, o_body text,
               o_tenant_id text, o_previous_secret text)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_sort = off SET enable_bitmapscan = off SET jit = off
AS $$
DECLARE
    v_left    integer := outbox._check_claim(p_batch_size, p_lease);
    v_cap     integer := nullif((outbox._policy()).endpoint_max_in_flight, 0);
    v_ep      record;
    v_st      outbox.endpoint_state;
    v_quota   integer;
    v_ids     uuid[];
    v_got     integer;
BEGIN
    PERFORM outbox._requeue_expired(p_endpoint_id);
    FOR v_ep IN
        SELECT e.id, e.ordered, e.rate_limit, coalesce(e.max_in_flight, v_cap) AS cap
          FROM outbox.endpoint e
          JOIN outbox.endpoint_state s ON s.endpoint_id = e.id
         CROSS JOIN LATERAL (
               SELECT d.due_at FROM outbox.delivery d
                WHERE d.endpoint_id = e.id AND d.status = 'pending'
                ORDER BY d.due_at LIMIT 1) f
         WHERE e.enabled AND e.deleted_at IS NULL
           AND (p_endpoint_id IS NULL OR e.id = p_endpoint_id)
           AND f.due_at <= now()
           AND (s.circuit <> 'open' OR s.next_probe_at <= now())
           AND (e.rate_limit IS NULL OR s.rate_tat IS NULL
                OR s.rate_tat <= now() + interval '1 second' - interval '1 second' / e.rate_limit)
         ORDER BY f.due_at
    LOOP
        EXIT WHEN v_left <= 0;
        SELECT * INTO v_st FROM outbox.endpoint_state s WHERE s.endpoint_id = v_ep.id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND OR (v_st.circuit = 'open' AND v_st.next_probe_at > now());

        v_quota := v_left;
        IF v_st.circuit <> 'closed' THEN
            v_quota := least(v_quota, 1 - v_st.in_flight);
        ELSIF v_ep.cap IS NOT NULL AND NOT v_ep.ordered THEN
            v_quota := least(v_quota, v_ep.cap - v_st.in_flight);
            IF v_quota <= 0 THEN
                v_quota := least(v_left, v_ep.cap - outbox._recount_in_flight(v_ep.id));
            END IF;
        END IF;
        IF v_ep.rate_limit IS NOT NULL THEN
            v_quota := least(v_quota, floor(extract(epoch FROM now() + interval '1 second'
                             - greatest(coalesce(v_st.rate_tat, now()), now())) * v_ep.rate_limit)::integer);
        END IF;
        CONTINUE WHEN v_quota <= 0;

        IF v_ep.ordered THEN
            -- Only the head of its queue may go, and only once it is due: a retrying head
            -- holds back everything behind it, and so does one in flight.
            SELECT array_agg(h.id) INTO v_ids
              FROM (SELECT d.id FROM outbox.delivery d
                     WHERE d.id = (SELECT q.id FROM outbox.delivery q
                                    WHERE q.endpoint_id = v_ep.id AND q.seq IS NOT NULL
                                      AND q.status IN ('pending', 'in_flight')
                                    ORDER BY q.seq LIMIT 1)
                       AND d.status = 'pending' AND d.due_at <= now()
                       AND (p_tenant_id IS NULL OR d.tenant_id = p_tenant_id)
                       FOR UPDATE SKIP LOCKED) h;
        ELSE
            SELECT array_agg(x.id) INTO v_ids
              FROM (SELECT d.id FROM outbox.delivery d
                     WHERE d.endpoint_id = v_ep.id AND d.status = 'pending' AND d.due_at <= now()
                       AND (p_tenant_id IS NULL OR d.tenant_id = p_tenant_id)
                     ORDER BY d.due_at
                     LIMIT v_quota
                       FOR UPDATE SKIP LOCKED) x;
        END IF;
        CONTINUE WHEN v_ids IS NULL;

        RETURN QUERY
        UPDATE outbox.delivery d
           SET status = 'in_flight',
               attempts = d.attempts + 1,
               due_at = now() + p_lease,
               lease_owner = p_worker
          FROM outbox.endpoint e, outbox.event ev
         WHERE d.id = ANY (v_ids) AND e.id = d.endpoint_id
           AND ev.id = d.event_id AND ev.tenant_key = d.tenant_key
        RETURNING d.id, d.event_id, d.attempts, d.endpoint_id, e.url, e.secret, e.headers, e.timeout,
                  ev.event_type,
                  outbox._body(ev.event_type, ev.created_at, ev.payload),
                  d.tenant_id,
                  CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END;
        GET DIAGNOSTICS v_got = ROW_COUNT;
        v_left := v_left - v_got;

        UPDATE outbox.endpoint_state s
           SET in_flight = s.in_flight + v_got,
               rate_tat = CASE WHEN v_ep.rate_limit IS NULL THEN s.rate_tat
                               ELSE greatest(coalesce(s.rate_tat, now()), now())
                                    + v_got * interval '1 second' / v_ep.rate_limit END,
               circuit = CASE WHEN s.circuit = 'open' THEN 'half_open' ELSE s.circuit END,
               circuit_changed_at = CASE WHEN s.circuit = 'open' THEN now() ELSE s.circuit_changed_at END
         WHERE s.endpoint_id = v_ep.id;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION outbox.claim(
    batch_size  integer  DEFAULT 100,
    worker      text     DEFAULT 'sql',
    lease       interval DEFAULT '60 seconds',
    endpoint_id uuid     DEFAULT NULL,
    tenant_id   text     DEFAULT NULL
)
RETURNS TABLE (
    delivery_id uuid,
    event_id    text,
    attempt     integer,
    endpoint_id uuid,
    url         text,
    secret      text,
    headers     jsonb,
    timeout     interval,
    event_type  text,
    body        text,
    tenant_id   text,
    -- The secret being rotated out, while it is still valid: sign with both.
    previous_secret text
)
LANGUAGE sql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    -- What committed since the last claim becomes deliveries first; not inside a
    -- transaction block, where what is read would wait for the caller's commit.
    SELECT outbox._read_log() WHERE NOT outbox._in_transaction_block();
    SELECT * FROM outbox._claim(claim.batch_size, claim.worker, claim.lease, claim.endpoint_id, claim.tenant_id)
$$;

-- What senders report, made ready to record: texts from receivers and senders bounded
-- before anything stores or announces them (errors to outbox._max_error_bytes(), bodies to
-- outbox.max_response_body); a retry's time (the retry schedule counts the attempts since
-- the last retry_dead; a time a sender asks for stays within the range enqueue allows);
-- a retry past the schedule's end made 'dead'. An outcome NULL (an attempt still in
-- flight, from outbox._close_batch) stays NULL. The arrays are outbox.ack_batch's.
CREATE OR REPLACE FUNCTION outbox._decided(
    ids uuid[], attempts integer[], outcomes outbox.attempt_outcome[], status_codes integer[],
    errors text[], durations_ms double precision[], retry_at timestamptz[], response_bodies text[]
)
RETURNS TABLE (id uuid, attempt integer, outcome outbox.attempt_outcome, final_outcome outbox.attempt_outcome,
               status_code integer, error text, last_error text, duration_ms double precision,
               response_body text, next_at timestamptz)
LANGUAGE plpgsql STABLE ROWS 100
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    -- plpgsql, not sql: its plan is prepared once per session instead of on every call.
    RETURN QUERY
    WITH input AS (
        SELECT i.id, i.attempt, i.outcome, i.status_code,
               CASE WHEN octet_length(i.error) > outbox._max_error_bytes()
                    THEN outbox._truncate(i.error, outbox._max_error_bytes()) ELSE i.error END AS error,
               i.duration_ms, i.retry_at,
               CASE WHEN octet_length(i.response_body) > lim.body_bytes
                    THEN outbox._truncate(i.response_body, lim.body_bytes) ELSE i.response_body END AS response_body
          FROM unnest(_decided.ids, _decided.attempts, _decided.outcomes, _decided.status_codes, _decided.errors,
                      _decided.durations_ms, _decided.retry_at, _decided.response_bodies)
               AS i(id, attempt, outcome, status_code, error, duration_ms, retry_at, response_body),
               (SELECT outbox._max_response_body() AS body_bytes) lim
         WHERE outbox._check_ack_lengths(ARRAY[
                   cardinality(_decided.ids), cardinality(_decided.attempts), cardinality(_decided.outcomes),
                   cardinality(_decided.status_codes), cardinality(_decided.errors),
                   cardinality(_decided.durations_ms), cardinality(_decided.retry_at),
                   cardinality(_decided.response_bodies)])
    ),
    scheduled AS (
        SELECT input.*,
               CASE WHEN input.outcome IS DISTINCT FROM 'retry' THEN NULL
                    WHEN input.retry_at IS NOT NULL
                         THEN least(greatest(input.retry_at, now()), now() + outbox._max_schedule_ahead())
                    ELSE now() + outbox.retry_delay(input.attempt - coalesce(d.retry_base, 0)) END AS next_at
          FROM input LEFT JOIN outbox.delivery d ON d.id = input.id
    )
    SELECT s.id, s.attempt, s.outcome, f.final_outcome, s.status_code, s.error,
           CASE WHEN f.final_outcome = 'dead' AND s.outcome = 'retry'
                THEN concat_ws(': ', s.error, 'retry schedule exhausted') ELSE s.error END,
           s.duration_ms, s.response_body, s.next_at
      FROM scheduled s
     CROSS JOIN LATERAL (
           SELECT CASE WHEN s.outcome = 'retry' AND s.next_at IS NULL THEN 'dead'::outbox.attempt_outcome
                       ELSE s.outcome END AS final_outcome) f;
END
$$;

-- Everything that follows finished attempts (p_rows), whoever sent them: their history
-- rows, their endpoints' health and circuit breakers, auto-disable, the hourly
-- statistics, the live feed and operator events. Returns the deliveries' ids. The callers
-- (outbox.ack_batch, outbox._close_batch) have locked the endpoints' state rows first, in
-- endpoint order. p_logged: the rows are first attempts sent from a batch of the log
-- (outbox._close_batch): those that were delivered are rows of outbox.history, which are
-- their attempts' history too; and unless outbox._batches_counted, none was counted in
-- its endpoint's in-flight count. Then an endpoint whose state would only learn of another
-- success is left alone if it learnt of one less than a second ago: under a steady flow
-- its state row is written once a second instead of once a batch (an old snapshot keeps
-- every version of it).
CREATE OR REPLACE FUNCTION outbox._account(p_rows outbox._settled[], p_worker text, p_logged boolean DEFAULT false)
RETURNS SETOF uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_uncounted boolean := p_logged AND NOT outbox._batches_counted();
BEGIN
    -- plpgsql, not sql: its plan is prepared once per session instead of on every call.
    RETURN QUERY
    WITH upd AS (
        SELECT u.*, u.outcome AS final_outcome FROM unnest(p_rows) u
    ),
    hist AS (
        INSERT INTO outbox.attempt (delivery_id, attempt, outcome, status_code, error, duration_ms, response_body, worker)
        SELECT upd.id, upd.attempt, upd.final_outcome, upd.status_code, upd.error, upd.duration_ms,
               upd.response_body, p_worker
          FROM upd
         WHERE NOT (p_logged AND upd.final_outcome = 'delivered')
    ),
    batch AS (
        -- Per endpoint: what this batch finished, and whether any of it succeeded.
        SELECT upd.endpoint_id,
               count(*)::integer AS finished,
               (count(*) FILTER (WHERE upd.final_outcome <> 'delivered'))::integer AS failures,
               bool_or(upd.final_outcome = 'delivered') AS succeeded,
               max(upd.error) FILTER (WHERE upd.final_outcome <> 'delivered') AS error
          FROM upd
         GROUP BY upd.endpoint_id
    ),
    health AS (
        -- A success in the batch resets the failure streak, otherwise the batch's failures
        -- extend it; the circuit breaker takes its step (outbox._circuit_next) and announces
        -- when the circuit opens or closes again; the finished attempts leave the in-flight
        -- count.
        UPDATE outbox.endpoint_state s
           SET in_flight = CASE WHEN v_uncounted THEN s.in_flight ELSE greatest(s.in_flight - b.finished, 0) END,
               consecutive_failures = CASE WHEN b.succeeded THEN b.failures
                                           ELSE s.consecutive_failures + b.failures END,
               last_success_at = CASE WHEN b.succeeded THEN now() ELSE s.last_success_at END,
               last_failure_at = CASE WHEN b.failures > 0 THEN now() ELSE s.last_failure_at END,
               last_error = coalesce(b.error, s.last_error),
               updated_at = now(),
               failing_since = CASE WHEN b.succeeded THEN NULL ELSE coalesce(s.failing_since, now()) END,
               (circuit, cooldown, next_probe_at, circuit_opened_at, circuit_changed_at) =
                   (SELECT n.circuit, n.cooldown, n.next_probe_at, n.opened_at, n.changed_at
                      FROM outbox._circuit_next(s.circuit, s.cooldown, s.next_probe_at, s.circuit_opened_at,
                                                s.circuit_changed_at, s.consecutive_failures + b.failures,
                                                b.succeeded) n)
          FROM batch b
         WHERE s.endpoint_id = b.endpoint_id
           AND NOT (v_uncounted AND b.failures = 0 AND s.consecutive_failures = 0 AND s.circuit = 'closed'
                    AND s.failing_since IS NULL AND coalesce(s.last_success_at > now() - interval '1 second', false))
        RETURNING s.endpoint_id, s.failing_since,
                  CASE WHEN s.circuit_changed_at = now()
                            AND (s.circuit = 'closed' OR s.circuit_opened_at = now()) THEN
                      outbox._operator_event(
                          CASE s.circuit WHEN 'closed' THEN 'outbox.endpoint.circuit_closed'
                                         ELSE 'outbox.endpoint.circuit_opened' END,
                          jsonb_build_object('endpoint_id', s.endpoint_id,
                                             'consecutive_failures', s.consecutive_failures,
                                             'next_probe_at', s.next_probe_at, 'last_error', s.last_error),
                          s.endpoint_id)
                  END AS announced
    ),
    disabled AS (
        -- Stop sending where the receiver answered 410 Gone, or where every attempt has
        -- failed for outbox.auto_disable_after. Its queue stays; enabling resumes it. An
        -- endpoint row someone holds (an operator's open transaction) is not waited for:
        -- the next failing batch disables it.
        UPDATE outbox.endpoint e
           SET enabled = false, disabled_reason = x.reason, updated_at = now()
          FROM (SELECT DISTINCT ON (c.endpoint_id) c.endpoint_id, c.reason
                  FROM (SELECT upd.endpoint_id, 'receiver answered 410 Gone' AS reason
                          FROM upd
                         WHERE upd.status_code = 410 AND upd.final_outcome = 'dead'
                        UNION ALL
                        SELECT h.endpoint_id,
                               format('every attempt failed since %s: disabled after %s of failures',
                                      date_trunc('second', h.failing_since), p.auto_disable_after)
                          FROM health h, outbox._policy() p
                         WHERE p.auto_disable_after > interval '0'
                           AND h.failing_since <= now() - p.auto_disable_after) c
                 ORDER BY c.endpoint_id) x
         WHERE e.id = x.endpoint_id AND e.enabled
           AND e.id IN (SELECT l.id FROM outbox.endpoint l WHERE l.id = x.endpoint_id
                          FOR NO KEY UPDATE SKIP LOCKED)
        RETURNING e.id,
                  outbox._operator_event('outbox.endpoint.disabled',
                      jsonb_build_object('endpoint_id', e.id, 'url', e.url, 'reason', x.reason), e.id)
    ),
    rollup AS (
        INSERT INTO outbox.stats_hourly AS r
               (hour, endpoint_id, event_type, tenant_id, outcome, latency_bucket, deliveries, attempts, latency_ms_sum)
        SELECT date_trunc('hour', now()), upd.endpoint_id, upd.event_type, coalesce(upd.tenant_id, ''),
               CASE WHEN upd.final_outcome = 'delivered' THEN 'delivered'::outbox.delivery_status
                    ELSE 'dead'::outbox.delivery_status END,
               width_bucket(l.ms, outbox._bucket_bounds()), count(*), sum(upd.attempt), sum(l.ms)
          FROM upd
          CROSS JOIN LATERAL (SELECT extract(epoch FROM now() - upd.created_at) * 1000 AS ms) l
         WHERE upd.final_outcome IN ('delivered', 'dead')
         GROUP BY 1, 2, 3, 4, 5, 6
        ON CONFLICT (hour, endpoint_id, event_type, tenant_id, outcome, latency_bucket) DO UPDATE SET
               deliveries = r.deliveries + excluded.deliveries,
               attempts = r.attempts + excluded.attempts,
               latency_ms_sum = r.latency_ms_sum + excluded.latency_ms_sum
    )
    -- Announcements: the live feed for every change (when outbox.live_feed is on), and an
    -- operator event for every delivery that died (disabled endpoints and circuits are
    -- announced by `disabled` and `health` above).
    SELECT upd.id
      FROM upd
      LEFT JOIN LATERAL (
          SELECT outbox._feed(upd.id, upd.endpoint_id, upd.tenant_id, upd.event_type,
                              CASE upd.final_outcome WHEN 'retry' THEN 'retrying' ELSE upd.final_outcome::text END,
                              upd.attempt)
           WHERE outbox._feed_on()) feed ON true
      LEFT JOIN LATERAL (
          SELECT outbox._operator_event('outbox.delivery.dead',
                     jsonb_build_object('delivery_id', upd.id, 'endpoint_id', upd.endpoint_id, 'event_id', upd.event_id,
                                        'event_type', upd.event_type, 'attempts', upd.attempt,
                                        'status_code', upd.status_code, 'error', upd.error),
                     upd.endpoint_id)
           WHERE upd.final_outcome = 'dead') dead ON true;
END
$$;

-- Records the outcomes of many attempts at once and returns the deliveries whose outcome was
-- accepted. An outcome is accepted only from the holder of the current attempt: the delivery
-- must be in_flight with exactly that attempt number; anything else (a lease that expired and
-- was claimed again, a cancelled delivery, a repeated ack) changes nothing.
-- A 'retry' without retry_at is scheduled by outbox.retry_delay(attempt) (the
-- outbox.retry_schedule GUC); when the schedule is exhausted the delivery is dead.
CREATE OR REPLACE FUNCTION outbox.ack_batch(
    delivery_ids  uuid[],
    attempts      integer[],
    outcomes      outbox.attempt_outcome[],
    status_codes  integer[]          DEFAULT NULL,
    errors        text[]             DEFAULT NULL,
    durations_ms  double precision[] DEFAULT NULL,
    retry_at      timestamptz[]      DEFAULT NULL,
    response_bodies text[]           DEFAULT NULL,
    worker        text               DEFAULT NULL
)
RETURNS SETOF uuid
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_rows outbox._settled[];
BEGIN
    -- The endpoints' state rows first, in endpoint order, before anything else is written:
    -- the bookkeeping writes them together with other rows (the hourly statistics, the
    -- deliveries), in an order no one controls, and two ackers of one endpoint (the
    -- worker and an external sender) that took those in opposite orders would deadlock.
    PERFORM 1 FROM outbox.endpoint_state s
     WHERE s.endpoint_id IN (SELECT d.endpoint_id FROM outbox.delivery d WHERE d.id = ANY (ack_batch.delivery_ids))
     ORDER BY s.endpoint_id
       FOR UPDATE;
    WITH x AS (
        SELECT * FROM outbox._decided(ack_batch.delivery_ids, ack_batch.attempts, ack_batch.outcomes,
                                      ack_batch.status_codes, ack_batch.errors, ack_batch.durations_ms,
                                      ack_batch.retry_at, ack_batch.response_bodies)
    ),
    upd AS (
        -- Everything later steps need comes out of RETURNING, so they never join back to
        -- the input (which the planner can only guess the size of).
        UPDATE outbox.delivery d
           SET status = CASE x.final_outcome WHEN 'delivered' THEN 'delivered'::outbox.delivery_status
                                             WHEN 'dead' THEN 'dead'::outbox.delivery_status
                                             ELSE 'pending'::outbox.delivery_status END,
               due_at = coalesce(x.next_at, d.due_at),
               finished_at = CASE WHEN x.final_outcome = 'retry' THEN NULL ELSE now() END,
               lease_owner = NULL,
               last_attempt_at = now(),
               last_status_code = x.status_code,
               last_error = x.last_error
          FROM x, outbox.event ev
         -- status is compared as text so that no plan can read delivery_in_flight_idx whole
         -- (a plan cached while few rows were in flight would): each row is found by its id.
         WHERE d.id = x.id AND d.status::text = 'in_flight' AND d.attempts = x.attempt
           AND ev.id = d.event_id AND ev.tenant_key = d.tenant_key
        RETURNING row(d.id, d.endpoint_id, d.event_id, d.tenant_id, d.created_at, x.attempt, x.final_outcome,
                      x.status_code, x.error, x.duration_ms, x.response_body, ev.event_type)::outbox._settled AS r
    )
    SELECT coalesce(array_agg(upd.r), '{}') INTO v_rows FROM upd;
    RETURN QUERY SELECT a.id FROM outbox._account(v_rows, ack_batch.worker) AS a(id);
END
$$;

-- Closes a batch the worker read with outbox._read_batch: reads the same part again
-- (p_cursor must still be the cursor's newest row, p_batch its snapshot, p_max and
-- p_max_bytes the read's bounds), makes its deliveries (outbox._fan_out) — those the worker
-- sent (p_ids, with the event's place p_txids/p_seqs and p_endpoints) as their attempts
-- left them: the outcome arrays, as outbox.ack_batch's, NULL where the attempt is still in
-- flight (its delivery is then in flight under p_worker's lease of p_lease, and its outcome
-- acknowledged as any other) — records the outcomes (outbox._account) and moves the
-- cursor on, all in the caller's transaction. So a first attempt that succeeds costs one
-- row of outbox.history, appended once. It never waits for a lock: an outcome whose endpoint's state
-- row someone holds (an operator's open transaction, another sender's ack) is not
-- recorded now; its delivery is made in flight, and its id returned, for the caller to
-- acknowledge later with outbox.ack_batch (its endpoint's in-flight count, which cannot be
-- raised then, is one low until outbox._recount_endpoints corrects it).
CREATE OR REPLACE FUNCTION outbox._close_batch(
    p_cursor bigint, p_batch pg_snapshot, p_max integer, p_max_bytes bigint,
    p_ids uuid[], p_txids bigint[], p_seqs bigint[], p_endpoints uuid[],
    attempts integer[], outcomes outbox.attempt_outcome[], status_codes integer[], errors text[],
    durations_ms double precision[], retry_at timestamptz[], response_bodies text[],
    p_worker text, p_lease interval
)
RETURNS SETOF uuid
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    c      outbox.log_cursor;
    v_part record;
    v_free uuid[];
    v_sent outbox._sent[];
    v_rows outbox._settled[];
BEGIN
    SELECT * INTO c FROM outbox.log_cursor ORDER BY id DESC LIMIT 1;
    IF NOT pg_try_advisory_xact_lock(outbox._log_lock(), 0) OR c.id IS DISTINCT FROM p_cursor THEN
        RAISE EXCEPTION 'the batch read from log cursor % can no longer be closed: the log was read past it', p_cursor
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only the session holding the reader''s lock may read the log while a batch is open.';
    END IF;
    SELECT * INTO v_part FROM outbox._read_part(c, p_batch, p_max, p_max_bytes);
    -- The endpoints whose outcomes are recorded now: their state rows, in endpoint order.
    v_free := ARRAY(SELECT s.endpoint_id FROM outbox.endpoint_state s
                     WHERE s.endpoint_id = ANY (p_endpoints)
                     ORDER BY s.endpoint_id
                       FOR UPDATE SKIP LOCKED);
    SELECT coalesce(array_agg(row(s.id, s.txid, s.seq, s.endpoint_id, x.attempt,
                                  CASE WHEN f.recorded THEN x.final_outcome END,
                                  CASE WHEN f.recorded THEN x.status_code END,
                                  CASE WHEN f.recorded THEN x.error END,
                                  CASE WHEN f.recorded THEN x.last_error END,
                                  CASE WHEN f.recorded THEN x.duration_ms END,
                                  CASE WHEN f.recorded THEN x.response_body END,
                                  CASE WHEN f.recorded THEN x.next_at END)::outbox._sent), '{}')
      INTO v_sent
      FROM unnest(p_ids, p_txids, p_seqs, p_endpoints) AS s(id, txid, seq, endpoint_id)
      JOIN outbox._decided(p_ids, attempts, outcomes, status_codes, errors, durations_ms, retry_at,
                           response_bodies) x ON x.id = s.id
     CROSS JOIN LATERAL (SELECT s.endpoint_id = ANY (v_free) AS recorded) f;
    PERFORM outbox._fan_out(v_part.events, v_sent, p_worker, p_lease, coalesce(outbox._history_part(), 0::smallint));
    -- Attempts still out become deliveries in flight: from now on they count against their
    -- endpoint's max_in_flight like any claimed one (unless outbox._read_batch counted
    -- them already).
    UPDATE outbox.endpoint_state s SET in_flight = s.in_flight + x.n
      FROM (SELECT v.endpoint_id, count(*)::integer AS n
              FROM unnest(v_sent) v
              JOIN outbox.endpoint e ON e.id = v.endpoint_id AND e.deleted_at IS NULL
             WHERE v.outcome IS NULL AND v.endpoint_id = ANY (v_free)
             GROUP BY v.endpoint_id) x
     WHERE s.endpoint_id = x.endpoint_id AND NOT outbox._batches_counted();
    SELECT coalesce(array_agg(row(s.id, s.endpoint_id, outbox._event_id(e.id, e.txid, e.seq, e.created_at),
                                  e.tenant_id, e.created_at, s.attempt, s.outcome, s.status_code, s.error,
                                  s.duration_ms, s.response_body, e.event_type)::outbox._settled), '{}')
      INTO v_rows
      FROM unnest(v_sent) s
      JOIN unnest(v_part.events) e ON e.txid::text::bigint = s.txid AND e.seq = s.seq
     WHERE s.outcome IS NOT NULL;
    PERFORM outbox._account(v_rows, p_worker, true);
    PERFORM outbox._wake_at_commit();
    PERFORM outbox._advance_cursor(c, p_batch, v_part.events, v_part.more);
    -- Outcomes left for later.
    RETURN QUERY
    SELECT o.id FROM unnest(p_ids, p_endpoints, outcomes) AS o(id, endpoint_id, outcome)
     WHERE o.outcome IS NOT NULL AND NOT (o.endpoint_id = ANY (v_free));
END
$$;

-- Records one attempt's outcome ('delivered', 'retry' or 'dead') and returns the delivery's
-- new status. Refused with an ERROR when the caller no longer holds the attempt.
CREATE OR REPLACE FUNCTION outbox.ack(
    delivery_id   uuid,
    attempt       integer,
    outcome       outbox.attempt_outcome,
    status_code   integer          DEFAULT NULL,
    error         text             DEFAULT NULL,
    duration_ms   double precision DEFAULT NULL,
    retry_at      timestamptz      DEFAULT NULL,
    response_body text             DEFAULT NULL,
    worker        text             DEFAULT NULL
)
RETURNS outbox.delivery_status
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    d outbox.delivery;
BEGIN
    IF ack.delivery_id IS NULL OR ack.attempt IS NULL OR ack.outcome IS NULL THEN
        RAISE EXCEPTION 'outbox.ack needs delivery_id, attempt and outcome'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM 1 FROM outbox.ack_batch(ARRAY[ack.delivery_id], ARRAY[ack.attempt], ARRAY[ack.outcome],
                                    ARRAY[ack.status_code], ARRAY[ack.error], ARRAY[ack.duration_ms],
                                    ARRAY[ack.retry_at], ARRAY[ack.response_body], ack.worker);
    IF NOT FOUND THEN
        SELECT dd.status, dd.attempts INTO d.status, d.attempts FROM outbox.deliveries dd WHERE dd.id = ack.delivery_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'delivery % does not exist', ack.delivery_id USING ERRCODE = 'no_data_found';
        END IF;
        RAISE EXCEPTION 'delivery % is not held by attempt % (it is % at attempt %)',
                        ack.delivery_id, ack.attempt, d.status, d.attempts
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only the sender that claimed the current attempt may acknowledge it; claim it again with outbox.claim().';
    END IF;
    SELECT * INTO d FROM outbox.delivery WHERE id = ack.delivery_id;
    RETURN d.status;
END
$$;

-- Seconds until the claim can next take something (negative if it could now), NULL if
-- nothing waits. Per endpoint that is the latest of: its first pending delivery coming due
-- (for an ordered endpoint, its head), its circuit's probe time and its rate limit's next
-- token. An endpoint at its limit of requests in flight does not count: their outcomes
-- wake the worker. Nor do leases about to expire: a sender that vanished is rare, and the
-- poll interval picks its deliveries up (reading lease times here would walk the index
-- entries of every recently finished attempt on each call). The worker sleeps that long
-- (NULL: until the poll interval or a commit wakes it), so blocked endpoints never make it
-- spin.
CREATE OR REPLACE FUNCTION outbox._next_due()
RETURNS double precision
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_cap integer := nullif((outbox._policy()).endpoint_max_in_flight, 0);
BEGIN
    -- A batch of the log read in part: the rest is due now.
    IF outbox._log_behind() THEN
        RETURN 0;
    END IF;
    -- plpgsql, not sql: its plan is prepared once per session instead of on every call.
    RETURN (
    -- Epochs, not an interval: a due time that is not finite (none can be stored any
    -- more, but one row must never fail the worker's cycle) is simply not waited for.
    SELECT extract(epoch FROM min(r.ready_at) FILTER (WHERE isfinite(r.ready_at)))::double precision
           - extract(epoch FROM clock_timestamp())::double precision
      FROM outbox.endpoint e
      JOIN outbox.endpoint_state s ON s.endpoint_id = e.id
      LEFT JOIN LATERAL (
           SELECT d.due_at FROM outbox.delivery d
            WHERE d.endpoint_id = e.id AND d.status = 'pending'
            ORDER BY d.due_at LIMIT 1) f ON NOT e.ordered
      LEFT JOIN LATERAL (
           SELECT d.status, d.due_at FROM outbox.delivery d
            WHERE d.endpoint_id = e.id AND d.seq IS NOT NULL AND d.status IN ('pending', 'in_flight')
            ORDER BY d.seq LIMIT 1) h ON e.ordered
     CROSS JOIN LATERAL (
           SELECT CASE
                  WHEN e.ordered AND h.status IS DISTINCT FROM 'pending' THEN NULL
                  WHEN NOT e.ordered AND f.due_at IS NULL THEN NULL
                  WHEN s.circuit <> 'closed' AND s.in_flight > 0 THEN NULL
                  WHEN NOT e.ordered AND s.in_flight >= coalesce(e.max_in_flight, v_cap) THEN NULL
                  ELSE greatest(CASE WHEN e.ordered THEN h.due_at ELSE f.due_at END,
                                CASE WHEN s.circuit = 'open' THEN s.next_probe_at END,
                                CASE WHEN e.rate_limit IS NOT NULL
                                     THEN s.rate_tat - interval '1 second' + interval '1 second' / e.rate_limit END)
                  END AS ready_at) r
     WHERE e.enabled AND e.deleted_at IS NULL);
END
$$;

-- Queue health in one row. Every count reads a partial index over the live part of the
-- table (pending, in flight) or a time-bounded range of the finished index, so the cost does not grow with the
-- history kept.
CREATE OR REPLACE FUNCTION outbox.stats(
    OUT pending               bigint,
    OUT due                   bigint,
    OUT in_flight             bigint,
    OUT retrying              bigint,
    OUT dead                  bigint,
    OUT oldest_pending_age    interval,
    OUT delivered_last_hour   bigint,
    OUT dead_last_hour        bigint,
    OUT failed_attempts_last_hour bigint,
    OUT success_rate_last_hour double precision,
    OUT delivered_last_minute bigint
)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH live AS (
        SELECT count(*) FILTER (WHERE status = 'pending')                        AS pending,
               count(*) FILTER (WHERE status = 'pending' AND due_at <= now())    AS due,
               count(*) FILTER (WHERE status = 'in_flight')                      AS in_flight,
               count(*) FILTER (WHERE status = 'pending' AND attempts > retry_base) AS retrying,
               now() - min(created_at) FILTER (WHERE status = 'pending')         AS oldest
          FROM (SELECT status, due_at, attempts, retry_base, created_at FROM outbox.delivery WHERE status = 'pending'
                UNION ALL
                SELECT status, due_at, attempts, retry_base, created_at FROM outbox.delivery WHERE status = 'in_flight') d
    ),
    recent AS (
        SELECT count(*) FILTER (WHERE status = 'delivered') AS delivered,
               count(*) FILTER (WHERE status = 'dead')      AS dead,
               count(*) FILTER (WHERE status = 'delivered' AND finished_at >= now() - interval '1 minute') AS last_minute
          FROM (SELECT status, finished_at FROM outbox.delivery
                 WHERE finished_at >= now() - interval '1 hour'
                UNION ALL
                SELECT 'delivered', finished_at FROM outbox.history
                 WHERE finished_at >= now() - interval '1 hour') d
    ),
    failures AS (
        SELECT count(*) AS failed
          FROM outbox.attempt
         WHERE created_at >= now() - interval '1 hour' AND outcome <> 'delivered'
    )
    SELECT live.pending, live.due, live.in_flight, live.retrying,
           (SELECT count(*) FROM outbox.delivery WHERE status = 'dead'),
           live.oldest,
           recent.delivered, recent.dead, failures.failed,
           CASE WHEN recent.delivered + recent.dead = 0 THEN NULL
                ELSE recent.delivered::double precision / (recent.delivered + recent.dead) END,
           recent.last_minute
      FROM live, recent, failures
$$;

-- Puts dead deliveries back in the queue, due now, with a fresh retry schedule: one by id,
-- or every dead one of an endpoint and/or a time window (of death). Returns how many. The
-- attempt number goes on from where it was (it is the fencing token: an ack for an attempt
-- before the retry is refused); the schedule counts from the retry (retry_base).
CREATE OR REPLACE FUNCTION outbox.retry_dead(
    delivery_id uuid        DEFAULT NULL,
    endpoint_id uuid        DEFAULT NULL,
    since       timestamptz DEFAULT NULL,
    until       timestamptz DEFAULT NULL
)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    IF retry_dead.delivery_id IS NULL AND retry_dead.endpoint_id IS NULL
       AND retry_dead.since IS NULL AND retry_dead.until IS NULL THEN
        RAISE EXCEPTION 'outbox.retry_dead needs a delivery_id, an endpoint_id or a time window'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'To retry every dead delivery, pass since => ''-infinity''.';
    END IF;
    WITH requeued AS (
        -- On an ordered endpoint it joins the back of the queue.
        UPDATE outbox.delivery d
           SET status = 'pending', due_at = now(), finished_at = NULL, retry_base = d.attempts,
               last_error = NULL, last_status_code = NULL,
               seq = CASE WHEN (SELECT e.ordered FROM outbox.endpoint e WHERE e.id = d.endpoint_id)
                          THEN nextval('outbox.delivery_seq') END
         WHERE d.status = 'dead'
           AND (retry_dead.delivery_id IS NULL OR d.id = retry_dead.delivery_id)
           AND (retry_dead.endpoint_id IS NULL OR d.endpoint_id = retry_dead.endpoint_id)
           AND (retry_dead.since IS NULL OR d.finished_at >= retry_dead.since)
           AND (retry_dead.until IS NULL OR d.finished_at < retry_dead.until)
        RETURNING d.id, d.attempts
    )
    INSERT INTO outbox.attempt (delivery_id, attempt, outcome, error, worker)
    SELECT id, attempts, 'requeued', 'retried by operator', session_user FROM requeued;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 AND retry_dead.delivery_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM outbox.deliveries WHERE id = retry_dead.delivery_id) THEN
        RAISE EXCEPTION 'delivery % does not exist', retry_dead.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM outbox._wake_at_commit();
    RETURN n;
END
$$;

-- Sends already delivered events to an endpoint again: one new delivery (same event id, so
-- receivers can deduplicate on webhook-id) per event delivered to it since `since`.
-- Returns how many.
CREATE OR REPLACE FUNCTION outbox.replay(endpoint_id uuid, since timestamptz, until timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    IF replay.since IS NULL THEN
        RAISE EXCEPTION 'outbox.replay needs since' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM outbox._endpoint_or_raise(replay.endpoint_id, false);
    -- Deliveries in outbox.history have no event row: the replay needs one.
    INSERT INTO outbox.event (id, event_type, payload, tenant_id, created_at)
    SELECT DISTINCT ON (h.event_id, coalesce(h.tenant_id, '')) h.event_id, h.event_type, h.payload, h.tenant_id, h.created_at
      FROM outbox.history h
     WHERE h.endpoint_id = replay.endpoint_id
       AND h.finished_at >= replay.since
       AND (replay.until IS NULL OR h.finished_at < replay.until)
    ON CONFLICT (id, tenant_key) DO NOTHING;
    WITH originals AS (
        SELECT DISTINCT ON (d.event_id) d.id, d.event_id, d.tenant_id, d.created_at
          FROM (SELECT d.id, d.event_id, d.tenant_id, d.created_at, d.finished_at
                  FROM outbox.delivery d
                 WHERE d.endpoint_id = replay.endpoint_id AND d.status = 'delivered'
                   AND d.finished_at >= replay.since
                   AND (replay.until IS NULL OR d.finished_at < replay.until)
                UNION ALL
                SELECT h.delivery_id, h.event_id, h.tenant_id, h.created_at, h.finished_at
                  FROM outbox.history h
                 WHERE h.endpoint_id = replay.endpoint_id
                   AND h.finished_at >= replay.since
                   AND (replay.until IS NULL OR h.finished_at < replay.until)) d
         ORDER BY d.event_id, d.finished_at DESC
    ),
    copies AS (
        -- An event whose replay is still pending is not replayed twice.
        INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, replay_of, seq)
        SELECT o.event_id, replay.endpoint_id, o.tenant_id, o.id,
               CASE WHEN (SELECT e.ordered FROM outbox.endpoint e WHERE e.id = replay.endpoint_id)
                    THEN nextval('outbox.delivery_seq') END
          FROM (SELECT * FROM originals ORDER BY created_at, id) o
         WHERE NOT EXISTS (SELECT 1 FROM outbox.delivery p
                            WHERE p.event_id = o.event_id AND p.endpoint_id = replay.endpoint_id
                              AND p.replay_of IS NOT NULL AND p.status IN ('pending', 'in_flight'))
        RETURNING id, replay_of
    )
    INSERT INTO outbox.attempt (delivery_id, attempt, outcome, error, worker)
    SELECT id, 0, 'replayed', 'replay of delivery ' || replay_of, session_user FROM copies;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM outbox._wake_at_commit();
    RETURN n;
END
$$;

-- Cancels deliveries that are not finished: one by id, or every one of an endpoint.
-- A sender still holding one of them has its ack refused. Returns how many.
CREATE OR REPLACE FUNCTION outbox.cancel(delivery_id uuid DEFAULT NULL, endpoint_id uuid DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    IF cancel.delivery_id IS NULL AND cancel.endpoint_id IS NULL THEN
        RAISE EXCEPTION 'outbox.cancel needs a delivery_id or an endpoint_id'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH cancelled AS (
        UPDATE outbox.delivery d
           SET status = 'cancelled', finished_at = now(), lease_owner = NULL,
               last_error = 'cancelled by operator'
          FROM (SELECT q.id, q.status FROM outbox.delivery q
                 WHERE q.status IN ('pending', 'in_flight')
                   AND (cancel.delivery_id IS NULL OR q.id = cancel.delivery_id)
                   AND (cancel.endpoint_id IS NULL OR q.endpoint_id = cancel.endpoint_id)
                   FOR UPDATE) old
         WHERE d.id = old.id
        RETURNING d.id, d.attempts, d.endpoint_id, old.status AS was
    ),
    counted AS (
        UPDATE outbox.endpoint_state s SET in_flight = greatest(s.in_flight - c.n, 0)
          FROM (SELECT endpoint_id, count(*)::integer AS n FROM cancelled
                 WHERE was = 'in_flight' GROUP BY endpoint_id) c
         WHERE s.endpoint_id = c.endpoint_id
    )
    INSERT INTO outbox.attempt (delivery_id, attempt, outcome, error, worker)
    SELECT id, attempts, 'cancelled', 'cancelled by operator', session_user FROM cancelled;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 AND cancel.delivery_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM outbox.deliveries WHERE id = cancel.delivery_id) THEN
        RAISE EXCEPTION 'delivery % does not exist', cancel.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN n;
END
$$;

-- Empties the oldest partition of outbox.history for reuse, when its turn has come: the
-- partition written now has been for half of p_age, and every row of the next one is older
-- than p_age (rows are kept from p_age to one and a half times it). TRUNCATE, never DELETE:
-- nothing is left for VACUUM. A partition someone is reading (a lock held) is not waited
-- for: the next call tries again. Returns whether it rotated.
CREATE OR REPLACE FUNCTION outbox._rotate_history(p_age interval)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cur  outbox.history_rotation;
    v_next outbox.history_rotation;
BEGIN
    IF p_age IS NULL THEN
        RETURN false;
    END IF;
    -- Once a transaction at most (outbox.purge('0') calls it in a loop): the partition it
    -- has just made current may be the one the worker writes to next.
    SELECT * INTO v_cur FROM outbox.history_rotation WHERE until IS NULL FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR v_cur.since > now() - p_age / 2 OR v_cur.since = now() THEN
        RETURN false;
    END IF;
    SELECT * INTO v_next FROM outbox.history_rotation WHERE part = (v_cur.part + 1) % 3 FOR UPDATE;
    IF v_next.until > now() - p_age THEN
        RETURN false;
    END IF;
    BEGIN
        EXECUTE format('LOCK TABLE outbox.%I IN ACCESS EXCLUSIVE MODE NOWAIT', 'history_' || v_next.part);
        EXECUTE format('TRUNCATE outbox.%I', 'history_' || v_next.part);
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    UPDATE outbox.history_rotation SET until = now() WHERE part = v_cur.part;
    UPDATE outbox.history_rotation SET since = now(), until = NULL WHERE part = v_next.part;
    RETURN true;
END
$$;

-- Ends the turn of the table of callers' ids taking new ones, once it has taken them for
-- p_age, and gives the turn to the other, emptied (TRUNCATE): the ids in it are p_age old
-- at least. Returns whether it did. It waits for the ids going into the table whose turn
-- ends (so that a snapshot seeing the new turn sees every one of them: outbox.enqueue
-- relies on it) and for enqueuers looking in the other, up to lock_timeout; enqueuers of
-- ids wait behind it meanwhile. Held longer, it tries again at the next call. A NULL
-- p_age keeps ids for ever (the turn's number is caught up with all the same).
CREATE OR REPLACE FUNCTION outbox._rotate_event_keys(p_age interval)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '100ms'
AS $$
DECLARE
    r outbox.event_key_rotation;
BEGIN
    SELECT * INTO r FROM outbox.event_key_rotation FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- The sequence may have run ahead of the turn's number without a turn: a rotation
    -- rolled back after advancing it, or crash recovery or a promoted standby found it
    -- ahead (a sequence is logged some values in advance). Until they agree again every
    -- keyed enqueue under REPEATABLE READ would fail to serialize, so they are made to
    -- agree: a snapshot from before this sees them differ and takes the careful way.
    UPDATE outbox.event_key_rotation
       SET generation = (SELECT g.last_value FROM outbox.event_key_generation g)
     WHERE generation <> (SELECT g.last_value FROM outbox.event_key_generation g);
    IF p_age IS NULL OR r.since > now() - p_age THEN
        RETURN false;
    END IF;
    BEGIN
        EXECUTE format('LOCK TABLE outbox.%I IN SHARE MODE', 'event_key_' || r.current);
        EXECUTE format('LOCK TABLE outbox.%I IN ACCESS EXCLUSIVE MODE', 'event_key_' || (1 - r.current));
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    -- Only now, with nothing left that can fail for lack of a lock: a sequence advanced
    -- by a rotation that rolls back makes enqueuers take the careful way until the next
    -- call catches up (above).
    EXECUTE format('TRUNCATE outbox.%I', 'event_key_' || (1 - r.current));
    -- The turn counts from now, not from the transaction's start: ids went into the
    -- table whose turn ends until the locks were had.
    UPDATE outbox.event_key_rotation
       SET current = 1 - r.current, generation = nextval('outbox.event_key_generation'), since = clock_timestamp();
    RETURN true;
END
$$;

-- Moves rollup hours older than 90 days into outbox.stats_retired, in one statement, so
-- a reader of the totals sees them either in the rollup or in the retired sums, never in
-- neither: the counters in outbox.metrics never go down. The 90 days are the rollup's
-- retention, stated here only.
CREATE FUNCTION outbox._retire_stats()
RETURNS void
LANGUAGE sql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM outbox.stats_hourly WHERE hour < now() - interval '90 days'
        RETURNING endpoint_id, outcome, latency_bucket, deliveries, attempts, latency_ms_sum
    )
    INSERT INTO outbox.stats_retired AS r (endpoint_id, outcome, latency_bucket, deliveries, attempts, latency_ms_sum)
    SELECT endpoint_id, outcome, latency_bucket, sum(deliveries), sum(attempts), sum(latency_ms_sum)
      FROM gone GROUP BY 1, 2, 3
    ON CONFLICT (endpoint_id, outcome, latency_bucket) DO UPDATE SET
           deliveries = r.deliveries + excluded.deliveries,
           attempts = r.attempts + excluded.attempts,
           latency_ms_sum = r.latency_ms_sum + excluded.latency_ms_sum;
$$;

-- Cancels what is left for deleted endpoints, then deletes up to batch_size finished
-- deliveries (delivered or cancelled older than
-- delivered_age, dead older than dead_age) with their attempts, then events no delivery
-- refers to any more, and retires rollup hours older than 90 days. Small batches keep each
-- transaction short, so the hot path never waits on it. Returns the deliveries deleted.
CREATE OR REPLACE FUNCTION outbox._purge_batch(delivered_age interval, dead_age interval, batch_size integer)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
    event_ids text[];
    tenant_keys text[];
BEGIN
    -- A fan-out enqueue that raced delete_endpoint may have left work for a deleted
    -- endpoint; it can never be sent, so it is cancelled like the rest of that endpoint's.
    -- Rows someone holds are left for the next run: retention never waits.
    UPDATE outbox.delivery d
       SET status = 'cancelled', finished_at = now(), lease_owner = NULL,
           last_error = 'cancelled: endpoint deleted'
      FROM (SELECT q.id FROM outbox.endpoint e JOIN outbox.delivery q ON q.endpoint_id = e.id
             WHERE e.deleted_at IS NOT NULL AND q.status IN ('pending', 'in_flight')
               FOR UPDATE OF q SKIP LOCKED) x
     WHERE d.id = x.id;
    -- A rotation's old secret stops signing when its overlap ends; then it goes.
    UPDATE outbox.endpoint e
       SET previous_secret = NULL, previous_secret_expires_at = NULL
      FROM (SELECT q.id FROM outbox.endpoint q
             WHERE q.previous_secret_expires_at <= now()
               FOR NO KEY UPDATE SKIP LOCKED) x
     WHERE e.id = x.id;
    WITH doomed AS (
        (SELECT d.id FROM outbox.delivery d
          WHERE d.finished_at < now() - delivered_age AND d.status IN ('delivered', 'cancelled')
          LIMIT batch_size)
        UNION ALL
        (SELECT d.id FROM outbox.delivery d
          WHERE d.finished_at < now() - dead_age AND d.status = 'dead'
          LIMIT batch_size)
    ),
    gone AS (
        DELETE FROM outbox.delivery d USING doomed WHERE d.id = doomed.id
        RETURNING d.event_id, d.tenant_key
    )
    SELECT (SELECT count(*) FROM gone), array_agg(g.event_id), array_agg(g.tenant_key)
      INTO n, event_ids, tenant_keys
      FROM (SELECT DISTINCT event_id, tenant_key FROM gone) g;
    -- Events whose last delivery just went (a new statement: it sees the deletions).
    DELETE FROM outbox.event e
     USING unnest(event_ids, tenant_keys) AS k(id, tenant_key)
     WHERE e.id = k.id AND e.tenant_key = k.tenant_key
       AND NOT EXISTS (SELECT 1 FROM outbox.delivery d WHERE d.event_id = e.id AND d.tenant_key = e.tenant_key);
    -- Events no delivery refers to, past retention (rows an earlier version kept as
    -- callers' ids, which are outbox.event_key_0/_1's now, or written by hand).
    WITH stale AS (
        DELETE FROM outbox.event e
         WHERE (e.id, e.tenant_key) IN (
               SELECT x.id, x.tenant_key FROM outbox.event x
                WHERE x.created_at < now() - delivered_age
                  AND NOT EXISTS (SELECT 1 FROM outbox.delivery d WHERE d.event_id = x.id AND d.tenant_key = x.tenant_key)
                LIMIT batch_size)
        RETURNING 1
    )
    SELECT n + count(*) INTO n FROM stale;
    PERFORM outbox._rotate_history(delivered_age);
    PERFORM outbox._retire_stats();
    RETURN n;
END
$$;

-- Removes finished deliveries (and their attempts and orphaned events, deliveries of
-- outbox.history, and callers' ids) older than older_than, now; dead ones older than dead_older_than (default: the same). For manual
-- use; the worker does this continuously per outbox.retention_delivered / _dead.
-- Returns how many deliveries were deleted.
CREATE OR REPLACE FUNCTION outbox.purge(older_than interval, dead_older_than interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    total bigint := 0;
    n bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' OR dead_older_than < interval '0' THEN
        RAISE EXCEPTION 'outbox.purge needs a non-negative age, e.g. outbox.purge(''7 days'')'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        n := outbox._purge_batch(older_than, coalesce(dead_older_than, older_than), 10000);
        total := total + n;
        EXIT WHEN n = 0;
    END LOOP;
    -- The worker empties outbox.history a partition at a time; asked for an age now, this
    -- deletes (VACUUM reclaims the space).
    DELETE FROM outbox.history WHERE finished_at < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    -- So are callers' ids as old (the worker forgets them a table at a time).
    DELETE FROM outbox.event_key_0 WHERE created_at < now() - older_than;
    DELETE FROM outbox.event_key_1 WHERE created_at < now() - older_than;
    RETURN total + n;
END
$$;

-- Producers enqueue events (directly or through outbox.trigger) and nothing else.
CREATE OR REPLACE FUNCTION outbox.grant_producer(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, jsonb, uuid, text, text, timestamptz), outbox.trigger() TO %s', role);
    -- What outbox.trigger, running as the writing user, needs for its one insert: the
    -- columns of an event (never txid, the caller's id or the routing columns, which only
    -- outbox.enqueue sets), and the functions behind the others' defaults and checks.
    EXECUTE format('GRANT INSERT (event_type, payload, tenant_id) ON outbox.log TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._stamp(), outbox._seq(), outbox._check_log(text, text, integer), outbox._log_part(xid8) TO %s', role);
END
$$;

-- Operators watch and steer delivery: the views, statistics, enabling and disabling
-- endpoints. They cannot read secrets, create endpoints, enqueue, or claim.
CREATE OR REPLACE FUNCTION outbox.grant_operator(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', role);
    EXECUTE format('GRANT SELECT ON outbox.endpoints, outbox.deliveries, outbox.attempts, outbox.dead_letters,
        outbox.endpoint_health, outbox.recent_failures, outbox.metrics, outbox.triggers, outbox.log_status TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.stats(), outbox.enable_endpoint(uuid), outbox.disable_endpoint(uuid, text),
        outbox.delivery_stats(interval, uuid, text, text), outbox.endpoint_stats(interval), outbox.event_type_stats(interval),
        outbox.retry_dead(uuid, uuid, timestamptz, timestamptz), outbox.replay(uuid, timestamptz, timestamptz),
        outbox.cancel(uuid, uuid), outbox._policy(), outbox._workers_running(), outbox._bucket_bounds() TO %s', role);
END
$$;

-- Administrators manage endpoints (and their secrets), and may act as a sender with
-- outbox.claim / outbox.ack; they get everything an operator and a producer get.
CREATE OR REPLACE FUNCTION outbox.grant_admin(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbox.grant_producer(role);
    PERFORM outbox.grant_operator(role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION
        outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean, boolean, integer, integer, text),
        outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text, boolean, integer, integer, text),
        outbox.delete_endpoint(uuid), outbox.endpoint_secret(uuid), outbox.generate_secret(),
        outbox.rotate_secret(uuid, text, interval),
        outbox.purge(interval, interval),
        outbox.sign(text, text, bigint, text), outbox.retry_delay(integer),
        outbox.claim(integer, text, interval, uuid, text),
        outbox.ack(uuid, integer, outbox.attempt_outcome, integer, text, double precision, timestamptz, text, text),
        outbox.ack_batch(uuid[], integer[], outbox.attempt_outcome[], integer[], text[], double precision[], timestamptz[], text[], text)
        TO %s', role);
END
$$;

-- The role the background worker connects as (outbox.worker_role): exactly what a sender
-- needs, through the same SECURITY DEFINER functions, and no table privilege at all.
CREATE OR REPLACE FUNCTION outbox.grant_worker(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION
        outbox.claim(integer, text, interval, uuid, text),
        outbox.ack_batch(uuid[], integer[], outbox.attempt_outcome[], integer[], text[], double precision[], timestamptz[], text[], text),
        outbox._next_due(), outbox._purge_batch(interval, interval, integer),
        outbox._requeue_orphaned(), outbox._lock_for_ack(uuid[]), outbox._read_log(integer, bigint), outbox._rotate_log(),
        outbox._rotate_event_keys(interval),
        outbox._claim(integer, text, interval, uuid, text), outbox._log_lock(), outbox._become_reader(),
        outbox._read_batch(integer, integer, bigint, bigint, pg_snapshot, boolean, bigint, bigint), outbox._recount_endpoints(),
        outbox._close_batch(bigint, pg_snapshot, integer, bigint, uuid[], bigint[], bigint[], uuid[], integer[],
                            outbox.attempt_outcome[], integer[], text[], double precision[], timestamptz[], text[],
                            text, interval)
        TO %s', role);
END
$$;

-- Header values are often credentials: only roles that may read the endpoints' secrets
-- (administrators) see them; others see which headers are set, with masked values.
CREATE OR REPLACE VIEW outbox.endpoints AS
SELECT e.id, e.url, e.event_types, e.enabled, e.disabled_reason, e.timeout,
       CASE WHEN pg_catalog.has_function_privilege('outbox.endpoint_secret(uuid)', 'EXECUTE') THEN e.headers
            ELSE (SELECT coalesce(jsonb_object_agg(h.key, '********'), '{}') FROM jsonb_each(e.headers) h)
       END AS headers,
       e.tenant_id, e.description, e.created_at, e.updated_at,
       e.ordered, e.rate_limit, e.max_in_flight, e.uid
  FROM outbox.endpoint e
 WHERE e.deleted_at IS NULL;

-- How far reading the log has come: events committed but not yet read (so not yet
-- deliveries), how long the oldest of them has waited, when the log was last read, and
-- whether a batch is being read in parts. Unread events that stay there mean no worker
-- (or outbox.claim) is reading: see docs/troubleshooting.md.
CREATE OR REPLACE VIEW outbox.log_status AS
SELECT u.unread, u.oldest_unread_age, c.created_at AS last_read_at, c.batch IS NOT NULL AS reading
  FROM (SELECT * FROM outbox.log_cursor ORDER BY id DESC LIMIT 1) c
 CROSS JOIN LATERAL (
       SELECT count(*) AS unread, now() - min(l.created_at) AS oldest_unread_age
         FROM outbox.log l
        WHERE (l.txid >= pg_snapshot_xmax(c.done) OR l.txid = ANY (ARRAY(SELECT pg_snapshot_xip(c.done))))
          AND NOT pg_visible_in_snapshot(l.txid, c.done)
          AND (c.pos_txid IS NULL OR (l.txid, l.seq) > (c.pos_txid, c.pos_seq))) u;

-- Worker processes connected to this database now. SECURITY DEFINER: pg_stat_activity
-- hides other roles' backend types from a monitoring role without pg_read_all_stats.
CREATE FUNCTION outbox._workers_running()
RETURNS integer
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*)::integer FROM pg_stat_activity
     WHERE backend_type = 'webhook_outbox worker'
       AND datid = (SELECT oid FROM pg_database WHERE datname = current_database())
$$;

-- Counters and gauges in the shape Prometheus exporters want: one row per metric and label
-- set (see contrib/). The *_total counters and the latency histogram add what retention
-- moved out of the hourly rollup (outbox.stats_retired) to what it still holds, so they
-- never go down: a decrease would read as a counter reset. The histogram is Prometheus's:
-- cumulative buckets by `le` (seconds, enqueue to delivered), then _sum and _count.
CREATE OR REPLACE VIEW outbox.metrics AS
WITH totals AS (
    SELECT t.endpoint_id, t.outcome, t.latency_bucket,
           sum(t.deliveries) AS deliveries, sum(t.attempts) AS attempts, sum(t.latency_ms_sum) AS latency_ms_sum
      FROM (SELECT r.endpoint_id, r.outcome, r.latency_bucket, r.deliveries, r.attempts, r.latency_ms_sum
              FROM outbox.stats_retired r
            UNION ALL
            SELECT h.endpoint_id, h.outcome, h.latency_bucket, h.deliveries, h.attempts, h.latency_ms_sum
              FROM outbox.stats_hourly h) t
     GROUP BY 1, 2, 3
), delivered AS (
    SELECT * FROM totals WHERE outcome = 'delivered'
), workers AS (
    -- One look at pg_stat_activity for both worker gauges.
    SELECT outbox._workers_running() AS n
)
SELECT 'outbox_deliveries'::text AS metric, 'pending'::text AS status, NULL::text AS endpoint_id,
       count(*)::double precision AS value, NULL::text AS le
  FROM outbox.delivery WHERE status = 'pending'
UNION ALL
SELECT 'outbox_deliveries', 'in_flight', NULL, count(*), NULL FROM outbox.delivery WHERE status = 'in_flight'
UNION ALL
SELECT 'outbox_deliveries', 'dead', NULL, count(*), NULL FROM outbox.delivery WHERE status = 'dead'
UNION ALL
SELECT 'outbox_oldest_pending_seconds', NULL, NULL,
       coalesce(extract(epoch FROM now() - min(created_at)), 0), NULL
  FROM outbox.delivery WHERE status = 'pending'
UNION ALL
-- How long the most overdue delivery has waited past its due time, among endpoints that
-- may be sent to (enabled, circuit closed: those held otherwise have series of their own).
-- Deliveries scheduled for later and retries waiting for their turn do not count, so it
-- grows only when due work is not going out: the worker behind or stopped, or an endpoint
-- held by its rate limit, max_in_flight or ordering. One index probe per endpoint.
SELECT 'outbox_oldest_due_seconds', NULL, NULL,
       coalesce(extract(epoch FROM now() - min(f.due_at)), 0), NULL
  FROM outbox.endpoint e
  JOIN outbox.endpoint_state st ON st.endpoint_id = e.id
 CROSS JOIN LATERAL (
       SELECT d.due_at FROM outbox.delivery d
        WHERE d.endpoint_id = e.id AND d.status = 'pending'
        ORDER BY d.due_at LIMIT 1) f
 WHERE e.enabled AND e.deleted_at IS NULL AND st.circuit = 'closed' AND f.due_at <= now()
UNION ALL
-- Events committed but not read from the log yet, and the oldest one's age: a reader that
-- stopped shows here before anything shows as pending.
SELECT 'outbox_log_unread', NULL, NULL, s.unread, NULL FROM outbox.log_status s
UNION ALL
SELECT 'outbox_log_oldest_unread_seconds', NULL, NULL, coalesce(extract(epoch FROM s.oldest_unread_age), 0), NULL
  FROM outbox.log_status s
UNION ALL
SELECT 'outbox_worker_up', NULL, NULL, CASE WHEN w.n > 0 THEN 1 ELSE 0 END, NULL FROM workers w
UNION ALL
SELECT 'outbox_worker_processes', NULL, NULL, w.n, NULL FROM workers w
UNION ALL
SELECT 'outbox_finished_total', t.outcome::text, t.endpoint_id::text, sum(t.deliveries), NULL
  FROM totals t GROUP BY t.outcome, t.endpoint_id
UNION ALL
SELECT 'outbox_attempts_total', NULL, t.endpoint_id::text, sum(t.attempts), NULL
  FROM totals t GROUP BY t.endpoint_id
UNION ALL
-- Bucket i of the rollup holds latencies below bound i + 1 (the last is open), so the
-- cumulative count at le = bound k is the sum of buckets 0 .. k - 1.
SELECT 'outbox_delivery_latency_seconds_bucket', NULL, d.endpoint_id::text,
       coalesce(sum(d.deliveries) FILTER (WHERE d.latency_bucket < b.k), 0), b.le
  FROM delivered d
 CROSS JOIN (SELECT k, (bound / 1000)::text AS le
               FROM unnest(outbox._bucket_bounds()) WITH ORDINALITY AS u(bound, k)
             UNION ALL
             SELECT cardinality(outbox._bucket_bounds()) + 1, '+Inf') b
 GROUP BY d.endpoint_id, b.k, b.le
UNION ALL
SELECT 'outbox_delivery_latency_seconds_sum', NULL, d.endpoint_id::text, sum(d.latency_ms_sum) / 1000, NULL
  FROM delivered d GROUP BY d.endpoint_id
UNION ALL
SELECT 'outbox_delivery_latency_seconds_count', NULL, d.endpoint_id::text, sum(d.deliveries), NULL
  FROM delivered d GROUP BY d.endpoint_id
UNION ALL
SELECT 'outbox_endpoint_consecutive_failures', NULL, st.endpoint_id::text, st.consecutive_failures, NULL
  FROM outbox.endpoint_state st JOIN outbox.endpoint e ON e.id = st.endpoint_id WHERE e.deleted_at IS NULL
UNION ALL
SELECT 'outbox_endpoint_enabled', NULL, e.id::text, CASE WHEN e.enabled THEN 1 ELSE 0 END, NULL
  FROM outbox.endpoint e WHERE e.deleted_at IS NULL
UNION ALL
SELECT 'outbox_endpoint_circuit_open', st.circuit::text, st.endpoint_id::text,
       CASE WHEN st.circuit = 'closed' THEN 0 ELSE 1 END, NULL
  FROM outbox.endpoint_state st JOIN outbox.endpoint e ON e.id = st.endpoint_id WHERE e.deleted_at IS NULL;

-- Every delivery: those with state (outbox.delivery) and those delivered at their first
-- attempt straight from the log (outbox.history).
CREATE OR REPLACE VIEW outbox.deliveries AS
SELECT d.id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url, d.tenant_id,
       d.status,
       (d.status = 'pending' AND d.attempts > d.retry_base) AS retrying,
       d.attempts,
       CASE WHEN d.status = 'pending' THEN d.due_at END AS next_attempt_at,
       CASE WHEN d.status = 'in_flight' THEN d.due_at END AS lease_expires_at,
       d.lease_owner, d.created_at, d.last_attempt_at, d.finished_at,
       d.last_status_code, d.last_error, ev.payload
  FROM outbox.delivery d
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
UNION ALL
SELECT h.delivery_id, h.event_id, h.event_type, h.endpoint_id, e.url, h.tenant_id,
       'delivered'::outbox.delivery_status, false, 1, NULL::timestamptz, NULL::timestamptz,
       NULL::text, h.created_at, h.finished_at, h.finished_at,
       h.status_code, NULL::text, h.payload
  FROM outbox.history h
  JOIN outbox.endpoint e ON e.id = h.endpoint_id;

CREATE OR REPLACE VIEW outbox.attempts AS
SELECT a.id, a.delivery_id, d.event_id, d.endpoint_id, a.attempt, a.outcome, a.status_code,
       a.error, a.duration_ms, a.response_body, a.worker, a.created_at
  FROM outbox.attempt a
  JOIN outbox.delivery d ON d.id = a.delivery_id
UNION ALL
SELECT h.attempt_id, h.delivery_id, h.event_id, h.endpoint_id, 1, 'delivered'::outbox.attempt_outcome,
       h.status_code, NULL::text, h.duration_ms, h.response_body, h.worker, h.finished_at
  FROM outbox.history h;


-- Producers get the new enqueue back, and the insert into the log outbox.trigger makes as
-- the writing user; roles the worker connects as get the log's reading and rotation.
DO $upgrade$
DECLARE
    g text;
BEGIN
    FOR g IN SELECT r FROM unnest(string_to_array(current_setting('webhook_outbox_upgrade.admins'), ',')) r
              WHERE r <> '' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean, boolean, integer, integer, text) TO %s', g);
    END LOOP;
    FOR g IN SELECT r FROM unnest(string_to_array(current_setting('webhook_outbox_upgrade.updaters'), ',')) r
              WHERE r <> '' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text, boolean, integer, integer, text) TO %s', g);
    END LOOP;
    FOR g IN SELECT r FROM unnest(string_to_array(current_setting('webhook_outbox_upgrade.producers'), ',')) r
              WHERE r <> '' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, jsonb, uuid, text, text, timestamptz) TO %s', g);
        EXECUTE format('GRANT INSERT (event_type, payload, tenant_id) ON outbox.log TO %s', g);
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._stamp(), outbox._seq(), outbox._check_log(text, text, integer), outbox._log_part(xid8) TO %s', g);
    END LOOP;
    FOR g IN
        SELECT DISTINCT a.grantee::regrole::text FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'outbox._next_due()'::regprocedure AND a.grantee NOT IN (0, p.proowner)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._read_log(integer, bigint), outbox._rotate_log(),
            outbox._rotate_event_keys(interval),
            outbox._claim(integer, text, interval, uuid, text), outbox._log_lock(), outbox._become_reader(),
            outbox._read_batch(integer, integer, bigint, bigint, pg_snapshot, boolean, bigint, bigint), outbox._recount_endpoints(),
            outbox._close_batch(bigint, pg_snapshot, integer, bigint, uuid[], bigint[], bigint[], uuid[], integer[],
                                outbox.attempt_outcome[], integer[], text[], double precision[], timestamptz[], text[],
                                text, interval)
            TO %s', g);
    END LOOP;
    -- Operators see how far reading the log has come.
    FOR g IN
        SELECT DISTINCT a.grantee::regrole::text FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'outbox.endpoint_health'::regclass AND a.privilege_type = 'SELECT'
           AND a.grantee NOT IN (0, c.relowner)
    LOOP
        EXECUTE format('GRANT SELECT ON outbox.log_status TO %s', g);
        -- What outbox.metrics calls (the worker gauges and the latency histogram's bounds).
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._workers_running(), outbox._bucket_bounds() TO %s', g);
    END LOOP;
END
$upgrade$;

-- webhook_outbox: the catalog descriptions of what users see in schema outbox, the ones
-- \d+ and \df+ (and obj_description / col_description) show. One COMMENT per table, view,
-- column and function, grouped by object: the relation first, then its columns in order.
-- Internal objects (outbox._*) and the partitions of outbox.log and outbox.history have
-- none. The longer explanations are in docs/ and above each object in sql/outbox/.

-------------------------------------------------------------------------------------------
-- Tables
-------------------------------------------------------------------------------------------

COMMENT ON TABLE outbox.endpoint IS 'Webhook subscribers: where events are sent, how they are signed, and their delivery policy. Deleted endpoints stay as rows (deleted_at set) so history keeps its URL; query outbox.endpoints instead, which hides secrets.';
COMMENT ON COLUMN outbox.endpoint.id IS 'Endpoint id.';
COMMENT ON COLUMN outbox.endpoint.url IS 'Absolute http/https URL each event is POSTed to, stored normalized.';
COMMENT ON COLUMN outbox.endpoint.secret IS 'Signing secret (whsec_ + base64); read it with outbox.endpoint_secret(). NULL only once the endpoint is deleted.';
COMMENT ON COLUMN outbox.endpoint.event_types IS 'Event types it receives: exact names and ''prefix.*'' patterns. NULL = every event.';
COMMENT ON COLUMN outbox.endpoint.enabled IS 'false: its deliveries are not claimed; they stay pending until outbox.enable_endpoint().';
COMMENT ON COLUMN outbox.endpoint.disabled_reason IS 'Why it was disabled (by an operator, a 410 Gone, or auto-disable); NULL while enabled.';
COMMENT ON COLUMN outbox.endpoint.timeout IS 'Per-attempt request timeout, 100 ms to 5 min. NULL = the outbox.request_timeout setting.';
COMMENT ON COLUMN outbox.endpoint.headers IS 'JSON object of extra request headers sent with every attempt (values are often credentials; emptied when the endpoint is deleted).';
COMMENT ON COLUMN outbox.endpoint.tenant_id IS 'Tenant the endpoint belongs to: it receives only events of the same tenant (NULL matches NULL).';
COMMENT ON COLUMN outbox.endpoint.description IS 'Free-text description.';
COMMENT ON COLUMN outbox.endpoint.created_at IS 'When the endpoint was created.';
COMMENT ON COLUMN outbox.endpoint.updated_at IS 'When the endpoint was last changed.';
COMMENT ON COLUMN outbox.endpoint.deleted_at IS 'When it was deleted (outbox.delete_endpoint); NULL for live endpoints.';
COMMENT ON COLUMN outbox.endpoint.previous_secret IS 'During a secret rotation, the old secret, which keeps signing beside the new one until previous_secret_expires_at.';
COMMENT ON COLUMN outbox.endpoint.previous_secret_expires_at IS 'End of the rotation overlap: after it only the new secret signs.';
COMMENT ON COLUMN outbox.endpoint.ordered IS 'true: deliveries go strictly one at a time in enqueue order.';
COMMENT ON COLUMN outbox.endpoint.rate_limit IS 'Most requests per second (1-100000). NULL = unlimited.';
COMMENT ON COLUMN outbox.endpoint.max_in_flight IS 'Most requests in flight at once (1-10000). NULL = the outbox.endpoint_max_in_flight setting.';
COMMENT ON COLUMN outbox.endpoint.uid IS 'The caller''s key for the endpoint, unique per tenant among live endpoints: creating it again with the same uid returns the existing endpoint.';

COMMENT ON TABLE outbox.endpoint_state IS 'What senders learned about each endpoint: failure streak, circuit breaker, rate limit and requests in flight. Kept apart from outbox.endpoint so the worker never blocks producers or operators; not saved by pg_dump (restored endpoints start afresh).';
COMMENT ON COLUMN outbox.endpoint_state.endpoint_id IS 'The endpoint (outbox.endpoint.id).';
COMMENT ON COLUMN outbox.endpoint_state.consecutive_failures IS 'Failed attempts since the last success; outbox.circuit_threshold of them open the circuit.';
COMMENT ON COLUMN outbox.endpoint_state.last_success_at IS 'When an attempt last succeeded; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_state.last_failure_at IS 'When an attempt last failed; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_state.last_error IS 'Error of the last failed attempt.';
COMMENT ON COLUMN outbox.endpoint_state.updated_at IS 'When this row was last written.';
COMMENT ON COLUMN outbox.endpoint_state.circuit IS 'Circuit breaker state: closed (deliveries flow), open (nothing claimed until next_probe_at) or half_open (one probe in flight).';
COMMENT ON COLUMN outbox.endpoint_state.circuit_changed_at IS 'When the circuit last changed state.';
COMMENT ON COLUMN outbox.endpoint_state.circuit_opened_at IS 'When the circuit last opened from closed (kept while it stays open or half-open).';
COMMENT ON COLUMN outbox.endpoint_state.next_probe_at IS 'When an open circuit sends its next probe delivery.';
COMMENT ON COLUMN outbox.endpoint_state.cooldown IS 'Current wait of an open circuit before its probe: outbox.circuit_cooldown, doubled after each failed probe up to outbox.circuit_max_cooldown.';
COMMENT ON COLUMN outbox.endpoint_state.failing_since IS 'Start of the current run of failures without a success; auto-disable (outbox.auto_disable_after) counts from it. NULL when not failing.';
COMMENT ON COLUMN outbox.endpoint_state.rate_tat IS 'Rate limit bookkeeping (GCRA "theoretical arrival time"): one more request may go while it is less than a second ahead of now.';
COMMENT ON COLUMN outbox.endpoint_state.in_flight IS 'Deliveries of the endpoint currently in_flight, checked against max_in_flight by the claim.';

COMMENT ON TABLE outbox.event IS 'One row per event turned into deliveries. Its id is the webhook-id receivers deduplicate on; ids are per tenant (the same id in two tenants is two events).';
COMMENT ON COLUMN outbox.event.id IS 'Event id, sent as the webhook-id header: the caller''s event_id, or a generated msg_ id.';
COMMENT ON COLUMN outbox.event.event_type IS 'Event type, e.g. order.created.';
COMMENT ON COLUMN outbox.event.payload IS 'Event data, sent as "data" in the request body.';
COMMENT ON COLUMN outbox.event.tenant_id IS 'Tenant of the event; NULL for none.';
COMMENT ON COLUMN outbox.event.created_at IS 'When the event was enqueued (the body''s "timestamp").';
COMMENT ON COLUMN outbox.event.tenant_key IS 'The tenant as a key column: tenant_id, or '''' for none.';

COMMENT ON TABLE outbox.delivery IS 'One row per (event, endpoint) that needed state: the unit that is claimed, sent, retried and acknowledged. First attempts that succeeded straight from the log are in outbox.history instead; query outbox.deliveries for both.';
COMMENT ON COLUMN outbox.delivery.id IS 'Delivery id.';
COMMENT ON COLUMN outbox.delivery.event_id IS 'The event sent (outbox.event.id).';
COMMENT ON COLUMN outbox.delivery.endpoint_id IS 'The endpoint it is sent to.';
COMMENT ON COLUMN outbox.delivery.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.delivery.status IS 'pending, in_flight, delivered, dead or cancelled; the last three are final (dead can be put back with outbox.retry_dead).';
COMMENT ON COLUMN outbox.delivery.attempts IS 'Attempts started so far. Each claim increments it and an ack must name it: it is the fencing token and only ever grows.';
COMMENT ON COLUMN outbox.delivery.due_at IS 'pending: when it becomes due; in_flight: when its lease expires (then it is due again).';
COMMENT ON COLUMN outbox.delivery.lease_owner IS 'The sender that claimed it last (worker:<pid> for the built-in worker).';
COMMENT ON COLUMN outbox.delivery.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.delivery.finished_at IS 'When it reached a final status; NULL while unfinished.';
COMMENT ON COLUMN outbox.delivery.last_attempt_at IS 'When the outcome of the latest attempt was recorded; NULL before any.';
COMMENT ON COLUMN outbox.delivery.last_status_code IS 'HTTP status of the latest attempt; NULL when none was received (timeout, connection error).';
COMMENT ON COLUMN outbox.delivery.last_error IS 'Error text of the latest failed attempt (or why it was requeued).';
COMMENT ON COLUMN outbox.delivery.replay_of IS 'Set on deliveries made by outbox.replay: the delivery whose event is sent again. NULL otherwise.';
COMMENT ON COLUMN outbox.delivery.seq IS 'Enqueue order, set only for deliveries to ordered endpoints.';
COMMENT ON COLUMN outbox.delivery.tenant_key IS 'The tenant as a key column, as in outbox.event: tenant_id, or '''' for none.';
COMMENT ON COLUMN outbox.delivery.retry_base IS 'Attempts made before the last outbox.retry_dead: the retry schedule counts from here.';

COMMENT ON TABLE outbox.attempt IS 'Append-only history: one row per acknowledged attempt of a delivery in outbox.delivery, and per operator repair (requeued, replayed, cancelled). Query outbox.attempts, which adds first-attempt successes from outbox.history.';
COMMENT ON COLUMN outbox.attempt.id IS 'Attempt record id.';
COMMENT ON COLUMN outbox.attempt.delivery_id IS 'The delivery attempted.';
COMMENT ON COLUMN outbox.attempt.attempt IS 'Attempt number (the delivery''s attempts at the time); 0 for requeue and replay.';
COMMENT ON COLUMN outbox.attempt.outcome IS 'delivered, retry or dead as the sender decided; requeued, replayed or cancelled for an operator''s repair (no request sent).';
COMMENT ON COLUMN outbox.attempt.status_code IS 'HTTP status received; NULL when none (timeout, connection error, repair).';
COMMENT ON COLUMN outbox.attempt.error IS 'Error text of a failed attempt, e.g. timed out after 30000 ms; NULL on success.';
COMMENT ON COLUMN outbox.attempt.duration_ms IS 'Request duration in milliseconds.';
COMMENT ON COLUMN outbox.attempt.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';
COMMENT ON COLUMN outbox.attempt.worker IS 'Who recorded it: the sender (worker:<pid> for the built-in worker), or the session user for a repair.';
COMMENT ON COLUMN outbox.attempt.created_at IS 'When the attempt''s outcome was recorded.';

COMMENT ON TABLE outbox.history IS 'Deliveries whose first attempt, sent straight from the event log, succeeded: one appended row each with the delivery, its event and its attempt. Three partitions written in turn and truncated by retention; query outbox.deliveries and outbox.attempts.';
COMMENT ON COLUMN outbox.history.part IS 'Partition (0-2) the row was written to; outbox.history_rotation says which is current.';
COMMENT ON COLUMN outbox.history.delivery_id IS 'Delivery id.';
COMMENT ON COLUMN outbox.history.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.history.endpoint_id IS 'The endpoint it was delivered to.';
COMMENT ON COLUMN outbox.history.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.history.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.history.payload IS 'Event data (kept for outbox.replay).';
COMMENT ON COLUMN outbox.history.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.history.finished_at IS 'When it was delivered.';
COMMENT ON COLUMN outbox.history.attempt_id IS 'The attempt''s id, numbered like outbox.attempt.id.';
COMMENT ON COLUMN outbox.history.status_code IS 'HTTP status received (2xx).';
COMMENT ON COLUMN outbox.history.duration_ms IS 'Request duration in milliseconds.';
COMMENT ON COLUMN outbox.history.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';
COMMENT ON COLUMN outbox.history.worker IS 'The sender that delivered it (worker:<pid>).';

COMMENT ON TABLE outbox.event_key_0 IS 'Callers'' event ids (outbox.enqueue''s event_id) with what they named, so that enqueueing one again does nothing; outbox.event_key_1 is its twin. The two take turns taking new ids (outbox.event_key_rotation); the one whose turn comes is emptied first.';
COMMENT ON TABLE outbox.event_key_1 IS 'The twin of outbox.event_key_0.';
COMMENT ON TABLE outbox.event_key_rotation IS 'Which of outbox.event_key_0 and _1 takes new ids (current) since when; generation counts the turns, as outbox.event_key_generation does.';
COMMENT ON COLUMN outbox.event_key_0.id IS 'The caller''s event id.';
COMMENT ON COLUMN outbox.event_key_0.tenant_key IS 'The event''s tenant, or '''' for none.';
COMMENT ON COLUMN outbox.event_key_0.event_type IS 'The event type enqueued under the id.';
COMMENT ON COLUMN outbox.event_key_0.payload_hash IS 'SHA-256 of the payload as jsonb writes it.';
COMMENT ON COLUMN outbox.event_key_0.created_at IS 'When the id was first enqueued.';
COMMENT ON COLUMN outbox.event_key_1.id IS 'The caller''s event id.';
COMMENT ON COLUMN outbox.event_key_1.tenant_key IS 'The event''s tenant, or '''' for none.';
COMMENT ON COLUMN outbox.event_key_1.event_type IS 'The event type enqueued under the id.';
COMMENT ON COLUMN outbox.event_key_1.payload_hash IS 'SHA-256 of the payload as jsonb writes it.';
COMMENT ON COLUMN outbox.event_key_1.created_at IS 'When the id was first enqueued.';
COMMENT ON COLUMN outbox.event_key_rotation.current IS 'The table taking new ids: 0 or 1.';
COMMENT ON COLUMN outbox.event_key_rotation.generation IS 'The turn''s number, as outbox.event_key_generation gave it.';
COMMENT ON COLUMN outbox.event_key_rotation.since IS 'When the turn began.';
COMMENT ON TABLE outbox.history_rotation IS 'Which partition of outbox.history is being written (until NULL) since when, and when each other one stopped being written; a partition is emptied for reuse only once its newest row is past retention.';
COMMENT ON COLUMN outbox.history_rotation.part IS 'Partition number, 0-2.';
COMMENT ON COLUMN outbox.history_rotation.since IS 'When writing to this partition started.';
COMMENT ON COLUMN outbox.history_rotation.until IS 'When writing to it stopped; NULL for the partition written now.';

COMMENT ON TABLE outbox.log IS 'The event log producers append to, one row per enqueued event in the producer''s transaction; the worker reads it after commit and makes the deliveries. Three partitions by transaction-id window, truncated once read; watch outbox.log_status.';
COMMENT ON COLUMN outbox.log.txid IS 'Top-level transaction id of the producer that wrote the event.';
COMMENT ON COLUMN outbox.log.seq IS 'Order within the transaction (ordered endpoints receive events in this order).';
COMMENT ON COLUMN outbox.log.id IS 'Event id (webhook-id): the caller''s or one made by outbox.enqueue; NULL from outbox.trigger, whose events get theirs when read.';
COMMENT ON COLUMN outbox.log.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.log.payload IS 'Event data.';
COMMENT ON COLUMN outbox.log.tenant_id IS 'Tenant of the event; NULL for none.';
COMMENT ON COLUMN outbox.log.endpoint_id IS 'Set when the event is for one endpoint instead of every subscribed endpoint.';
COMMENT ON COLUMN outbox.log.deliver_at IS 'Earliest time of the first attempt; NULL = at once.';
COMMENT ON COLUMN outbox.log.created_at IS 'When the event was enqueued.';

COMMENT ON TABLE outbox.log_cursor IS 'Where reading the event log stands: one row appended per read step, the newest one counting (old rows are removed by log rotation).';
COMMENT ON COLUMN outbox.log_cursor.id IS 'Step number; the highest is current.';
COMMENT ON COLUMN outbox.log_cursor.done IS 'Snapshot whose visible transactions have all been read.';
COMMENT ON COLUMN outbox.log_cursor.batch IS 'Snapshot of a batch being read in parts; NULL when none is.';
COMMENT ON COLUMN outbox.log_cursor.pos_txid IS 'Transaction id of the last event of the batch already read; NULL when no batch is open.';
COMMENT ON COLUMN outbox.log_cursor.pos_seq IS 'seq of the last event of the batch already read; NULL when no batch is open.';
COMMENT ON COLUMN outbox.log_cursor.events IS 'Events read in this step.';
COMMENT ON COLUMN outbox.log_cursor.created_at IS 'When this step was recorded.';

COMMENT ON TABLE outbox.stats_hourly IS 'Hourly rollup of finished deliveries, written with each acknowledged batch and kept 90 days; outbox.delivery_stats and friends read it. Latency (enqueue to final outcome) is kept as a histogram.';
COMMENT ON COLUMN outbox.stats_hourly.hour IS 'Start of the hour.';
COMMENT ON COLUMN outbox.stats_hourly.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.stats_hourly.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.stats_hourly.tenant_id IS 'Tenant; '''' for none.';
COMMENT ON COLUMN outbox.stats_hourly.outcome IS 'Final status counted: delivered or dead.';
COMMENT ON COLUMN outbox.stats_hourly.latency_bucket IS 'Latency histogram bucket (10 ms, 25 ms, ... 24 h bounds), in milliseconds from enqueue to final outcome.';
COMMENT ON COLUMN outbox.stats_hourly.deliveries IS 'Deliveries that finished in this hour and bucket.';
COMMENT ON COLUMN outbox.stats_hourly.attempts IS 'Attempts those deliveries took, in total.';
COMMENT ON COLUMN outbox.stats_hourly.latency_ms_sum IS 'Sum of their latencies, in milliseconds.';
COMMENT ON TABLE outbox.stats_retired IS 'Sums of the rollup hours retention removed (older than 90 days), per endpoint, outcome and latency bucket: added to outbox.stats_hourly they give totals that never go down (the counters in outbox.metrics).';
COMMENT ON COLUMN outbox.stats_retired.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.stats_retired.outcome IS 'Final status counted: delivered or dead.';
COMMENT ON COLUMN outbox.stats_retired.latency_bucket IS 'Latency histogram bucket, as in outbox.stats_hourly.';
COMMENT ON COLUMN outbox.stats_retired.deliveries IS 'Deliveries counted.';
COMMENT ON COLUMN outbox.stats_retired.attempts IS 'Attempts those deliveries took.';
COMMENT ON COLUMN outbox.stats_retired.latency_ms_sum IS 'Sum of their latencies, milliseconds.';

-------------------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------------------

COMMENT ON VIEW outbox.endpoints IS 'Live (not deleted) endpoints, without secrets. Header values are shown only to roles that may read secrets; others see ******** in their place.';
COMMENT ON COLUMN outbox.endpoints.id IS 'Endpoint id.';
COMMENT ON COLUMN outbox.endpoints.url IS 'URL each event is POSTed to.';
COMMENT ON COLUMN outbox.endpoints.event_types IS 'Event types it receives (exact names and ''prefix.*''); NULL = every event.';
COMMENT ON COLUMN outbox.endpoints.enabled IS 'false: its deliveries wait until it is enabled.';
COMMENT ON COLUMN outbox.endpoints.disabled_reason IS 'Why it was disabled; NULL while enabled.';
COMMENT ON COLUMN outbox.endpoints.timeout IS 'Per-attempt timeout; NULL = the outbox.request_timeout setting.';
COMMENT ON COLUMN outbox.endpoints.headers IS 'Extra request headers (values masked as ******** unless the role may read secrets).';
COMMENT ON COLUMN outbox.endpoints.tenant_id IS 'Tenant the endpoint belongs to.';
COMMENT ON COLUMN outbox.endpoints.description IS 'Free-text description.';
COMMENT ON COLUMN outbox.endpoints.created_at IS 'When the endpoint was created.';
COMMENT ON COLUMN outbox.endpoints.updated_at IS 'When the endpoint was last changed.';
COMMENT ON COLUMN outbox.endpoints.ordered IS 'true: deliveries go strictly one at a time in enqueue order.';
COMMENT ON COLUMN outbox.endpoints.rate_limit IS 'Most requests per second; NULL = unlimited.';
COMMENT ON COLUMN outbox.endpoints.max_in_flight IS 'Most requests at once; NULL = the outbox.endpoint_max_in_flight setting.';
COMMENT ON COLUMN outbox.endpoints.uid IS 'The caller''s key for the endpoint (unique per tenant among live endpoints); NULL if none.';

COMMENT ON VIEW outbox.deliveries IS 'Every delivery: those with state (outbox.delivery) and first-attempt successes (outbox.history).';
COMMENT ON COLUMN outbox.deliveries.id IS 'Delivery id.';
COMMENT ON COLUMN outbox.deliveries.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.deliveries.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.deliveries.endpoint_id IS 'The endpoint it is sent to.';
COMMENT ON COLUMN outbox.deliveries.endpoint_url IS 'That endpoint''s URL.';
COMMENT ON COLUMN outbox.deliveries.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.deliveries.status IS 'pending, in_flight, delivered, dead or cancelled.';
COMMENT ON COLUMN outbox.deliveries.retrying IS 'true when pending after at least one failed attempt.';
COMMENT ON COLUMN outbox.deliveries.attempts IS 'Attempts started so far (the attempt number).';
COMMENT ON COLUMN outbox.deliveries.next_attempt_at IS 'When a pending delivery becomes due; NULL in other statuses.';
COMMENT ON COLUMN outbox.deliveries.lease_expires_at IS 'When an in_flight delivery''s lease expires (then it may be claimed again); NULL in other statuses.';
COMMENT ON COLUMN outbox.deliveries.lease_owner IS 'The sender that claimed it last.';
COMMENT ON COLUMN outbox.deliveries.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.deliveries.last_attempt_at IS 'When the outcome of the latest attempt was recorded.';
COMMENT ON COLUMN outbox.deliveries.finished_at IS 'When it reached a final status; NULL while unfinished.';
COMMENT ON COLUMN outbox.deliveries.last_status_code IS 'HTTP status of the latest attempt; NULL when none was received.';
COMMENT ON COLUMN outbox.deliveries.last_error IS 'Error text of the latest failed attempt.';
COMMENT ON COLUMN outbox.deliveries.payload IS 'Event data.';

COMMENT ON VIEW outbox.attempts IS 'Every acknowledged attempt and operator repair (outbox.attempt), plus first-attempt successes (outbox.history).';
COMMENT ON COLUMN outbox.attempts.id IS 'Attempt record id.';
COMMENT ON COLUMN outbox.attempts.delivery_id IS 'The delivery attempted.';
COMMENT ON COLUMN outbox.attempts.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.attempts.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.attempts.attempt IS 'Attempt number; 0 for requeue and replay.';
COMMENT ON COLUMN outbox.attempts.outcome IS 'delivered, retry or dead; requeued, replayed or cancelled for an operator''s repair.';
COMMENT ON COLUMN outbox.attempts.status_code IS 'HTTP status received; NULL when none.';
COMMENT ON COLUMN outbox.attempts.error IS 'Error text of a failed attempt; NULL on success.';
COMMENT ON COLUMN outbox.attempts.duration_ms IS 'Request duration in milliseconds.';
COMMENT ON COLUMN outbox.attempts.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';
COMMENT ON COLUMN outbox.attempts.worker IS 'Who recorded it: the sender, or the session user for a repair.';
COMMENT ON COLUMN outbox.attempts.created_at IS 'When the outcome was recorded.';

COMMENT ON VIEW outbox.dead_letters IS 'Dead deliveries: the receiver refused, or every retry failed. Put them back with outbox.retry_dead.';
COMMENT ON COLUMN outbox.dead_letters.id IS 'Delivery id.';
COMMENT ON COLUMN outbox.dead_letters.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.dead_letters.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.dead_letters.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.dead_letters.endpoint_url IS 'That endpoint''s URL.';
COMMENT ON COLUMN outbox.dead_letters.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.dead_letters.attempts IS 'Attempts made.';
COMMENT ON COLUMN outbox.dead_letters.last_status_code IS 'HTTP status of the last attempt; NULL when none was received.';
COMMENT ON COLUMN outbox.dead_letters.last_error IS 'Error text of the last attempt.';
COMMENT ON COLUMN outbox.dead_letters.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.dead_letters.died_at IS 'When the delivery went dead.';
COMMENT ON COLUMN outbox.dead_letters.payload IS 'Event data.';

COMMENT ON VIEW outbox.endpoint_health IS 'One row per live endpoint: its backlog, recent results, circuit breaker, and what holds its queue back, if anything.';
COMMENT ON COLUMN outbox.endpoint_health.endpoint_id IS 'Endpoint id.';
COMMENT ON COLUMN outbox.endpoint_health.url IS 'Endpoint URL.';
COMMENT ON COLUMN outbox.endpoint_health.enabled IS 'false: nothing is claimed for it.';
COMMENT ON COLUMN outbox.endpoint_health.disabled_reason IS 'Why it was disabled; NULL while enabled.';
COMMENT ON COLUMN outbox.endpoint_health.tenant_id IS 'Tenant the endpoint belongs to.';
COMMENT ON COLUMN outbox.endpoint_health.pending IS 'Deliveries pending (due or not).';
COMMENT ON COLUMN outbox.endpoint_health.in_flight IS 'Deliveries in flight.';
COMMENT ON COLUMN outbox.endpoint_health.retrying IS 'Pending deliveries with at least one failed attempt.';
COMMENT ON COLUMN outbox.endpoint_health.oldest_pending_age IS 'Age of the oldest pending delivery; NULL when none is pending.';
COMMENT ON COLUMN outbox.endpoint_health.consecutive_failures IS 'Failed attempts since the last success.';
COMMENT ON COLUMN outbox.endpoint_health.last_success_at IS 'When an attempt last succeeded; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_health.last_failure_at IS 'When an attempt last failed; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_health.last_error IS 'Error of the last failed attempt.';
COMMENT ON COLUMN outbox.endpoint_health.circuit IS 'Circuit breaker: closed, open (nothing claimed until next_probe_at) or half_open (a probe is in flight).';
COMMENT ON COLUMN outbox.endpoint_health.circuit_opened_at IS 'When the circuit last opened from closed.';
COMMENT ON COLUMN outbox.endpoint_health.next_probe_at IS 'When an open circuit sends its next probe.';
COMMENT ON COLUMN outbox.endpoint_health.circuit_cooldown IS 'Current wait of an open circuit before its probe (doubles after each failed probe).';
COMMENT ON COLUMN outbox.endpoint_health.failing_since IS 'Start of the current run of failures; auto-disable counts from it. NULL when not failing.';
COMMENT ON COLUMN outbox.endpoint_health.held_reason IS 'What holds the queue back: disabled, circuit open, circuit half-open, an ordered endpoint''s head in flight or not due yet, or max_in_flight reached. NULL: nothing.';
COMMENT ON COLUMN outbox.endpoint_health.held_until IS 'Until when it is held; NULL: until an operator or an outcome acts.';

COMMENT ON VIEW outbox.recent_failures IS 'Failed attempts (outcome retry or dead), newest first.';
COMMENT ON COLUMN outbox.recent_failures.created_at IS 'When the attempt''s outcome was recorded.';
COMMENT ON COLUMN outbox.recent_failures.delivery_id IS 'The delivery attempted.';
COMMENT ON COLUMN outbox.recent_failures.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.recent_failures.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.recent_failures.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.recent_failures.endpoint_url IS 'That endpoint''s URL.';
COMMENT ON COLUMN outbox.recent_failures.attempt IS 'Attempt number.';
COMMENT ON COLUMN outbox.recent_failures.outcome IS 'retry or dead.';
COMMENT ON COLUMN outbox.recent_failures.status_code IS 'HTTP status received; NULL when none (timeout, connection error).';
COMMENT ON COLUMN outbox.recent_failures.error IS 'Error text.';
COMMENT ON COLUMN outbox.recent_failures.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';

COMMENT ON VIEW outbox.log_status IS 'How far reading the event log has come. Unread events that stay there mean nothing (no worker, no outbox.claim) is reading the log.';
COMMENT ON COLUMN outbox.log_status.unread IS 'Events committed but not read yet (so not yet deliveries); should be near zero.';
COMMENT ON COLUMN outbox.log_status.oldest_unread_age IS 'How long the oldest unread event has waited; NULL when none.';
COMMENT ON COLUMN outbox.log_status.last_read_at IS 'When the reader last recorded progress.';
COMMENT ON COLUMN outbox.log_status.reading IS 'true while a batch is being read in parts.';

COMMENT ON VIEW outbox.metrics IS 'Counters, gauges and the delivery latency histogram for Prometheus exporters: one row per metric and label set (see contrib/). The *_total counters and the histogram never go down.';
COMMENT ON COLUMN outbox.metrics.metric IS 'Metric name, e.g. outbox_deliveries, outbox_log_unread, outbox_finished_total.';
COMMENT ON COLUMN outbox.metrics.status IS 'status label: pending, in_flight or dead for outbox_deliveries; delivered or dead for outbox_finished_total; the circuit state for outbox_endpoint_circuit_open; NULL otherwise.';
COMMENT ON COLUMN outbox.metrics.endpoint_id IS 'endpoint_id label, for per-endpoint metrics; NULL otherwise.';
COMMENT ON COLUMN outbox.metrics.value IS 'The value (counts; ages and latencies in seconds).';
COMMENT ON COLUMN outbox.metrics.le IS 'le label of outbox_delivery_latency_seconds_bucket: the bucket''s upper bound in seconds, or +Inf; NULL otherwise.';

COMMENT ON VIEW outbox.triggers IS 'Every table that carries an outbox.trigger, and how it is set up.';
COMMENT ON COLUMN outbox.triggers.table_name IS 'The table.';
COMMENT ON COLUMN outbox.triggers.trigger_name IS 'The trigger''s name.';
COMMENT ON COLUMN outbox.triggers.enabled IS 'false when the trigger is disabled.';
COMMENT ON COLUMN outbox.triggers.events IS 'Row changes that make events: INSERT, UPDATE, DELETE.';
COMMENT ON COLUMN outbox.triggers.event_prefix IS 'Event type prefix (default: the table''s name): events are <prefix>.created, .updated, .deleted.';
COMMENT ON COLUMN outbox.triggers.arguments IS 'Arguments after the prefix: tenant column, exclude=..., shape=....';
COMMENT ON COLUMN outbox.triggers.definition IS 'The full CREATE TRIGGER statement.';

-------------------------------------------------------------------------------------------
-- Functions
-------------------------------------------------------------------------------------------

COMMENT ON FUNCTION outbox.create_endpoint(text,text[],text,jsonb,interval,text,text,boolean,boolean,integer,integer,text) IS 'Registers a webhook endpoint and returns its id; generates a secret when none is given. With uid, calling it again with the same settings returns the existing endpoint (other settings: 23505).';
COMMENT ON FUNCTION outbox.update_endpoint(uuid,text,text[],text,jsonb,interval,text,boolean,integer,integer,text) IS 'Changes the given fields of an endpoint; NULL leaves a field as it is. event_types => ''{*}'', timeout => ''0'' and max_in_flight => 0 restore the defaults, rate_limit => 0 removes the limit, uid => '''' removes the caller''s key.';
COMMENT ON FUNCTION outbox.enable_endpoint(uuid) IS 'Re-enables an endpoint: clears its reason, closes its circuit, restarts its failure count and wakes the worker; deliveries waiting for a retry keep their time.';
COMMENT ON FUNCTION outbox.disable_endpoint(uuid,text) IS 'Stops claiming an endpoint''s deliveries; they stay pending until outbox.enable_endpoint.';
COMMENT ON FUNCTION outbox.delete_endpoint(uuid) IS 'Deletes an endpoint and cancels its unfinished deliveries, returning how many. The row stays (deleted_at set) without its secrets and headers.';
COMMENT ON FUNCTION outbox.endpoint_secret(uuid) IS 'The endpoint''s signing secret (whsec_...) to configure in the receiver. No view shows secrets.';
COMMENT ON FUNCTION outbox.rotate_secret(uuid,text,interval) IS 'Replaces an endpoint''s secret (given or generated) and returns the new one. For overlap (0 to 30 days) requests carry both signatures, so receivers can switch at their own pace.';
COMMENT ON FUNCTION outbox.enqueue(text,jsonb,uuid,text,text,timestamp with time zone) IS 'Appends one event to the log in the caller''s transaction and returns its id (webhook-id); deliveries are made after commit. Optional: one endpoint, idempotent event_id, tenant_id, deliver_at.';
COMMENT ON FUNCTION outbox.trigger() IS 'Row trigger (AFTER ... FOR EACH ROW) that enqueues <prefix>.created, .updated and .deleted events. Arguments: prefix (default: table name), then tenant column or tenant=, exclude=, shape= options.';
COMMENT ON FUNCTION outbox.claim(integer,text,interval,uuid,text) IS 'For senders: claims up to batch_size due deliveries (FOR UPDATE SKIP LOCKED), sets them in_flight for lease, and returns what to send. Respects each endpoint''s delivery control; optionally scoped to one endpoint or tenant.';
COMMENT ON FUNCTION outbox.ack_batch(uuid[],integer[],outbox.attempt_outcome[],integer[],text[],double precision[],timestamp with time zone[],text[],text) IS 'Records the outcomes of many attempts at once and returns the accepted delivery ids. An outcome is accepted only from the holder of the current attempt; others are skipped.';
COMMENT ON FUNCTION outbox.ack(uuid,integer,outbox.attempt_outcome,integer,text,double precision,timestamp with time zone,text,text) IS 'Records one attempt''s outcome (delivered, retry or dead) and returns the delivery''s new status. Refused (55000) unless the caller holds that attempt.';
COMMENT ON FUNCTION outbox.stats() IS 'Queue health in one row: pending, due, in flight, retrying and dead counts, oldest pending age, and last-hour / last-minute results.';
COMMENT ON FUNCTION outbox.delivery_stats(interval,uuid,text,text) IS 'Totals, success rate, average attempts and latency percentiles (ms, enqueue to final outcome) of deliveries finished within since (whole hours), optionally for one endpoint, event type or tenant.';
COMMENT ON FUNCTION outbox.endpoint_stats(interval) IS 'outbox.delivery_stats per endpoint over the window (endpoints without deliveries included).';
COMMENT ON FUNCTION outbox.event_type_stats(interval) IS 'outbox.delivery_stats per event type over the window.';
COMMENT ON FUNCTION outbox.retry_dead(uuid,uuid,timestamp with time zone,timestamp with time zone) IS 'Puts dead deliveries (one, an endpoint''s, and/or those that died in [since, until)) back in the queue, due now, with a fresh retry schedule. Returns how many; at least one argument is required.';
COMMENT ON FUNCTION outbox.replay(uuid,timestamp with time zone,timestamp with time zone) IS 'Sends events already delivered to an endpoint since since (until until) again, as new deliveries with the same event id. Returns how many.';
COMMENT ON FUNCTION outbox.cancel(uuid,uuid) IS 'Cancels unfinished deliveries: one by id, or every one of an endpoint. A sender still holding one has its ack refused. Returns how many.';
COMMENT ON FUNCTION outbox.purge(interval,interval) IS 'Deletes finished deliveries older than older_than (dead ones older than dead_older_than, default the same), with their attempts and orphaned events, now. For manual use; returns how many.';
COMMENT ON FUNCTION outbox.generate_secret() IS 'A fresh signing secret: whsec_ + base64 of 32 random bytes.';
COMMENT ON FUNCTION outbox.retry_delay(integer) IS 'Delay after failed attempt number attempt under outbox.retry_schedule, with +/-20 % jitter; NULL when the schedule is exhausted.';
COMMENT ON FUNCTION outbox.sign(text,text,bigint,text) IS 'The v1,... Standard Webhooks signature of (msg_id, timestamp, body) with a secret, for checking a receiver''s verification.';
COMMENT ON FUNCTION outbox.grant_producer(regrole) IS 'Lets a role enqueue events (outbox.enqueue, outbox.trigger) and nothing else.';
COMMENT ON FUNCTION outbox.grant_operator(regrole) IS 'Lets a role watch and steer delivery: views, statistics, enabling and disabling endpoints, repair. No secrets, endpoint creation, enqueue or claim.';
COMMENT ON FUNCTION outbox.grant_admin(regrole) IS 'Lets a role manage endpoints and their secrets and act as a sender (claim, ack), purge, plus everything operators and producers may do.';
COMMENT ON FUNCTION outbox.grant_worker(regrole) IS 'Grants the role the background worker connects as (outbox.worker_role) exactly what a sender needs, and no table privilege.';

REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
