-- webhook_outbox 0.1.0 -> 0.2.0
--
-- Adds: a claim planned per call that always reads the due index in order (no sort of the
-- whole backlog); operator repairs (retry_dead, replay, cancel) recorded in the attempts history;
-- hourly statistics with latency percentiles (delivery_stats, endpoint_stats,
-- event_type_stats); endpoint health; metrics for Prometheus; secret rotation; the live feed
-- and operator events over LISTEN/NOTIFY; retention (purge, and the
-- worker's outbox.retention_* GUCs). Nothing queued is touched: deliveries keep their
-- status, attempts and lease.

\echo Use "ALTER EXTENSION webhook_outbox UPDATE TO '0.2.0'" to load this file. \quit

-- Operator actions share the attempts history with delivery outcomes.
ALTER TYPE outbox.attempt_outcome ADD VALUE IF NOT EXISTS 'requeued';
ALTER TYPE outbox.attempt_outcome ADD VALUE IF NOT EXISTS 'replayed';
ALTER TYPE outbox.attempt_outcome ADD VALUE IF NOT EXISTS 'cancelled';

-- Secret rotation keeps the old secret for an overlap period.
ALTER TABLE outbox.endpoint ADD COLUMN previous_secret text, ADD COLUMN previous_secret_expires_at timestamptz;

-- Replays are extra deliveries of an event to an endpoint, outside the idempotency key.
ALTER TABLE outbox.delivery ADD COLUMN replay_of uuid;
DROP INDEX outbox.delivery_event_endpoint_key;
CREATE UNIQUE INDEX delivery_event_endpoint_key ON outbox.delivery (event_id, endpoint_id, replay_of) NULLS NOT DISTINCT;

CREATE TABLE outbox.endpoint_state (
    endpoint_id          uuid        PRIMARY KEY REFERENCES outbox.endpoint (id) ON DELETE CASCADE,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    last_success_at      timestamptz,
    last_failure_at      timestamptz,
    last_error           text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

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

-- enqueue now takes a share lock on a named endpoint instead of an exclusive one.
DROP FUNCTION outbox._endpoint_or_raise(uuid);

-- Upper bounds (ms) of the latency histogram's buckets; the last bucket is open.
CREATE OR REPLACE FUNCTION outbox._bucket_bounds()
RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT ARRAY[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                 1800000, 7200000, 86400000]::double precision[]
$$;

-- Lower bound (ms) of latency bucket i (0 for the first).
CREATE OR REPLACE FUNCTION outbox._bucket_lower(i integer)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN i <= 0 THEN 0 ELSE (outbox._bucket_bounds())[i] END
$$;

-- The live endpoint, locked: FOR UPDATE by the functions that change it, FOR SHARE by
-- enqueue (many producers may share it, and a concurrent delete waits for them).
CREATE OR REPLACE FUNCTION outbox._endpoint_or_raise(p_endpoint_id uuid, p_for_update boolean DEFAULT true)
RETURNS outbox.endpoint
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    ep outbox.endpoint;
BEGIN
    IF p_for_update THEN
        SELECT * INTO ep FROM outbox.endpoint WHERE id = p_endpoint_id AND deleted_at IS NULL FOR UPDATE;
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

-- The signing secret (whsec_…) to hand to the receiver. Never shown by any view.
CREATE OR REPLACE FUNCTION outbox.endpoint_secret(endpoint_id uuid)
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (outbox._endpoint_or_raise(endpoint_secret.endpoint_id, false)).secret
$$;

-- Creates one delivery per enabled endpoint whose filter matches event_type (same tenant), or
-- exactly one for endpoint_id when it is given (its filter and enabled flag are not consulted:
-- a disabled endpoint's delivery waits until it is enabled). Runs in the caller's
-- transaction. With event_id, enqueueing the same (event_id, endpoint) again returns the
-- existing delivery; the first enqueue's payload wins.
-- Live feed and operator events (LISTEN / NOTIFY).
-- Is the live feed on (outbox.live_feed)? On unless switched off.
CREATE OR REPLACE FUNCTION outbox._feed_on()
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(current_setting('outbox.live_feed', true), 'on') <> 'off'
$$;

-- Publishes one status change of a delivery on the live feed: channel outbox_feed, the
-- endpoint's channel outbox_feed_<endpoint id>, and the tenant's outbox_feed_tenant_<tenant>
-- (for tenant ids of at most 44 bytes, the rest of a channel name's room).
CREATE OR REPLACE FUNCTION outbox._feed(p_id uuid, p_endpoint_id uuid, p_tenant_id text, p_event_type text,
                             p_status text, p_attempt integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    payload text := json_build_object('id', p_id, 'endpoint_id', p_endpoint_id, 'event_type', p_event_type,
                                      'status', p_status, 'attempt', p_attempt, 'tenant_id', p_tenant_id)::text;
BEGIN
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
-- feed on itself).
CREATE OR REPLACE FUNCTION outbox._operator_event(kind text, details jsonb, about_endpoint uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target text := nullif(current_setting('outbox.operator_endpoint', true), '');
BEGIN
    PERFORM pg_notify('outbox_operator', (jsonb_build_object('kind', kind) || details)::text);
    IF target IS NOT NULL AND target IS DISTINCT FROM about_endpoint::text THEN
        BEGIN
            PERFORM outbox.enqueue(kind, details, endpoint_id => target::uuid);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'webhook_outbox: cannot deliver the operator event to outbox.operator_endpoint %: %', target, SQLERRM;
        END;
    END IF;
END
$$;

-- A disabled endpoint keeps its pending deliveries; they are sent once it is enabled again.
CREATE OR REPLACE FUNCTION outbox.disable_endpoint(endpoint_id uuid, reason text DEFAULT 'disabled by operator')
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

-- The worker's sleep: NULL when nothing waits (0.1.0 said 0, which kept an idle worker
-- looking every 50 ms).
CREATE OR REPLACE FUNCTION outbox._next_due()
RETURNS double precision
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT extract(epoch FROM min(d.due_at) - clock_timestamp())::double precision
      FROM outbox.delivery d JOIN outbox.endpoint e ON e.id = d.endpoint_id
     WHERE d.status IN ('pending', 'in_flight') AND e.enabled AND e.deleted_at IS NULL
$$;

-- Enabling an endpoint wakes the worker for its waiting deliveries.
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
    -- Its waiting deliveries are due now: wake the worker when this commits.
    PERFORM outbox._wake_at_commit();
END
$$;

-- Secret rotation.
CREATE OR REPLACE FUNCTION outbox.rotate_secret(endpoint_id uuid, new_secret text DEFAULT NULL, overlap interval DEFAULT '24 hours')
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
    v_fed      bigint;
BEGIN
    PERFORM outbox._check_event(enqueue.event_type, enqueue.event_id, enqueue.tenant_id,
                                octet_length(enqueue.payload::text));

    IF enqueue.endpoint_id IS NOT NULL THEN
        v_targets := ARRAY[(outbox._endpoint_or_raise(enqueue.endpoint_id, false)).id];
    ELSE
        SELECT array_agg(e.id) INTO v_targets
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
                INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at)
                SELECT v_event_id, t, enqueue.tenant_id, coalesce(enqueue.deliver_at, now())
                  FROM unnest(v_targets) AS t
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
            INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at)
            SELECT v_event_id, t, enqueue.tenant_id, coalesce(enqueue.deliver_at, now())
              FROM unnest(v_targets) AS t
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

-- Records the outcomes of many attempts at once and returns the deliveries whose outcome was
-- accepted. An outcome is accepted only from the holder of the current attempt: the delivery
-- must be in_flight with exactly that attempt number; anything else (a lease that expired and
-- was claimed again, a cancelled delivery, a repeated ack) changes nothing.
-- A 'retry' without retry_at is scheduled by outbox.retry_delay(attempt) (the
-- outbox.retry_schedule GUC); when the schedule is exhausted the delivery is dead.
-- Claims up to batch_size due deliveries: pending ones whose time has come and in-flight
-- ones whose lease expired (their sender died). Each claimed row is in_flight with a lease
-- until now() + lease and its attempt number incremented; the attempt number is the fencing
-- token the ack must present.
--
-- The statement is planned afresh on every call (EXECUTE) with only the filters that apply,
-- and sorts and bitmap scans are priced out: the plan is always the partial index
-- delivery_due_idx read in due order, stopping after batch_size rows, whatever the table's
-- statistics say. (A plan that collects every due row and sorts them costs milliseconds per
-- thousand rows of backlog; this one costs the same with an empty queue or a full one.)
CREATE OR REPLACE FUNCTION outbox._claim(
    p_batch_size integer, p_worker text, p_lease interval, p_endpoint_id uuid, p_tenant_id text
)
RETURNS TABLE (o_delivery_id uuid, o_event_id text, o_attempt integer, o_endpoint_id uuid, o_url text,
               o_secret text, o_headers jsonb, o_timeout interval, o_event_type text, o_body text,
               o_tenant_id text, o_previous_secret text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET enable_sort = off SET enable_bitmapscan = off
AS $$
BEGIN
    RETURN QUERY EXECUTE format($q$
        WITH due AS (
            SELECT d.id
              FROM outbox.delivery d
             WHERE d.status IN ('pending', 'in_flight')
               AND d.due_at <= now() %s %s
               AND EXISTS (SELECT 1 FROM outbox.endpoint e
                            WHERE e.id = d.endpoint_id AND e.enabled AND e.deleted_at IS NULL)
             ORDER BY d.due_at
             LIMIT $1
               FOR UPDATE OF d SKIP LOCKED
        )
        UPDATE outbox.delivery d
           SET status = 'in_flight',
               attempts = d.attempts + 1,
               due_at = now() + $3,
               lease_owner = $2
          FROM due, outbox.endpoint e, outbox.event ev
         WHERE d.id = due.id AND e.id = d.endpoint_id AND ev.id = d.event_id
        RETURNING d.id, d.event_id, d.attempts, d.endpoint_id, e.url, e.secret, e.headers, e.timeout,
                  ev.event_type,
                  json_build_object('type', ev.event_type,
                                    'timestamp', to_char(ev.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                                    'data', ev.payload)::text,
                  d.tenant_id,
                  CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END
        $q$,
        CASE WHEN p_endpoint_id IS NOT NULL THEN 'AND d.endpoint_id = $4' ELSE '' END,
        CASE WHEN p_tenant_id IS NOT NULL THEN 'AND d.tenant_id = $5' ELSE '' END)
    USING outbox._check_claim(p_batch_size, p_lease), p_worker, p_lease, p_endpoint_id, p_tenant_id;
END
$$;

-- claim() also returns the secret being rotated out; its result type changes, so it is
-- dropped and created again, and the roles that could execute it keep that right.
DO $upgrade$
DECLARE
    grantees text[];
    g text;
BEGIN
    SELECT array_agg(a.grantee::regrole::text) INTO grantees
      FROM pg_proc p, aclexplode(p.proacl) a
     WHERE p.oid = 'outbox.claim(integer, text, interval, uuid, text)'::regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
    DROP FUNCTION outbox.claim(integer, text, interval, uuid, text);
    EXECUTE $f$
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
    $f$;
    FOREACH g IN ARRAY coalesce(grantees, '{}') LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.claim(integer, text, interval, uuid, text) TO %s', g);
    END LOOP;
END
$upgrade$;

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
LANGUAGE sql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
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
         WHERE d.id = x.id AND d.status = 'in_flight' AND d.attempts = x.attempt AND ev.id = d.event_id
        RETURNING d.id, d.endpoint_id, d.event_id, d.tenant_id, d.created_at, x.attempt, x.final_outcome,
                  x.status_code, x.error, x.duration_ms, x.response_body, ev.event_type
    ),
    gone AS (
        -- 410 Gone: the receiver wants no more deliveries; stop sending there.
        UPDATE outbox.endpoint e
           SET enabled = false, disabled_reason = 'receiver answered 410 Gone', updated_at = now()
          FROM upd
         WHERE e.id = upd.endpoint_id AND upd.status_code = 410 AND upd.final_outcome = 'dead' AND e.enabled
        RETURNING e.id,
                  outbox._operator_event('outbox.endpoint.disabled',
                      jsonb_build_object('endpoint_id', e.id, 'url', e.url, 'reason', 'receiver answered 410 Gone'), e.id)
    ),
    hist AS (
        INSERT INTO outbox.attempt (delivery_id, attempt, outcome, status_code, error, duration_ms, response_body, worker)
        SELECT upd.id, upd.attempt, upd.final_outcome, upd.status_code, upd.error, upd.duration_ms,
               upd.response_body, ack_batch.worker
          FROM upd
    ),
    health AS (
        -- Per endpoint: a success in the batch resets the failure streak, otherwise the
        -- batch's failures extend it.
        INSERT INTO outbox.endpoint_state AS s
               (endpoint_id, consecutive_failures, last_success_at, last_failure_at, last_error, updated_at)
        SELECT upd.endpoint_id,
               count(*) FILTER (WHERE upd.final_outcome <> 'delivered'),
               CASE WHEN bool_or(upd.final_outcome = 'delivered') THEN now() END,
               CASE WHEN bool_or(upd.final_outcome <> 'delivered') THEN now() END,
               max(upd.error) FILTER (WHERE upd.final_outcome <> 'delivered'),
               now()
          FROM upd
         GROUP BY upd.endpoint_id
        ON CONFLICT (endpoint_id) DO UPDATE SET
               consecutive_failures = CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.consecutive_failures
                                           ELSE s.consecutive_failures + excluded.consecutive_failures END,
               last_success_at = coalesce(excluded.last_success_at, s.last_success_at),
               last_failure_at = coalesce(excluded.last_failure_at, s.last_failure_at),
               last_error = coalesce(excluded.last_error, s.last_error),
               updated_at = now()
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
    -- Announcements: the live feed for every change (unless outbox.live_feed is off), and an
    -- operator event for every delivery that died (endpoints a 410 disabled are announced
    -- by `gone` above).
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
           WHERE upd.final_outcome = 'dead') dead ON true
$$;

-- Latency percentile (ms) from histogram counts: the bucket where the cumulative count
-- reaches p, interpolated linearly inside it. The open last bucket reports its lower bound.
CREATE OR REPLACE FUNCTION outbox._percentile(buckets smallint[], counts bigint[], p double precision)
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
CREATE OR REPLACE FUNCTION outbox.delivery_stats(
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
CREATE OR REPLACE FUNCTION outbox.endpoint_stats(since interval DEFAULT '1 hour')
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
CREATE OR REPLACE FUNCTION outbox.event_type_stats(since interval DEFAULT '1 hour')
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
        UPDATE outbox.delivery d
           SET status = 'pending', due_at = now(), finished_at = NULL, attempts = 0,
               last_error = NULL, last_status_code = NULL
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
        SELECT DISTINCT ON (d.event_id) d.id, d.event_id, d.tenant_id
          FROM outbox.delivery d
         WHERE d.endpoint_id = replay.endpoint_id AND d.status = 'delivered'
           AND d.finished_at >= replay.since
           AND (replay.until IS NULL OR d.finished_at < replay.until)
         ORDER BY d.event_id, d.finished_at DESC
    ),
    copies AS (
        -- An event whose replay is still pending is not replayed twice.
        INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, replay_of)
        SELECT o.event_id, replay.endpoint_id, o.tenant_id, o.id FROM originals o
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
         WHERE d.status IN ('pending', 'in_flight')
           AND (cancel.delivery_id IS NULL OR d.id = cancel.delivery_id)
           AND (cancel.endpoint_id IS NULL OR d.endpoint_id = cancel.endpoint_id)
        RETURNING d.id, d.attempts
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

-- Cancels what is left for deleted endpoints, then deletes up to batch_size finished
-- deliveries (delivered or cancelled older than
-- delivered_age, dead older than dead_age) with their attempts, then events no delivery
-- refers to any more, and rollup hours older than 90 days. Small batches keep each
-- transaction short, so the hot path never waits on it. Returns the deliveries deleted.
CREATE OR REPLACE FUNCTION outbox._purge_batch(delivered_age interval, dead_age interval, batch_size integer)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
    event_ids text[];
BEGIN
    -- A fan-out enqueue that raced delete_endpoint may have left work for a deleted
    -- endpoint; it can never be sent, so it is cancelled like the rest of that endpoint's.
    UPDATE outbox.delivery d
       SET status = 'cancelled', finished_at = now(), lease_owner = NULL,
           last_error = 'cancelled: endpoint deleted'
      FROM outbox.endpoint e
     WHERE e.deleted_at IS NOT NULL AND d.endpoint_id = e.id AND d.status IN ('pending', 'in_flight');
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
        RETURNING d.event_id
    )
    SELECT count(*), array_agg(DISTINCT event_id) INTO n, event_ids FROM gone;
    -- Events whose last delivery just went (a new statement: it sees the deletions).
    DELETE FROM outbox.event e
     WHERE e.id = ANY (event_ids)
       AND NOT EXISTS (SELECT 1 FROM outbox.delivery d WHERE d.event_id = e.id);
    DELETE FROM outbox.stats_hourly WHERE hour < now() - interval '90 days';
    RETURN n;
END
$$;

-- Removes finished deliveries (and their attempts and orphaned events) older than
-- older_than, now; dead ones older than dead_older_than (default: the same). For manual
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
    RETURN total;
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
        outbox.endpoint_health, outbox.recent_failures, outbox.metrics TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.stats(), outbox.enable_endpoint(uuid), outbox.disable_endpoint(uuid, text),
        outbox.delivery_stats(interval, uuid, text, text), outbox.endpoint_stats(interval), outbox.event_type_stats(interval),
        outbox.retry_dead(uuid, uuid, timestamptz, timestamptz), outbox.replay(uuid, timestamptz, timestamptz),
        outbox.cancel(uuid, uuid) TO %s', role);
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
        outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean),
        outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text),
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
        outbox._next_due(), outbox._purge_batch(interval, interval, integer)
        TO %s', role);
END
$$;

-- One row per live endpoint: its backlog and what the last attempts said.
CREATE OR REPLACE VIEW outbox.endpoint_health AS
SELECT e.id AS endpoint_id, e.url, e.enabled, e.disabled_reason, e.tenant_id,
       coalesce(q.pending, 0) AS pending, coalesce(q.in_flight, 0) AS in_flight,
       coalesce(q.retrying, 0) AS retrying, q.oldest_pending_age,
       coalesce(st.consecutive_failures, 0) AS consecutive_failures,
       st.last_success_at, st.last_failure_at, st.last_error
  FROM outbox.endpoint e
  LEFT JOIN outbox.endpoint_state st ON st.endpoint_id = e.id
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.status = 'pending') AS pending,
               count(*) FILTER (WHERE d.status = 'in_flight') AS in_flight,
               count(*) FILTER (WHERE d.status = 'pending' AND d.attempts > 0) AS retrying,
               now() - min(d.created_at) FILTER (WHERE d.status = 'pending') AS oldest_pending_age
          FROM outbox.delivery d
         WHERE d.endpoint_id = e.id AND d.status IN ('pending', 'in_flight')
       ) q ON true
 WHERE e.deleted_at IS NULL;

-- Failed attempts, newest first (the index on created_at serves ORDER BY ... LIMIT).
CREATE OR REPLACE VIEW outbox.recent_failures AS
SELECT a.created_at, a.delivery_id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url,
       a.attempt, a.outcome, a.status_code, a.error, a.response_body
  FROM outbox.attempt a
  JOIN outbox.delivery d ON d.id = a.delivery_id
  JOIN outbox.event ev ON ev.id = d.event_id
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE a.outcome IN ('retry', 'dead')
 ORDER BY a.created_at DESC;

-- Counters and gauges in the shape Prometheus exporters want: one row per metric and label
-- set. See contrib/postgres_exporter.yml.
CREATE OR REPLACE VIEW outbox.metrics AS
SELECT 'outbox_deliveries'::text AS metric, s.status::text AS status, NULL::text AS endpoint_id,
       count(*)::double precision AS value
  FROM outbox.delivery s WHERE s.status IN ('pending', 'in_flight') GROUP BY s.status
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
  FROM outbox.endpoint e WHERE e.deleted_at IS NULL;

-- stats() gains delivered_last_minute. Its result type changes, so it is dropped and
-- created again; the roles that could execute it keep that right.
DO $upgrade$
DECLARE
    grantees text[];
    g text;
BEGIN
    SELECT array_agg(a.grantee::regrole::text) INTO grantees
      FROM pg_proc p, aclexplode(p.proacl) a
     WHERE p.oid = 'outbox.stats()'::regprocedure AND a.privilege_type = 'EXECUTE'
       AND a.grantee <> 0 AND a.grantee <> p.proowner;
    DROP FUNCTION outbox.stats();
    EXECUTE $f$
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
               count(*) FILTER (WHERE status = 'pending' AND attempts > 0)       AS retrying,
               now() - min(created_at) FILTER (WHERE status = 'pending')         AS oldest
          FROM outbox.delivery
         WHERE status IN ('pending', 'in_flight')
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
    $f$;
    FOREACH g IN ARRAY coalesce(grantees, '{}') LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.stats() TO %s', g);
    END LOOP;
END
$upgrade$;

REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
