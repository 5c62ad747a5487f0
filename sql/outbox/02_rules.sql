-- Rules and helpers shared by the API and the worker: validation, limits, the policy
-- settings, the circuit breaker's rule, lease recovery. Some call functions written in Rust
-- (outbox._check_*, outbox.retry_delay, outbox._max_response_body).

-------------------------------------------------------------------------------------------
-- Internal helpers
-------------------------------------------------------------------------------------------

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

-- A new event id (the `webhook-id` of an event enqueued without one): `msg_` and 32 hex
-- digits of a random UUID.
CREATE FUNCTION outbox._new_event_id()
RETURNS text
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN 'msg_' || replace(gen_random_uuid()::text, '-', '');

-- The id of an event outbox.trigger appended without one, from its place in the log and
-- its time (see the Rust ids module): every read of it, a repeated one too, gives the same
-- `webhook-id`.
CREATE FUNCTION outbox._log_event_id(txid xid8, seq bigint, created_at timestamptz)
RETURNS text
LANGUAGE c STABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'log_event_id_wrapper';

-- An event's `webhook-id`, wherever the log is read: the one it was appended with (the
-- caller's, or the one outbox.enqueue made up), else the one derived from its place.
CREATE FUNCTION outbox._event_id(id text, txid xid8, seq bigint, created_at timestamptz)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(id, outbox._log_event_id(txid, seq, created_at));

-- The request body of an event, as every sender sends it (Standard Webhooks' shape).
CREATE FUNCTION outbox._body(p_event_type text, p_created_at timestamptz, p_payload jsonb)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN json_build_object('type', p_event_type,
                         'timestamp', to_char(p_created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                         'data', p_payload)::text;
