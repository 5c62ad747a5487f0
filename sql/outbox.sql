-- webhook_outbox schema: tables, indexes, SQL API and views.
--
-- This file is emitted after every Rust function (pgrx `finalize`), so the SQL below may call
-- the validators and policy functions implemented in Rust (outbox._check_*, outbox.retry_delay).
--
-- Naming: tables are singular (outbox.endpoint, outbox.event, outbox.delivery,
-- outbox.attempt); the views people query are plural (outbox.endpoints, outbox.deliveries,
-- outbox.attempts, outbox.dead_letters). Secrets live only in outbox.endpoint.secret, which
-- no view exposes.

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
    CONSTRAINT endpoint_headers_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT endpoint_timeout_range CHECK (timeout IS NULL OR (timeout >= interval '100 milliseconds' AND timeout <= interval '5 minutes')),
    CONSTRAINT endpoint_rate_limit_range CHECK (rate_limit BETWEEN 1 AND 100000),
    CONSTRAINT endpoint_max_in_flight_range CHECK (max_in_flight BETWEEN 1 AND 10000),
    CONSTRAINT endpoint_secret_present CHECK (secret IS NOT NULL OR deleted_at IS NOT NULL)
);

CREATE INDEX endpoint_tenant_idx ON outbox.endpoint (tenant_id) WHERE deleted_at IS NULL;

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

-------------------------------------------------------------------------------------------
-- Internal helpers
-------------------------------------------------------------------------------------------

-- Does an endpoint's filter accept an event type? NULL filter = everything; '*' = everything;
-- 'order.*' = every type starting with 'order.'.
CREATE FUNCTION outbox._filter_matches(filter text[], event_type text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT filter IS NULL
        OR event_type = ANY (filter)
        OR EXISTS (
            SELECT 1 FROM unnest(filter) AS p
            WHERE p = '*' OR (right(p, 2) = '.*' AND starts_with(event_type, left(p, -1)))
        )
$$;

-- Upper bounds (ms) of the latency histogram's buckets; the last bucket is open.
CREATE FUNCTION outbox._bucket_bounds()
RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT ARRAY[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                 1800000, 7200000, 86400000]::double precision[]
$$;

-- Lower bound (ms) of latency bucket i (0 for the first).
CREATE FUNCTION outbox._bucket_lower(i integer)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN i <= 0 THEN 0 ELSE (outbox._bucket_bounds())[i] END
$$;

CREATE FUNCTION outbox._check_timeout(t interval)
RETURNS interval
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF t IS NOT NULL AND (t < interval '100 milliseconds' OR t > interval '5 minutes') THEN
        RAISE EXCEPTION 'timeout % is out of range', t
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use a timeout between 100 milliseconds and 5 minutes, or NULL for outbox.request_timeout.';
    END IF;
    RETURN t;
END
$$;

-- Validates outbox.claim's arguments and returns the batch size to use as its LIMIT.
CREATE FUNCTION outbox._check_claim(batch_size integer, lease interval)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF batch_size IS NULL OR batch_size < 1 OR batch_size > 10000 THEN
        RAISE EXCEPTION 'batch_size % is out of range', coalesce(batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Claim between 1 and 10000 deliveries at a time.';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' OR lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease % is out of range', coalesce(lease::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use a lease between 1 second and 1 day, longer than the time a request may take.';
    END IF;
    RETURN batch_size;
END
$$;

-- outbox.ack_batch's arrays must line up; NULL arrays stand for "all NULL".
CREATE FUNCTION outbox._check_ack_lengths(lengths integer[])
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(lengths[2:]) AS l WHERE l IS NOT NULL AND l <> lengths[1]) THEN
        RAISE EXCEPTION 'outbox.ack_batch: the arrays have different lengths (%)', array_to_string(lengths, ', ', 'NULL')
            USING ERRCODE = 'array_subscript_error',
                  HINT = 'Pass one element per delivery in every array, or NULL for an array you do not use.';
    END IF;
    RETURN true;
END
$$;

-- An endpoint's request limit (rate_limit, max_in_flight): NULL for none, else 1..max.
CREATE FUNCTION outbox._check_limit(what text, v integer, max integer)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF v IS NOT NULL AND (v < 1 OR v > max) THEN
        RAISE EXCEPTION '% % is out of range', what, v
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Use a %s between 1 and %s, or NULL for no limit of the endpoint''s own.', what, max);
    END IF;
    RETURN v;
END
$$;

-- When an enqueued event may first be sent: deliver_at, or now. A time in the past means
-- now; a time more than outbox._max_schedule_ahead() ahead, or a non-finite one, is
-- refused: every due time the worker computes with stays an ordinary timestamp (a retry
-- time an external sender gives is clamped to the same range).
CREATE FUNCTION outbox._max_schedule_ahead()
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '1 year' $$;

CREATE FUNCTION outbox._check_deliver_at(deliver_at timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF deliver_at IS NULL THEN
        RETURN now();
    END IF;
    IF NOT isfinite(deliver_at) OR deliver_at > now() + outbox._max_schedule_ahead() THEN
        RAISE EXCEPTION 'deliver_at % is out of range', deliver_at
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use a finite time at most one year ahead, or NULL to deliver at once.';
    END IF;
    RETURN greatest(deliver_at, now());
END
$$;

-- `t` cut to at most `max_bytes` bytes of UTF-8 at a character boundary, marked with '…'
-- when cut. Error texts and response bodies come from receivers and external senders:
-- bounded here, they can neither bloat the history nor overflow a notification.
CREATE FUNCTION outbox._truncate(t text, max_bytes integer)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    n integer := max_bytes - 3;
    cut text;
BEGIN
    IF t IS NULL OR octet_length(t) <= max_bytes THEN
        RETURN t;
    END IF;
    IF max_bytes <= 3 THEN
        RETURN '';
    END IF;
    cut := left(t, n);
    -- Characters are 1 to 4 bytes: each round drops at least what is still over.
    WHILE octet_length(cut) > max_bytes - 3 LOOP
        n := n - greatest((octet_length(cut) - (max_bytes - 3) + 3) / 4, 1);
        cut := left(t, n);
    END LOOP;
    RETURN cut || '…';
END
$$;

-- Longest error text kept per attempt (and per endpoint), in bytes.
CREATE FUNCTION outbox._max_error_bytes()
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 2000 $$;

-- The delivery-control settings, read where SQL decides (claim, ack). A session that has
-- not loaded the library sees the documented defaults. (The small helpers on the claim and
-- ack path are plpgsql rather than sql: their plans are prepared once per session instead
-- of on every call.)
CREATE FUNCTION outbox._policy(
    OUT circuit_threshold integer,
    OUT circuit_cooldown interval,
    OUT circuit_max_cooldown interval,
    OUT auto_disable_after interval,
    OUT endpoint_max_in_flight integer
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    circuit_threshold := coalesce(current_setting('outbox.circuit_threshold', true), '10')::integer;
    circuit_cooldown := coalesce(current_setting('outbox.circuit_cooldown', true), '1min')::interval;
    circuit_max_cooldown := coalesce(current_setting('outbox.circuit_max_cooldown', true), '1h')::interval;
    auto_disable_after := coalesce(current_setting('outbox.auto_disable_after', true), '5d')::interval;
    endpoint_max_in_flight := coalesce(current_setting('outbox.endpoint_max_in_flight', true), '64')::integer;
END
$$;

-- Counts an endpoint's deliveries in flight, and corrects outbox.endpoint_state.in_flight
-- if it says otherwise (the claim asks only when the counter says the endpoint is full, so
-- a counter that drifted never holds an endpoint back for long).
CREATE FUNCTION outbox._recount_in_flight(p_endpoint_id uuid)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    n integer := (SELECT count(*) FROM outbox.delivery d
                   WHERE d.endpoint_id = p_endpoint_id AND d.status = 'in_flight');
BEGIN
    UPDATE outbox.endpoint_state SET in_flight = n WHERE endpoint_id = p_endpoint_id AND in_flight <> n;
    RETURN n;
END
$$;

-- Leases that expired (their sender died or hung) make their deliveries pending again, due
-- at once; the attempt number stays, so the old holder's late ack is refused. Returns how
-- many. The claim runs it first, for the endpoints it may serve. Endpoints whose state row
-- someone else holds (an operator's open transaction) are left for a later call: a claimer
-- never waits for them.
CREATE FUNCTION outbox._requeue_expired(p_endpoint_id uuid)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
DECLARE
    n integer;
BEGIN
    WITH free AS (
        SELECT s.endpoint_id FROM outbox.endpoint_state s
         WHERE (p_endpoint_id IS NULL OR s.endpoint_id = p_endpoint_id)
           AND EXISTS (SELECT 1 FROM outbox.delivery q
                        WHERE q.endpoint_id = s.endpoint_id AND q.status = 'in_flight' AND q.due_at <= now())
           FOR UPDATE OF s SKIP LOCKED
    ),
    expired AS (
        UPDATE outbox.delivery d
           SET status = 'pending', lease_owner = NULL,
               last_error = 'lease expired before the sender reported back'
          FROM (SELECT x.id
                  FROM free f
                 CROSS JOIN LATERAL (
                       SELECT q.id FROM outbox.delivery q
                        WHERE q.endpoint_id = f.endpoint_id AND q.status = 'in_flight' AND q.due_at <= now()
                          FOR UPDATE SKIP LOCKED) x) x
         WHERE d.id = x.id
        RETURNING d.endpoint_id
    ),
    counted AS (
        UPDATE outbox.endpoint_state s SET in_flight = greatest(s.in_flight - c.n, 0)
          FROM (SELECT endpoint_id, count(*)::integer AS n FROM expired GROUP BY endpoint_id) c
         WHERE s.endpoint_id = c.endpoint_id
        RETURNING c.n
    )
    SELECT coalesce(sum(counted.n), 0) INTO n FROM counted;
    RETURN n;
END
$$;

-- Leases of built-in workers that are gone (killed, crashed, restarted) go back to pending
-- at once. A worker's leases carry its name, 'worker:<pid>'; a pid no webhook_outbox worker
-- of this server runs under any more will never report back. A worker calls this when it
-- starts, so that after a restart its endpoints resume at once instead of counting the dead
-- worker's requests against their max_in_flight until the leases expire. (External senders
-- must therefore not call themselves 'worker:<number>'.) Returns how many.
CREATE FUNCTION outbox._requeue_orphaned()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    live text[] := ARRAY(SELECT 'worker:' || a.pid FROM pg_stat_activity a
                          WHERE a.backend_type = 'webhook_outbox worker');
    n integer;
BEGIN
    WITH orphaned AS (
        SELECT q.id, q.endpoint_id FROM outbox.delivery q
         WHERE q.status = 'in_flight' AND q.lease_owner ~ '^worker:[0-9]+$'
           AND q.lease_owner <> ALL (live)
    ),
    free AS (
        SELECT s.endpoint_id FROM outbox.endpoint_state s
         WHERE s.endpoint_id IN (SELECT endpoint_id FROM orphaned)
           FOR UPDATE OF s SKIP LOCKED
    ),
    released AS (
        UPDATE outbox.delivery d
           SET status = 'pending', lease_owner = NULL, due_at = now(),
               last_error = 'its sender stopped before reporting back'
          FROM (SELECT q.id FROM outbox.delivery q
                 WHERE q.id IN (SELECT o.id FROM orphaned o JOIN free f USING (endpoint_id))
                   AND q.status = 'in_flight'
                   FOR UPDATE SKIP LOCKED) x
         WHERE d.id = x.id
        RETURNING d.endpoint_id
    ),
    counted AS (
        UPDATE outbox.endpoint_state s SET in_flight = greatest(s.in_flight - c.n, 0)
          FROM (SELECT endpoint_id, count(*)::integer AS n FROM released GROUP BY endpoint_id) c
         WHERE s.endpoint_id = c.endpoint_id
        RETURNING c.n
    )
    SELECT coalesce(sum(counted.n), 0) INTO n FROM counted;
    RETURN n;
END
$$;

-- The state rows (and deliveries) of `ids` that this transaction can lock now, locked: the
-- worker records only those outcomes, and keeps the rest for a later cycle, so that an
-- operator's open transaction on one endpoint never makes it wait (nor anyone else wait
-- on it). Returns the ids it may record.
CREATE FUNCTION outbox._lock_for_ack(ids uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    got uuid[];
BEGIN
    WITH mine AS (
        SELECT d.id, d.endpoint_id FROM outbox.delivery d
         WHERE d.id = ANY (ids)
           FOR NO KEY UPDATE SKIP LOCKED
    ),
    free AS (
        SELECT s.endpoint_id FROM outbox.endpoint_state s
         WHERE s.endpoint_id IN (SELECT endpoint_id FROM mine)
         ORDER BY s.endpoint_id
           FOR UPDATE SKIP LOCKED
    )
    SELECT coalesce(array_agg(m.id), '{}') INTO got FROM mine m JOIN free f USING (endpoint_id);
    -- Ids of deliveries that no longer exist lock nothing, and are recorded (as nothing).
    RETURN got || ARRAY(SELECT i FROM unnest(ids) i
                         WHERE NOT EXISTS (SELECT 1 FROM outbox.delivery d WHERE d.id = i));
END
$$;

-- The circuit breaker's rule, in one place: an endpoint's next circuit state after a batch
-- of attempts that had `p_failures` consecutive failures so far and did or did not succeed.
-- Closed opens after outbox.circuit_threshold failures (0: never) for outbox.circuit_cooldown;
-- a failed probe (half_open) opens it again for twice as long, up to
-- outbox.circuit_max_cooldown; any success closes it. (open -> half_open is the claim's.)
CREATE FUNCTION outbox._circuit_next(
    p_circuit outbox.circuit_state, p_cooldown interval, p_next_probe_at timestamptz,
    p_opened_at timestamptz, p_changed_at timestamptz, p_failures integer, p_succeeded boolean,
    OUT circuit outbox.circuit_state, OUT cooldown interval, OUT next_probe_at timestamptz,
    OUT opened_at timestamptz, OUT changed_at timestamptz
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT n.circuit, n.cooldown, n.next_probe_at,
           CASE WHEN n.circuit = 'closed' THEN NULL
                WHEN p_circuit = 'closed' THEN now() ELSE p_opened_at END,
           CASE WHEN n.circuit <> p_circuit THEN now() ELSE p_changed_at END
      INTO circuit, cooldown, next_probe_at, opened_at, changed_at
      FROM outbox._policy() p
     CROSS JOIN LATERAL (
           SELECT CASE WHEN p_succeeded THEN 'closed'::outbox.circuit_state
                       WHEN p_circuit = 'half_open' THEN 'open'
                       WHEN p_circuit = 'closed' AND p.circuit_threshold > 0
                            AND p_failures >= p.circuit_threshold THEN 'open'
                       ELSE p_circuit END AS circuit,
                  CASE WHEN p_succeeded THEN NULL
                       WHEN p_circuit = 'half_open'
                            THEN least(coalesce(p_cooldown, p.circuit_cooldown) * 2, p.circuit_max_cooldown)
                       WHEN p_circuit = 'closed' AND p.circuit_threshold > 0
                            AND p_failures >= p.circuit_threshold THEN p.circuit_cooldown
                       ELSE p_cooldown END AS cooldown) c
     CROSS JOIN LATERAL (
           SELECT c.circuit,
                  c.cooldown,
                  CASE WHEN c.circuit = 'closed' THEN NULL
                       WHEN c.circuit = 'open' AND p_circuit <> 'open' THEN now() + c.cooldown
                       ELSE p_next_probe_at END AS next_probe_at) n;
END
$$;

-- The live endpoint, locked: FOR NO KEY UPDATE by the functions that change it, FOR SHARE
-- by enqueue (many producers may share it, and a concurrent delete waits for them). Not
-- FOR UPDATE: that would also block the foreign-key checks (FOR KEY SHARE) the worker's
-- writes make, while the operator in turn waits for the worker's state row: a deadlock.
CREATE FUNCTION outbox._endpoint_or_raise(p_endpoint_id uuid, p_for_update boolean DEFAULT true)
RETURNS outbox.endpoint
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    ep outbox.endpoint;
BEGIN
    IF p_for_update THEN
        SELECT * INTO ep FROM outbox.endpoint WHERE id = p_endpoint_id AND deleted_at IS NULL FOR NO KEY UPDATE;
    ELSE
        SELECT * INTO ep FROM outbox.endpoint WHERE id = p_endpoint_id AND deleted_at IS NULL FOR SHARE;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'endpoint % does not exist', coalesce(p_endpoint_id::text, 'NULL')
            USING ERRCODE = 'no_data_found',
                  HINT = 'List endpoints with: SELECT id, url FROM outbox.endpoints;';
    END IF;
    RETURN ep;
END
$$;

-------------------------------------------------------------------------------------------
-- Live feed and operator events (LISTEN / NOTIFY)
-------------------------------------------------------------------------------------------

-- Is the live feed on (outbox.live_feed)? Off unless switched on.
CREATE FUNCTION outbox._feed_on()
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(current_setting('outbox.live_feed', true), 'off') = 'on'
$$;

-- Is there room in the NOTIFY queue? A listener that never reads fills it, and a full queue
-- would fail the commit of whoever notifies: past half full, announcements are skipped (the
-- history and the views keep everything).
CREATE FUNCTION outbox._notify_room()
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_notification_queue_usage() < 0.5 THEN
        RETURN true;
    END IF;
    RAISE WARNING 'webhook_outbox: the NOTIFY queue is % full (a listener is not reading); announcements are skipped',
        to_char(pg_notification_queue_usage() * 100, 'FM990%');
    RETURN false;
END
$$;

-- Publishes one status change of a delivery on the live feed: channel outbox_feed, the
-- endpoint's channel outbox_feed_<endpoint id>, and the tenant's outbox_feed_tenant_<tenant>
-- (for tenant ids of at most 44 bytes, the rest of a channel name's room). Any role that
-- can connect may LISTEN, so the payload carries ids and the status only; whoever may know
-- more reads it from outbox.deliveries.
CREATE FUNCTION outbox._feed(p_id uuid, p_endpoint_id uuid, p_tenant_id text, p_event_type text,
                             p_status text, p_attempt integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    payload text := json_build_object('id', p_id, 'endpoint_id', p_endpoint_id,
                                      'status', p_status, 'attempt', p_attempt)::text;
BEGIN
    IF NOT outbox._notify_room() THEN
        RETURN;
    END IF;
    PERFORM pg_notify('outbox_feed', payload);
    PERFORM pg_notify('outbox_feed_' || p_endpoint_id, payload);
    IF p_tenant_id IS NOT NULL AND octet_length(p_tenant_id) <= 44 THEN
        PERFORM pg_notify('outbox_feed_tenant_' || p_tenant_id, payload);
    END IF;
END
$$;

-- Tells operators that something needs attention: NOTIFY on channel outbox_operator, and,
-- when outbox.operator_endpoint names an endpoint, an event of type `kind` delivered there
-- (never about deliveries to that endpoint itself, so a broken operator endpoint cannot
-- feed on itself). Any role that can connect may LISTEN, so the notification carries the
-- kind and the ids in `details` only (never URLs, reasons or error texts); the operator
-- endpoint, chosen by an administrator, gets all of `details`.
CREATE FUNCTION outbox._operator_event(kind text, details jsonb, about_endpoint uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target text := nullif(current_setting('outbox.operator_endpoint', true), '');
BEGIN
    IF outbox._notify_room() THEN
        PERFORM pg_notify('outbox_operator',
            (jsonb_build_object('kind', kind)
             || coalesce((SELECT jsonb_object_agg(d.key, d.value) FROM jsonb_each(details) d
                           WHERE d.key LIKE '%\_id' AND jsonb_typeof(d.value) = 'string'), '{}'))::text);
    END IF;
    IF target IS NOT NULL AND target IS DISTINCT FROM about_endpoint::text THEN
        BEGIN
            PERFORM outbox.enqueue(kind, details, endpoint_id => target::uuid);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'webhook_outbox: cannot deliver the operator event to outbox.operator_endpoint %: %', target, SQLERRM;
        END;
    END IF;
END
$$;

-------------------------------------------------------------------------------------------
-- Endpoints
-------------------------------------------------------------------------------------------

CREATE FUNCTION outbox.create_endpoint(
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
    max_in_flight integer DEFAULT NULL
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id uuid;
BEGIN
    INSERT INTO outbox.endpoint (url, secret, event_types, headers, timeout, tenant_id, description, enabled,
                                 ordered, rate_limit, max_in_flight)
    VALUES (
        outbox._check_url(create_endpoint.url),
        CASE WHEN create_endpoint.secret IS NULL THEN outbox.generate_secret()
             ELSE outbox._check_secret(create_endpoint.secret) END,
        outbox._check_event_types(create_endpoint.event_types),
        outbox._check_headers(coalesce(create_endpoint.headers, '{}')),
        outbox._check_timeout(create_endpoint.timeout),
        outbox._check_tenant(create_endpoint.tenant_id),
        create_endpoint.description,
        coalesce(create_endpoint.enabled, true),
        coalesce(create_endpoint.ordered, false),
        outbox._check_limit('rate_limit', create_endpoint.rate_limit, 100000),
        outbox._check_limit('max_in_flight', create_endpoint.max_in_flight, 10000)
    )
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- NULL arguments leave a field unchanged. event_types => '{*}' makes the endpoint receive
-- every event again; timeout => '0' returns it to the outbox.request_timeout default;
-- rate_limit => 0 removes the limit; max_in_flight => 0 returns it to the
-- outbox.endpoint_max_in_flight default. Making an endpoint ordered puts what it has queued
-- in enqueue order first.
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
    max_in_flight integer DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM outbox._endpoint_or_raise(update_endpoint.endpoint_id);
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

CREATE FUNCTION outbox.enable_endpoint(endpoint_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM outbox._endpoint_or_raise(enable_endpoint.endpoint_id);
    UPDATE outbox.endpoint SET enabled = true, disabled_reason = NULL, updated_at = now()
    WHERE id = enable_endpoint.endpoint_id;
    -- A fresh start: the circuit closes and the failure streak (which auto-disable counts)
    -- begins again.
    UPDATE outbox.endpoint_state s
       SET consecutive_failures = 0, failing_since = NULL, circuit = 'closed',
           circuit_changed_at = CASE WHEN s.circuit <> 'closed' THEN now() ELSE s.circuit_changed_at END,
           circuit_opened_at = NULL, next_probe_at = NULL, cooldown = NULL, updated_at = now()
     WHERE s.endpoint_id = enable_endpoint.endpoint_id;
    -- Its waiting deliveries are due now: wake the worker when this commits.
    PERFORM outbox._wake_at_commit();
END
$$;

-- A disabled endpoint keeps its pending deliveries; they are sent once it is enabled again.
CREATE FUNCTION outbox.disable_endpoint(endpoint_id uuid, reason text DEFAULT 'disabled by operator')
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM outbox._endpoint_or_raise(disable_endpoint.endpoint_id);
    UPDATE outbox.endpoint SET enabled = false, disabled_reason = coalesce(reason, 'disabled by operator'),
                               updated_at = now()
    WHERE id = disable_endpoint.endpoint_id;
    PERFORM outbox._operator_event('outbox.endpoint.disabled',
        jsonb_build_object('endpoint_id', disable_endpoint.endpoint_id,
                           'reason', coalesce(reason, 'disabled by operator')),
        disable_endpoint.endpoint_id);
END
$$;

-- Deletes an endpoint and cancels its deliveries that were not finished; returns how many
-- were cancelled. A delivery in flight at that moment is cancelled too: an ack from its
-- sender is then refused, so the endpoint's history ends consistently. The row stays for
-- the history to point at, but its secrets and headers (credentials, often) go.
CREATE FUNCTION outbox.delete_endpoint(endpoint_id uuid)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    PERFORM outbox._endpoint_or_raise(delete_endpoint.endpoint_id);
    UPDATE outbox.endpoint
       SET enabled = false, disabled_reason = 'deleted', deleted_at = now(), updated_at = now(),
           secret = NULL, previous_secret = NULL, previous_secret_expires_at = NULL, headers = '{}'
     WHERE id = delete_endpoint.endpoint_id;
    UPDATE outbox.delivery d
       SET status = 'cancelled', finished_at = now(), lease_owner = NULL,
           last_error = 'cancelled: endpoint deleted'
     WHERE d.endpoint_id = delete_endpoint.endpoint_id AND d.status IN ('pending', 'in_flight');
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE outbox.endpoint_state SET in_flight = 0 WHERE endpoint_id = delete_endpoint.endpoint_id;
    RETURN n;
END
$$;

-- The signing secret (whsec_…) to hand to the receiver. Never shown by any view.
CREATE FUNCTION outbox.endpoint_secret(endpoint_id uuid)
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (outbox._endpoint_or_raise(endpoint_secret.endpoint_id, false)).secret
$$;

-- Replaces an endpoint's secret (with `new_secret`, or a generated one) and returns the new
-- one. For `overlap` the old secret stays valid: every request carries both signatures, so
-- receivers can switch at their own pace; afterwards only the new one is sent.
CREATE FUNCTION outbox.rotate_secret(endpoint_id uuid, new_secret text DEFAULT NULL, overlap interval DEFAULT '24 hours')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ep outbox.endpoint;
    fresh text;
BEGIN
    IF overlap IS NULL OR overlap < interval '0' OR overlap > interval '30 days' THEN
        RAISE EXCEPTION 'overlap % is out of range', coalesce(overlap::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Keep the old secret valid between 0 and 30 days (default 24 hours).';
    END IF;
    ep := outbox._endpoint_or_raise(rotate_secret.endpoint_id);
    fresh := CASE WHEN new_secret IS NULL THEN outbox.generate_secret() ELSE outbox._check_secret(new_secret) END;
    IF fresh = ep.secret THEN
        RAISE EXCEPTION 'the new secret is the current one' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE outbox.endpoint e
       SET previous_secret = CASE WHEN overlap > interval '0' THEN e.secret END,
           previous_secret_expires_at = CASE WHEN overlap > interval '0' THEN now() + overlap END,
           secret = fresh,
           updated_at = now()
     WHERE e.id = rotate_secret.endpoint_id;
    RETURN fresh;
END
$$;

-------------------------------------------------------------------------------------------
-- Enqueue
-------------------------------------------------------------------------------------------

-- Creates one delivery per enabled endpoint whose filter matches event_type (same tenant), or
-- exactly one for endpoint_id when it is given (it must be the tenant's own; its filter and
-- enabled flag are not consulted: a disabled endpoint's delivery waits until it is
-- enabled). Runs in the caller's transaction. With event_id (unique per tenant), enqueueing
-- the same event again returns the existing deliveries; the same id with another event type
-- or payload is refused.
CREATE FUNCTION outbox.enqueue(
    event_type  text,
    payload     jsonb,
    endpoint_id uuid        DEFAULT NULL,
    event_id    text        DEFAULT NULL,
    tenant_id   text        DEFAULT NULL,
    deliver_at  timestamptz DEFAULT NULL
)
RETURNS SETOF uuid
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_event_id text;
    v_targets  uuid[];
    v_ordered  boolean[];
    v_endpoint outbox.endpoint;
    v_fed      bigint;
    v_due      timestamptz;
    v_known    outbox.event;
BEGIN
    PERFORM outbox._check_event(enqueue.event_type, enqueue.event_id, enqueue.tenant_id,
                                octet_length(enqueue.payload::text));

    v_due := outbox._check_deliver_at(enqueue.deliver_at);

    IF enqueue.endpoint_id IS NOT NULL THEN
        v_endpoint := outbox._endpoint_or_raise(enqueue.endpoint_id, false);
        IF v_endpoint.tenant_id IS DISTINCT FROM enqueue.tenant_id THEN
            -- Said as if it did not exist: another tenant's endpoints are not to be probed.
            RAISE EXCEPTION 'endpoint % does not exist for tenant %', enqueue.endpoint_id,
                            coalesce(quote_literal(enqueue.tenant_id), 'NULL')
                USING ERRCODE = 'no_data_found',
                      HINT = 'Pass the endpoint''s own tenant_id; list them with: SELECT id, tenant_id FROM outbox.endpoints;';
        END IF;
        v_targets := ARRAY[v_endpoint.id];
        v_ordered := ARRAY[v_endpoint.ordered];
    ELSE
        SELECT array_agg(e.id), array_agg(e.ordered) INTO v_targets, v_ordered
          FROM outbox.endpoint e
         WHERE e.enabled AND e.deleted_at IS NULL
           AND e.tenant_id IS NOT DISTINCT FROM enqueue.tenant_id
           AND outbox._filter_matches(e.event_types, enqueue.event_type);
        IF v_targets IS NULL THEN
            RETURN;  -- nobody subscribed: nothing to store
        END IF;
    END IF;

    v_event_id := coalesce(enqueue.event_id, 'msg_' || replace(gen_random_uuid()::text, '-', ''));

    IF enqueue.event_id IS NULL THEN
        INSERT INTO outbox.event (id, event_type, payload, tenant_id)
        VALUES (v_event_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id);
        RETURN QUERY
            WITH ins AS (
                INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at, seq)
                SELECT v_event_id, t.id, enqueue.tenant_id, v_due,
                       CASE WHEN t.ordered THEN nextval('outbox.delivery_seq') END
                  FROM unnest(v_targets, v_ordered) AS t(id, ordered)
                RETURNING id, endpoint_id
            )
            SELECT ins.id FROM ins
              LEFT JOIN LATERAL (
                  SELECT outbox._feed(ins.id, ins.endpoint_id, enqueue.tenant_id, enqueue.event_type, 'queued', 0)
                   WHERE outbox._feed_on()) feed ON true;
    ELSE
        -- A concurrent transaction enqueueing the same id makes these wait for it, then do
        -- nothing; the SELECTs (new snapshots) then see its rows.
        INSERT INTO outbox.event (id, event_type, payload, tenant_id)
        VALUES (v_event_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id)
        ON CONFLICT (id, tenant_key) DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO v_known FROM outbox.event ev
             WHERE ev.id = v_event_id AND ev.tenant_key = coalesce(enqueue.tenant_id, '');
            IF v_known.event_type IS DISTINCT FROM enqueue.event_type OR v_known.payload IS DISTINCT FROM enqueue.payload THEN
                RAISE EXCEPTION 'event id % was enqueued before with another event type or payload', quote_literal(v_event_id)
                    USING ERRCODE = 'unique_violation',
                          HINT = 'An event id names one event (receivers deduplicate on it): enqueue a new event under a new id.';
            END IF;
        END IF;
        WITH ins AS (
            INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at, seq)
            SELECT v_event_id, t.id, enqueue.tenant_id, v_due,
                   CASE WHEN t.ordered THEN nextval('outbox.delivery_seq') END
              FROM unnest(v_targets, v_ordered) AS t(id, ordered)
            ON CONFLICT (event_id, endpoint_id, replay_of) DO NOTHING
            RETURNING id, endpoint_id
        )
        SELECT count(outbox._feed(ins.id, ins.endpoint_id, enqueue.tenant_id, enqueue.event_type, 'queued', 0))
          INTO v_fed
          FROM ins WHERE outbox._feed_on();
        RETURN QUERY
            SELECT d.id FROM outbox.delivery d
             WHERE d.event_id = v_event_id AND d.endpoint_id = ANY (v_targets) AND d.replay_of IS NULL;
    END IF;
    PERFORM outbox._wake_at_commit();
END
$$;

-- Trigger function: AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION
-- outbox.trigger('order') enqueues order.created / order.updated / order.deleted. The data is
-- {"schema", "table", "op", "record", "old_record"} (old_record only for updates and deletes
-- carry the deleted row in "record"). An optional second argument names a column holding
-- the tenant id.
CREATE FUNCTION outbox.trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_prefix text := coalesce(TG_ARGV[0], TG_TABLE_NAME);
    v_type   text;
    v_data   jsonb;
    v_row    jsonb;
    v_tenant text;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'outbox.trigger() must be used as an AFTER ... FOR EACH ROW trigger'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF TG_OP = 'INSERT' THEN
        v_type := v_prefix || '.created';
        v_row := to_jsonb(NEW);
        v_data := jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP, 'record', v_row);
    ELSIF TG_OP = 'UPDATE' THEN
        v_type := v_prefix || '.updated';
        v_row := to_jsonb(NEW);
        v_data := jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                     'record', v_row, 'old_record', to_jsonb(OLD));
    ELSIF TG_OP = 'DELETE' THEN
        v_type := v_prefix || '.deleted';
        v_row := to_jsonb(OLD);
        v_data := jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP, 'record', v_row);
    ELSE
        RAISE EXCEPTION 'outbox.trigger() handles INSERT, UPDATE and DELETE, not %', TG_OP
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF TG_NARGS > 1 THEN
        IF NOT v_row ? TG_ARGV[1] THEN
            RAISE EXCEPTION 'outbox.trigger(): table %.% has no column "%" for the tenant id', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[1]
                USING ERRCODE = 'undefined_column';
        END IF;
        v_tenant := v_row ->> TG_ARGV[1];
    END IF;
    PERFORM outbox.enqueue(v_type, v_data, tenant_id => v_tenant);
    RETURN NULL;
END
$$;

-------------------------------------------------------------------------------------------
-- Claim and acknowledge (the worker uses these same statements)
-------------------------------------------------------------------------------------------

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
CREATE FUNCTION outbox._claim(
    p_batch_size integer, p_worker text, p_lease interval, p_endpoint_id uuid, p_tenant_id text
)
RETURNS TABLE (o_delivery_id uuid, o_event_id text, o_attempt integer, o_endpoint_id uuid, o_url text,
               o_secret text, o_headers jsonb, o_timeout interval, o_event_type text, o_body text,
               o_tenant_id text, o_previous_secret text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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
                  json_build_object('type', ev.event_type,
                                    'timestamp', to_char(ev.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                                    'data', ev.payload)::text,
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

CREATE FUNCTION outbox.claim(
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
    SELECT * FROM outbox._claim(claim.batch_size, claim.worker, claim.lease, claim.endpoint_id, claim.tenant_id)
$$;

-- Records the outcomes of many attempts at once and returns the deliveries whose outcome was
-- accepted. An outcome is accepted only from the holder of the current attempt: the delivery
-- must be in_flight with exactly that attempt number; anything else (a lease that expired and
-- was claimed again, a cancelled delivery, a repeated ack) changes nothing.
-- A 'retry' without retry_at is scheduled by outbox.retry_delay(attempt) (the
-- outbox.retry_schedule GUC); when the schedule is exhausted the delivery is dead.
CREATE FUNCTION outbox.ack_batch(
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
BEGIN
    -- plpgsql, not sql: its plan is prepared once per session instead of on every call.
    RETURN QUERY
    WITH input AS (
        -- Texts from receivers and senders are bounded before anything stores or
        -- announces them: errors to outbox._max_error_bytes(), bodies to
        -- outbox.max_response_body.
        SELECT i.id, i.attempt, i.outcome, i.status_code,
               CASE WHEN octet_length(i.error) > outbox._max_error_bytes()
                    THEN outbox._truncate(i.error, outbox._max_error_bytes()) ELSE i.error END AS error,
               i.duration_ms, i.retry_at,
               CASE WHEN octet_length(i.response_body) > lim.body_bytes
                    THEN outbox._truncate(i.response_body, lim.body_bytes) ELSE i.response_body END AS response_body
          FROM unnest(ack_batch.delivery_ids, ack_batch.attempts, ack_batch.outcomes,
                      ack_batch.status_codes, ack_batch.errors, ack_batch.durations_ms,
                      ack_batch.retry_at, ack_batch.response_bodies)
               AS i(id, attempt, outcome, status_code, error, duration_ms, retry_at, response_body),
               (SELECT outbox._max_response_body() AS body_bytes) lim
         WHERE outbox._check_ack_lengths(ARRAY[
                   cardinality(ack_batch.delivery_ids), cardinality(ack_batch.attempts),
                   cardinality(ack_batch.outcomes), cardinality(ack_batch.status_codes),
                   cardinality(ack_batch.errors), cardinality(ack_batch.durations_ms),
                   cardinality(ack_batch.retry_at), cardinality(ack_batch.response_bodies)])
    ),
    scheduled AS (
        -- The retry schedule counts the attempts since the last retry_dead; a retry time a
        -- sender asks for stays within the range enqueue allows.
        SELECT input.*,
               CASE WHEN input.outcome <> 'retry' THEN NULL
                    WHEN input.retry_at IS NOT NULL
                         THEN least(greatest(input.retry_at, now()), now() + outbox._max_schedule_ahead())
                    ELSE now() + outbox.retry_delay(input.attempt - coalesce(d.retry_base, 0)) END AS next_at
          FROM input LEFT JOIN outbox.delivery d ON d.id = input.id
    ),
    decided AS (
        SELECT scheduled.*,
               CASE WHEN outcome = 'retry' AND next_at IS NULL THEN 'dead'::outbox.attempt_outcome
                    ELSE outcome END AS final_outcome
          FROM scheduled
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
               last_error = CASE WHEN x.final_outcome = 'dead' AND x.outcome = 'retry'
                                 THEN concat_ws(': ', x.error, 'retry schedule exhausted')
                                 ELSE x.error END
          FROM decided x, outbox.event ev
         -- status is compared as text so that no plan can read delivery_in_flight_idx whole
         -- (a plan cached while few rows were in flight would): each row is found by its id.
         WHERE d.id = x.id AND d.status::text = 'in_flight' AND d.attempts = x.attempt
           AND ev.id = d.event_id AND ev.tenant_key = d.tenant_key
        RETURNING d.id, d.endpoint_id, d.event_id, d.tenant_id, d.created_at, x.attempt, x.final_outcome,
                  x.status_code, x.error, x.duration_ms, x.response_body, ev.event_type
    ),
    hist AS (
        INSERT INTO outbox.attempt (delivery_id, attempt, outcome, status_code, error, duration_ms, response_body, worker)
        SELECT upd.id, upd.attempt, upd.final_outcome, upd.status_code, upd.error, upd.duration_ms,
               upd.response_body, ack_batch.worker
          FROM upd
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
    locked AS (
        -- The state rows, locked in endpoint order, so concurrent acks never deadlock.
        SELECT s.endpoint_id FROM outbox.endpoint_state s
         WHERE s.endpoint_id IN (SELECT endpoint_id FROM batch)
         ORDER BY s.endpoint_id
           FOR UPDATE
    ),
    health AS (
        -- A success in the batch resets the failure streak, otherwise the batch's failures
        -- extend it; the circuit breaker takes its step (outbox._circuit_next) and announces
        -- when the circuit opens or closes again; the finished attempts leave the in-flight
        -- count.
        UPDATE outbox.endpoint_state s
           SET in_flight = greatest(s.in_flight - b.finished, 0),
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
          FROM batch b JOIN locked l ON l.endpoint_id = b.endpoint_id
         WHERE s.endpoint_id = b.endpoint_id
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

-- Records one attempt's outcome ('delivered', 'retry' or 'dead') and returns the delivery's
-- new status. Refused with an ERROR when the caller no longer holds the attempt.
CREATE FUNCTION outbox.ack(
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
        SELECT * INTO d FROM outbox.delivery WHERE id = ack.delivery_id;
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

-------------------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------------------

-- Header values are often credentials: only roles that may read the endpoints' secrets
-- (administrators) see them; others see which headers are set, with masked values.
CREATE VIEW outbox.endpoints AS
SELECT e.id, e.url, e.event_types, e.enabled, e.disabled_reason, e.timeout,
       CASE WHEN pg_catalog.has_function_privilege('outbox.endpoint_secret(uuid)', 'EXECUTE') THEN e.headers
            ELSE (SELECT coalesce(jsonb_object_agg(h.key, '********'), '{}') FROM jsonb_each(e.headers) h)
       END AS headers,
       e.tenant_id, e.description, e.created_at, e.updated_at,
       e.ordered, e.rate_limit, e.max_in_flight
  FROM outbox.endpoint e
 WHERE e.deleted_at IS NULL;

CREATE VIEW outbox.deliveries AS
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
  JOIN outbox.endpoint e ON e.id = d.endpoint_id;

CREATE VIEW outbox.attempts AS
SELECT a.id, a.delivery_id, d.event_id, d.endpoint_id, a.attempt, a.outcome, a.status_code,
       a.error, a.duration_ms, a.response_body, a.worker, a.created_at
  FROM outbox.attempt a
  JOIN outbox.delivery d ON d.id = a.delivery_id;

CREATE VIEW outbox.dead_letters AS
SELECT d.id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url, d.tenant_id,
       d.attempts, d.last_status_code, d.last_error, d.created_at, d.finished_at AS died_at,
       ev.payload
  FROM outbox.delivery d
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE d.status = 'dead';

-------------------------------------------------------------------------------------------
-- Statistics
-------------------------------------------------------------------------------------------

-- Queue health in one row. Every count reads a partial index over the live part of the
-- table (pending, in flight) or a time-bounded range of the finished index, so the cost does not grow with the
-- history kept.
CREATE FUNCTION outbox.stats(
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
          FROM outbox.delivery
         WHERE finished_at >= now() - interval '1 hour'
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

-- Latency percentile (ms) from histogram counts: the bucket where the cumulative count
-- reaches p, interpolated linearly inside it. The open last bucket reports its lower bound.
CREATE FUNCTION outbox._percentile(buckets smallint[], counts bigint[], p double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    WITH b AS (
        SELECT bucket, n, sum(n) OVER (ORDER BY bucket) AS cum, sum(n) OVER () AS total
          FROM unnest(buckets, counts) AS u(bucket, n)
    )
    SELECT CASE WHEN b.bucket >= cardinality(outbox._bucket_bounds()) THEN outbox._bucket_lower(b.bucket)
                ELSE outbox._bucket_lower(b.bucket)
                     + (outbox._bucket_lower(b.bucket + 1) - outbox._bucket_lower(b.bucket))
                       * ((p * b.total - (b.cum - b.n)) / b.n) END
      FROM b
     WHERE b.cum >= p * b.total AND b.n > 0
     ORDER BY b.bucket
     LIMIT 1
$$;

-- Delivery statistics over the last `since` (hour granularity: whole hours that began
-- within the window), optionally for one endpoint, event type or tenant. Reads the hourly
-- rollup, so its cost does not depend on how many deliveries the table holds.
CREATE FUNCTION outbox.delivery_stats(
    since       interval DEFAULT '1 hour',
    endpoint_id uuid     DEFAULT NULL,
    event_type  text     DEFAULT NULL,
    tenant_id   text     DEFAULT NULL,
    OUT total         bigint,
    OUT delivered     bigint,
    OUT dead          bigint,
    OUT success_rate  double precision,
    OUT avg_attempts  double precision,
    OUT p50_ms        double precision,
    OUT p95_ms        double precision,
    OUT p99_ms        double precision
)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH r AS (
        SELECT * FROM outbox.stats_hourly h
         WHERE h.hour >= date_trunc('hour', now() - delivery_stats.since)
           AND (delivery_stats.endpoint_id IS NULL OR h.endpoint_id = delivery_stats.endpoint_id)
           AND (delivery_stats.event_type IS NULL OR h.event_type = delivery_stats.event_type)
           AND (delivery_stats.tenant_id IS NULL OR h.tenant_id = delivery_stats.tenant_id)
    ),
    lat AS (
        SELECT array_agg(latency_bucket ORDER BY latency_bucket) AS b, array_agg(n ORDER BY latency_bucket) AS n
          FROM (SELECT latency_bucket, sum(deliveries)::bigint AS n FROM r WHERE outcome = 'delivered' GROUP BY 1) x
    )
    SELECT coalesce(sum(deliveries), 0)::bigint,
           coalesce(sum(deliveries) FILTER (WHERE outcome = 'delivered'), 0)::bigint,
           coalesce(sum(deliveries) FILTER (WHERE outcome = 'dead'), 0)::bigint,
           (sum(deliveries) FILTER (WHERE outcome = 'delivered'))::double precision / nullif(sum(deliveries), 0),
           sum(attempts)::double precision / nullif(sum(deliveries), 0),
           (SELECT outbox._percentile(lat.b, lat.n, 0.50) FROM lat),
           (SELECT outbox._percentile(lat.b, lat.n, 0.95) FROM lat),
           (SELECT outbox._percentile(lat.b, lat.n, 0.99) FROM lat)
      FROM r
$$;

-- delivery_stats per endpoint over the window (endpoints without deliveries included).
CREATE FUNCTION outbox.endpoint_stats(since interval DEFAULT '1 hour')
RETURNS TABLE (endpoint_id uuid, url text, total bigint, delivered bigint, dead bigint,
               success_rate double precision, avg_attempts double precision,
               p50_ms double precision, p95_ms double precision, p99_ms double precision)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.id, e.url, s.*
      FROM outbox.endpoint e, LATERAL outbox.delivery_stats(endpoint_stats.since, e.id) s
     WHERE e.deleted_at IS NULL
     ORDER BY s.total DESC, e.created_at
$$;

-- delivery_stats per event type over the window.
CREATE FUNCTION outbox.event_type_stats(since interval DEFAULT '1 hour')
RETURNS TABLE (event_type text, total bigint, delivered bigint, dead bigint,
               success_rate double precision, avg_attempts double precision,
               p50_ms double precision, p95_ms double precision, p99_ms double precision)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.event_type, s.*
      FROM (SELECT DISTINCT h.event_type FROM outbox.stats_hourly h
             WHERE h.hour >= date_trunc('hour', now() - event_type_stats.since)) t,
           LATERAL outbox.delivery_stats(event_type_stats.since, NULL, t.event_type) s
     ORDER BY s.total DESC, t.event_type
$$;

-------------------------------------------------------------------------------------------
-- Repair: every action is one call, and is written to the attempts history
-------------------------------------------------------------------------------------------

-- Puts dead deliveries back in the queue, due now, with a fresh retry schedule: one by id,
-- or every dead one of an endpoint and/or a time window (of death). Returns how many. The
-- attempt number goes on from where it was (it is the fencing token: an ack for an attempt
-- before the retry is refused); the schedule counts from the retry (retry_base).
CREATE FUNCTION outbox.retry_dead(
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
       AND NOT EXISTS (SELECT 1 FROM outbox.delivery WHERE id = retry_dead.delivery_id) THEN
        RAISE EXCEPTION 'delivery % does not exist', retry_dead.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM outbox._wake_at_commit();
    RETURN n;
END
$$;

-- Sends already delivered events to an endpoint again: one new delivery (same event id, so
-- receivers can deduplicate on webhook-id) per event delivered to it since `since`.
-- Returns how many.
CREATE FUNCTION outbox.replay(endpoint_id uuid, since timestamptz, until timestamptz DEFAULT NULL)
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
    WITH originals AS (
        SELECT DISTINCT ON (d.event_id) d.id, d.event_id, d.tenant_id, d.created_at
          FROM outbox.delivery d
         WHERE d.endpoint_id = replay.endpoint_id AND d.status = 'delivered'
           AND d.finished_at >= replay.since
           AND (replay.until IS NULL OR d.finished_at < replay.until)
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
CREATE FUNCTION outbox.cancel(delivery_id uuid DEFAULT NULL, endpoint_id uuid DEFAULT NULL)
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
       AND NOT EXISTS (SELECT 1 FROM outbox.delivery WHERE id = cancel.delivery_id) THEN
        RAISE EXCEPTION 'delivery % does not exist', cancel.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN n;
END
$$;

-------------------------------------------------------------------------------------------
-- Retention
-------------------------------------------------------------------------------------------

-- Cancels what is left for deleted endpoints, then deletes up to batch_size finished
-- deliveries (delivered or cancelled older than
-- delivered_age, dead older than dead_age) with their attempts, then events no delivery
-- refers to any more, and rollup hours older than 90 days. Small batches keep each
-- transaction short, so the hot path never waits on it. Returns the deliveries deleted.
CREATE FUNCTION outbox._purge_batch(delivered_age interval, dead_age interval, batch_size integer)
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
    DELETE FROM outbox.stats_hourly WHERE hour < now() - interval '90 days';
    RETURN n;
END
$$;

-- Removes finished deliveries (and their attempts and orphaned events) older than
-- older_than, now; dead ones older than dead_older_than (default: the same). For manual
-- use; the worker does this continuously per outbox.retention_delivered / _dead.
-- Returns how many deliveries were deleted.
CREATE FUNCTION outbox.purge(older_than interval, dead_older_than interval DEFAULT NULL)
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
    RETURN total;
END
$$;

-------------------------------------------------------------------------------------------
-- More views
-------------------------------------------------------------------------------------------

-- One row per live endpoint: its backlog, what the last attempts said, its circuit breaker
-- (state, when it opened, when the next probe goes, the current cool-down), and what holds
-- its queue back, if anything, until when (NULL: until an operator or an outcome acts):
-- disabled, circuit open (until its probe), a probe in flight, an ordered endpoint's head in
-- flight or not due yet (a retry, or a deliver_at ahead: everything behind it waits), or
-- max_in_flight reached.
CREATE VIEW outbox.endpoint_health AS
SELECT e.id AS endpoint_id, e.url, e.enabled, e.disabled_reason, e.tenant_id,
       coalesce(q.pending, 0) AS pending, coalesce(q.in_flight, 0) AS in_flight,
       coalesce(q.retrying, 0) AS retrying, q.oldest_pending_age,
       coalesce(st.consecutive_failures, 0) AS consecutive_failures,
       st.last_success_at, st.last_failure_at, st.last_error,
       coalesce(st.circuit, 'closed') AS circuit, st.circuit_opened_at, st.next_probe_at,
       st.cooldown AS circuit_cooldown, st.failing_since,
       held.reason AS held_reason, held.until AS held_until
  FROM outbox.endpoint e
  LEFT JOIN outbox.endpoint_state st ON st.endpoint_id = e.id
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.status = 'pending') AS pending,
               count(*) FILTER (WHERE d.status = 'in_flight') AS in_flight,
               count(*) FILTER (WHERE d.status = 'pending' AND d.attempts > d.retry_base) AS retrying,
               now() - min(d.created_at) FILTER (WHERE d.status = 'pending') AS oldest_pending_age
          FROM (SELECT d.status, d.attempts, d.retry_base, d.created_at FROM outbox.delivery d
                 WHERE d.endpoint_id = e.id AND d.status = 'pending'
                UNION ALL
                SELECT d.status, d.attempts, d.retry_base, d.created_at FROM outbox.delivery d
                 WHERE d.endpoint_id = e.id AND d.status = 'in_flight') d
       ) q ON true
  LEFT JOIN LATERAL (
        SELECT h.status, h.due_at FROM outbox.delivery h
         WHERE e.ordered AND h.endpoint_id = e.id AND h.seq IS NOT NULL AND h.status IN ('pending', 'in_flight')
         ORDER BY h.seq LIMIT 1
       ) head ON true
 CROSS JOIN LATERAL (
        SELECT CASE WHEN NOT e.enabled THEN 'disabled'
                    WHEN st.circuit = 'open' THEN 'circuit open'
                    WHEN st.circuit = 'half_open' THEN 'circuit half-open: a probe is in flight'
                    WHEN head.status = 'in_flight' THEN 'ordered: its head is in flight'
                    WHEN head.due_at > now() THEN 'ordered: its head is not due yet'
                    WHEN q.pending > 0 AND q.in_flight >= coalesce(e.max_in_flight,
                             nullif((outbox._policy()).endpoint_max_in_flight, 0)) THEN 'max_in_flight reached'
               END AS reason,
               CASE WHEN NOT e.enabled THEN NULL
                    WHEN st.circuit = 'open' THEN st.next_probe_at
                    WHEN st.circuit = 'half_open' OR head.status = 'in_flight' THEN NULL
                    WHEN head.due_at > now() THEN head.due_at
               END AS until
       ) held
 WHERE e.deleted_at IS NULL;

-- Failed attempts, newest first (attempt_failed_idx serves ORDER BY ... LIMIT).
CREATE VIEW outbox.recent_failures AS
SELECT a.created_at, a.delivery_id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url,
       a.attempt, a.outcome, a.status_code, a.error, a.response_body
  FROM outbox.attempt a
  JOIN outbox.delivery d ON d.id = a.delivery_id
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE a.outcome IN ('retry', 'dead')
 ORDER BY a.created_at DESC;

-- Counters and gauges in the shape Prometheus exporters want: one row per metric and label
-- set. See contrib/postgres_exporter.yml.
CREATE VIEW outbox.metrics AS
SELECT 'outbox_deliveries'::text AS metric, 'pending'::text AS status, NULL::text AS endpoint_id,
       count(*)::double precision AS value
  FROM outbox.delivery WHERE status = 'pending'
UNION ALL
SELECT 'outbox_deliveries', 'in_flight', NULL, count(*) FROM outbox.delivery WHERE status = 'in_flight'
UNION ALL
SELECT 'outbox_deliveries', 'dead', NULL, count(*) FROM outbox.delivery WHERE status = 'dead'
UNION ALL
SELECT 'outbox_oldest_pending_seconds', NULL, NULL,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)
  FROM outbox.delivery WHERE status = 'pending'
UNION ALL
SELECT 'outbox_finished_total', h.outcome::text, h.endpoint_id::text, sum(h.deliveries)
  FROM outbox.stats_hourly h GROUP BY h.outcome, h.endpoint_id
UNION ALL
SELECT 'outbox_attempts_total', NULL, h.endpoint_id::text, sum(h.attempts)
  FROM outbox.stats_hourly h GROUP BY h.endpoint_id
UNION ALL
SELECT 'outbox_endpoint_consecutive_failures', NULL, st.endpoint_id::text, st.consecutive_failures
  FROM outbox.endpoint_state st JOIN outbox.endpoint e ON e.id = st.endpoint_id WHERE e.deleted_at IS NULL
UNION ALL
SELECT 'outbox_endpoint_enabled', NULL, e.id::text, CASE WHEN e.enabled THEN 1 ELSE 0 END
  FROM outbox.endpoint e WHERE e.deleted_at IS NULL
UNION ALL
SELECT 'outbox_endpoint_circuit_open', st.circuit::text, st.endpoint_id::text,
       CASE WHEN st.circuit = 'closed' THEN 0 ELSE 1 END
  FROM outbox.endpoint_state st JOIN outbox.endpoint e ON e.id = st.endpoint_id WHERE e.deleted_at IS NULL;

-- Seconds until the claim can next take something (negative if it could now), NULL if
-- nothing waits. Per endpoint that is the latest of: its first pending delivery coming due
-- (for an ordered endpoint, its head), its circuit's probe time and its rate limit's next
-- token. An endpoint at its limit of requests in flight does not count: their outcomes
-- wake the worker. Nor do leases about to expire: a sender that vanished is rare, and the
-- poll interval picks its deliveries up (reading lease times here would walk the index
-- entries of every recently finished attempt on each call). The worker sleeps that long
-- (NULL: until the poll interval or a commit wakes it), so blocked endpoints never make it
-- spin.
CREATE FUNCTION outbox._next_due()
RETURNS double precision
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    v_cap integer := nullif((outbox._policy()).endpoint_max_in_flight, 0);
BEGIN
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

-------------------------------------------------------------------------------------------
-- pg_dump
--
-- Endpoints (with their secrets), events, deliveries in every state, the attempt history
-- and the hourly statistics are user data: pg_dump saves them and a restore brings them
-- back, with the sequences behind them. outbox.endpoint_state is not: it is what senders
-- learned (circuit, failure streak, requests in flight), and a restore starts it afresh
-- (every restored endpoint gets a new state row from its trigger).
-------------------------------------------------------------------------------------------

SELECT pg_catalog.pg_extension_config_dump('outbox.endpoint', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.delivery', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.delivery_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.attempt', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.attempt_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.stats_hourly', '');

-------------------------------------------------------------------------------------------
-- Privileges
--
-- Nothing is granted to PUBLIC. The API functions run as the extension's owner (SECURITY
-- DEFINER, with a pinned search_path), so a role needs only EXECUTE on the functions of its
-- job and never any privilege on the tables: in particular no role but the owner can read
-- outbox.endpoint.secret. The grant_* functions below hand out the three usual jobs.
-------------------------------------------------------------------------------------------

REVOKE ALL ON SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;

-- Producers enqueue events (directly or through outbox.trigger) and nothing else.
CREATE FUNCTION outbox.grant_producer(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, jsonb, uuid, text, text, timestamptz), outbox.trigger() TO %s', role);
END
$$;

-- Operators watch and steer delivery: the views, statistics, enabling and disabling
-- endpoints. They cannot read secrets, create endpoints, enqueue, or claim.
CREATE FUNCTION outbox.grant_operator(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', role);
    EXECUTE format('GRANT SELECT ON outbox.endpoints, outbox.deliveries, outbox.attempts, outbox.dead_letters,
        outbox.endpoint_health, outbox.recent_failures, outbox.metrics TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.stats(), outbox.enable_endpoint(uuid), outbox.disable_endpoint(uuid, text),
        outbox.delivery_stats(interval, uuid, text, text), outbox.endpoint_stats(interval), outbox.event_type_stats(interval),
        outbox.retry_dead(uuid, uuid, timestamptz, timestamptz), outbox.replay(uuid, timestamptz, timestamptz),
        outbox.cancel(uuid, uuid), outbox._policy() TO %s', role);
END
$$;

-- Administrators manage endpoints (and their secrets), and may act as a sender with
-- outbox.claim / outbox.ack; they get everything an operator and a producer get.
CREATE FUNCTION outbox.grant_admin(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbox.grant_producer(role);
    PERFORM outbox.grant_operator(role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION
        outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean, boolean, integer, integer),
        outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text, boolean, integer, integer),
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
CREATE FUNCTION outbox.grant_worker(role regrole)
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
        outbox._requeue_orphaned(), outbox._lock_for_ack(uuid[])
        TO %s', role);
END
$$;

REVOKE ALL ON FUNCTION outbox.grant_producer(regrole), outbox.grant_operator(regrole), outbox.grant_admin(regrole),
                       outbox.grant_worker(regrole) FROM PUBLIC;

-------------------------------------------------------------------------------------------
-- A word at CREATE EXTENSION time if nothing will send what gets queued here
-------------------------------------------------------------------------------------------

DO $$
BEGIN
    IF current_setting('shared_preload_libraries') !~ '(^|[\s,"])webhook_outbox([\s,"]|$)' THEN
        RAISE NOTICE 'webhook_outbox: deliveries will queue up but not be sent: the delivery worker needs shared_preload_libraries = ''webhook_outbox'' and a server restart';
    ELSIF coalesce(current_setting('outbox.database', true), 'postgres') <> current_database() THEN
        RAISE NOTICE 'webhook_outbox: the delivery worker serves database "%", not "%"; set outbox.database = ''%'' and reload to deliver from here',
            coalesce(current_setting('outbox.database', true), 'postgres'), current_database(), current_database();
    END IF;
END
$$;
