-- webhook_outbox 0.2.0 -> 0.3.0: endpoint health and delivery control.
--
-- Circuit breaker per endpoint, auto-disable of endpoints that keep failing, per-endpoint
-- rate limit and concurrency limit, ordered endpoints; the claim goes endpoint by endpoint.
-- Functions that change are restated whole; queued deliveries are kept as they are.

\echo Use "ALTER EXTENSION webhook_outbox UPDATE TO '0.3.0'" to load this file. \quit

CREATE TYPE outbox.circuit_state AS ENUM ('closed', 'open', 'half_open');

ALTER TABLE outbox.endpoint
    ADD COLUMN ordered       boolean NOT NULL DEFAULT false,
    ADD COLUMN rate_limit    integer,
    ADD COLUMN max_in_flight integer,
    ADD CONSTRAINT endpoint_rate_limit_range CHECK (rate_limit BETWEEN 1 AND 100000),
    ADD CONSTRAINT endpoint_max_in_flight_range CHECK (max_in_flight BETWEEN 1 AND 10000);

ALTER TABLE outbox.endpoint_state
    ADD COLUMN circuit            outbox.circuit_state NOT NULL DEFAULT 'closed',
    ADD COLUMN circuit_changed_at timestamptz,
    ADD COLUMN circuit_opened_at  timestamptz,
    ADD COLUMN next_probe_at      timestamptz,
    ADD COLUMN cooldown           interval,
    ADD COLUMN failing_since      timestamptz,
    ADD COLUMN rate_tat           timestamptz,
    ADD COLUMN in_flight          integer NOT NULL DEFAULT 0;

-- Every endpoint has its state row from now on (the claim locks it while serving it).
INSERT INTO outbox.endpoint_state (endpoint_id)
SELECT e.id FROM outbox.endpoint e
 WHERE NOT EXISTS (SELECT 1 FROM outbox.endpoint_state s WHERE s.endpoint_id = e.id);
-- An endpoint failing now counts as failing since its last failure; what is in flight is
-- counted once here and kept up to date from now on.
UPDATE outbox.endpoint_state s
   SET failing_since = CASE WHEN s.consecutive_failures > 0 THEN s.last_failure_at END,
       in_flight = (SELECT count(*) FROM outbox.delivery d
                     WHERE d.endpoint_id = s.endpoint_id AND d.status = 'in_flight');

ALTER TABLE outbox.delivery ADD COLUMN seq bigint;
CREATE SEQUENCE outbox.delivery_seq;

-- The claim reads each endpoint's range of pending rows; expired leases are found in each
-- endpoint's range of rows in flight. The global due index is no longer read by anything
-- (and every state change paid for it).
DROP INDEX outbox.delivery_due_idx;
DROP INDEX outbox.delivery_endpoint_due_idx;
CREATE INDEX delivery_pending_idx ON outbox.delivery (endpoint_id, due_at) WHERE status = 'pending';
CREATE INDEX delivery_in_flight_idx ON outbox.delivery (endpoint_id, due_at) WHERE status = 'in_flight';
CREATE INDEX delivery_ordered_idx ON outbox.delivery (endpoint_id, seq) WHERE seq IS NOT NULL AND status IN ('pending', 'in_flight');

-- Only failed attempts and operator actions are ever looked up by time.
DROP INDEX outbox.attempt_created_idx;
CREATE INDEX attempt_failed_idx ON outbox.attempt (created_at) WHERE outcome <> 'delivered';

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
-- many. The claim runs it first, for the endpoints it may serve.
CREATE FUNCTION outbox._requeue_expired(p_endpoint_id uuid)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
DECLARE
    n integer;
BEGIN
    WITH expired AS (
        UPDATE outbox.delivery d
           SET status = 'pending', lease_owner = NULL,
               last_error = 'lease expired before the sender reported back'
          FROM (SELECT x.id
                  FROM outbox.endpoint e
                 CROSS JOIN LATERAL (
                       SELECT q.id FROM outbox.delivery q
                        WHERE q.endpoint_id = e.id AND q.status = 'in_flight' AND q.due_at <= now()
                          FOR UPDATE SKIP LOCKED) x
                 WHERE (p_endpoint_id IS NULL OR e.id = p_endpoint_id)) x
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

-- Is the live feed on (outbox.live_feed)? Off unless switched on.
CREATE OR REPLACE FUNCTION outbox._feed_on()
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(current_setting('outbox.live_feed', true), 'off') = 'on'
$$;

-- The live endpoint, locked: FOR NO KEY UPDATE by the functions that change it, FOR SHARE
-- by enqueue (many producers may share it, and a concurrent delete waits for them). Not
-- FOR UPDATE: that would also block the foreign-key checks (FOR KEY SHARE) the worker's
-- writes make, while the operator in turn waits for the worker's state row: a deadlock.
CREATE OR REPLACE FUNCTION outbox._endpoint_or_raise(p_endpoint_id uuid, p_for_update boolean DEFAULT true)
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

CREATE OR REPLACE FUNCTION outbox.enable_endpoint(endpoint_id uuid)
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

-- Deletes an endpoint and cancels its deliveries that were not finished; returns how many
-- were cancelled. A delivery in flight at that moment is cancelled too: an ack from its
-- sender is then refused, so the endpoint's history ends consistently.
CREATE OR REPLACE FUNCTION outbox.delete_endpoint(endpoint_id uuid)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    PERFORM outbox._endpoint_or_raise(delete_endpoint.endpoint_id);
    UPDATE outbox.endpoint SET enabled = false, disabled_reason = 'deleted', deleted_at = now(), updated_at = now()
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

-- Creates one delivery per enabled endpoint whose filter matches event_type (same tenant), or
-- exactly one for endpoint_id when it is given (its filter and enabled flag are not consulted:
-- a disabled endpoint's delivery waits until it is enabled). Runs in the caller's
-- transaction. With event_id, enqueueing the same (event_id, endpoint) again returns the
-- existing delivery; the first enqueue's payload wins.
CREATE OR REPLACE FUNCTION outbox.enqueue(
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
BEGIN
    PERFORM outbox._check_event(enqueue.event_type, enqueue.event_id, enqueue.tenant_id,
                                octet_length(enqueue.payload::text));

    IF enqueue.endpoint_id IS NOT NULL THEN
        v_endpoint := outbox._endpoint_or_raise(enqueue.endpoint_id, false);
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
                SELECT v_event_id, t.id, enqueue.tenant_id, coalesce(enqueue.deliver_at, now()),
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
        -- nothing; the SELECT (a new snapshot) then sees its rows.
        INSERT INTO outbox.event (id, event_type, payload, tenant_id)
        VALUES (v_event_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id)
        ON CONFLICT (id) DO NOTHING;
        WITH ins AS (
            INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at, seq)
            SELECT v_event_id, t.id, enqueue.tenant_id, coalesce(enqueue.deliver_at, now()),
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

-- Puts dead deliveries back in the queue, due now, with a fresh retry schedule: one by id,
-- or every dead one of an endpoint and/or a time window (of death). Returns how many.
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
           SET status = 'pending', due_at = now(), finished_at = NULL, attempts = 0,
               last_error = NULL, last_status_code = NULL,
               seq = CASE WHEN (SELECT e.ordered FROM outbox.endpoint e WHERE e.id = d.endpoint_id)
                          THEN nextval('outbox.delivery_seq') END
         WHERE d.status = 'dead'
           AND (retry_dead.delivery_id IS NULL OR d.id = retry_dead.delivery_id)
           AND (retry_dead.endpoint_id IS NULL OR d.endpoint_id = retry_dead.endpoint_id)
           AND (retry_dead.since IS NULL OR d.finished_at >= retry_dead.since)
           AND (retry_dead.until IS NULL OR d.finished_at < retry_dead.until)
        RETURNING d.id
    )
    INSERT INTO outbox.attempt (delivery_id, attempt, outcome, error, worker)
    SELECT id, 0, 'requeued', 'retried by operator', session_user FROM requeued;
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
       AND NOT EXISTS (SELECT 1 FROM outbox.delivery WHERE id = cancel.delivery_id) THEN
        RAISE EXCEPTION 'delivery % does not exist', cancel.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN n;
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
         WHERE d.id = ANY (v_ids) AND e.id = d.endpoint_id AND ev.id = d.event_id
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
BEGIN
    -- plpgsql, not sql: its plan is prepared once per session instead of on every call.
    RETURN QUERY
    WITH input AS (
        SELECT i.*,
               CASE WHEN i.outcome <> 'retry' THEN NULL
                    WHEN i.retry_at IS NOT NULL THEN i.retry_at
                    ELSE now() + outbox.retry_delay(i.attempt) END AS next_at
          FROM unnest(ack_batch.delivery_ids, ack_batch.attempts, ack_batch.outcomes,
                      ack_batch.status_codes, ack_batch.errors, ack_batch.durations_ms,
                      ack_batch.retry_at, ack_batch.response_bodies)
               AS i(id, attempt, outcome, status_code, error, duration_ms, retry_at, response_body)
         WHERE outbox._check_ack_lengths(ARRAY[
                   cardinality(ack_batch.delivery_ids), cardinality(ack_batch.attempts),
                   cardinality(ack_batch.outcomes), cardinality(ack_batch.status_codes),
                   cardinality(ack_batch.errors), cardinality(ack_batch.durations_ms),
                   cardinality(ack_batch.retry_at), cardinality(ack_batch.response_bodies)])
    ),
    decided AS (
        SELECT input.*,
               CASE WHEN outcome = 'retry' AND next_at IS NULL THEN 'dead'::outbox.attempt_outcome
                    ELSE outcome END AS final_outcome
          FROM input
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
         WHERE d.id = x.id AND d.status::text = 'in_flight' AND d.attempts = x.attempt AND ev.id = d.event_id
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
        -- failed for outbox.auto_disable_after. Its queue stays; enabling resumes it.
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
               count(*) FILTER (WHERE status = 'pending' AND attempts > 0)       AS retrying,
               now() - min(created_at) FILTER (WHERE status = 'pending')         AS oldest
          FROM (SELECT status, due_at, attempts, created_at FROM outbox.delivery WHERE status = 'pending'
                UNION ALL
                SELECT status, due_at, attempts, created_at FROM outbox.delivery WHERE status = 'in_flight') d
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
    -- plpgsql, not sql: its plan is prepared once per session instead of on every call.
    RETURN (
    SELECT extract(epoch FROM min(r.ready_at) - clock_timestamp())::double precision
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

CREATE OR REPLACE VIEW outbox.endpoints AS
SELECT e.id, e.url, e.event_types, e.enabled, e.disabled_reason, e.timeout, e.headers,
       e.tenant_id, e.description, e.created_at, e.updated_at,
       e.ordered, e.rate_limit, e.max_in_flight
  FROM outbox.endpoint e
 WHERE e.deleted_at IS NULL;

-- One row per live endpoint: its backlog, what the last attempts said, and its circuit
-- breaker (state, when it opened, when the next probe goes, the current cool-down).
CREATE OR REPLACE VIEW outbox.endpoint_health AS
SELECT e.id AS endpoint_id, e.url, e.enabled, e.disabled_reason, e.tenant_id,
       coalesce(q.pending, 0) AS pending, coalesce(q.in_flight, 0) AS in_flight,
       coalesce(q.retrying, 0) AS retrying, q.oldest_pending_age,
       coalesce(st.consecutive_failures, 0) AS consecutive_failures,
       st.last_success_at, st.last_failure_at, st.last_error,
       coalesce(st.circuit, 'closed') AS circuit, st.circuit_opened_at, st.next_probe_at,
       st.cooldown AS circuit_cooldown, st.failing_since
  FROM outbox.endpoint e
  LEFT JOIN outbox.endpoint_state st ON st.endpoint_id = e.id
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.status = 'pending') AS pending,
               count(*) FILTER (WHERE d.status = 'in_flight') AS in_flight,
               count(*) FILTER (WHERE d.status = 'pending' AND d.attempts > 0) AS retrying,
               now() - min(d.created_at) FILTER (WHERE d.status = 'pending') AS oldest_pending_age
          FROM (SELECT d.status, d.attempts, d.created_at FROM outbox.delivery d
                 WHERE d.endpoint_id = e.id AND d.status = 'pending'
                UNION ALL
                SELECT d.status, d.attempts, d.created_at FROM outbox.delivery d
                 WHERE d.endpoint_id = e.id AND d.status = 'in_flight') d
       ) q ON true
 WHERE e.deleted_at IS NULL;

-- Counters and gauges in the shape Prometheus exporters want: one row per metric and label
-- set. See contrib/postgres_exporter.yml.
CREATE OR REPLACE VIEW outbox.metrics AS
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

-- create_endpoint takes the delivery policy: its signature changes, so it is dropped and created
-- again, and the roles that could execute it keep that right.
DO $upgrade$
DECLARE
    grantees text[];
    g text;
BEGIN
    SELECT array_agg(a.grantee::regrole::text) INTO grantees
      FROM pg_proc p, aclexplode(p.proacl) a
     WHERE p.oid = 'outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean)'::regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
    DROP FUNCTION outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean);
    EXECUTE $f$
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

    $f$;
    FOREACH g IN ARRAY coalesce(grantees, '{}') LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean, boolean, integer, integer) TO %s', g);
    END LOOP;
END
$upgrade$;

-- update_endpoint takes the delivery policy: its signature changes, so it is dropped and created
-- again, and the roles that could execute it keep that right.
DO $upgrade$
DECLARE
    grantees text[];
    g text;
BEGIN
    SELECT array_agg(a.grantee::regrole::text) INTO grantees
      FROM pg_proc p, aclexplode(p.proacl) a
     WHERE p.oid = 'outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text)'::regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
    DROP FUNCTION outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text);
    EXECUTE $f$
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

    $f$;
    FOREACH g IN ARRAY coalesce(grantees, '{}') LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text, boolean, integer, integer) TO %s', g);
    END LOOP;
END
$upgrade$;

REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
