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

-- What one attempt ended with, as decided by the sender's retry policy.
CREATE TYPE outbox.attempt_outcome AS ENUM ('delivered', 'retry', 'dead');

-------------------------------------------------------------------------------------------
-- Tables
-------------------------------------------------------------------------------------------

CREATE TABLE outbox.endpoint (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    url             text        NOT NULL,
    secret          text        NOT NULL,
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
    CONSTRAINT endpoint_headers_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT endpoint_timeout_range CHECK (timeout IS NULL OR (timeout >= interval '100 milliseconds' AND timeout <= interval '5 minutes'))
);

CREATE INDEX endpoint_tenant_idx ON outbox.endpoint (tenant_id) WHERE deleted_at IS NULL;

-- One row per enqueued event; its id is the `webhook-id` receivers deduplicate on.
CREATE TABLE outbox.event (
    id          text        PRIMARY KEY,
    event_type  text        NOT NULL,
    payload     jsonb       NOT NULL,
    tenant_id   text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (event, endpoint): the unit that is claimed, sent, retried and acknowledged.
CREATE TABLE outbox.delivery (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id         text        NOT NULL REFERENCES outbox.event (id),
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
    last_error       text
) WITH (fillfactor = 80);

-- Idempotent enqueue: one delivery per (event, endpoint).
CREATE UNIQUE INDEX delivery_event_endpoint_key ON outbox.delivery (event_id, endpoint_id);
-- The claim: due rows in due order, only over the live part of the table.
CREATE INDEX delivery_due_idx ON outbox.delivery (due_at) WHERE status IN ('pending', 'in_flight');
-- Claims scoped to one endpoint, per-endpoint backlog, cancelling on endpoint delete.
CREATE INDEX delivery_endpoint_due_idx ON outbox.delivery (endpoint_id, due_at) WHERE status IN ('pending', 'in_flight');
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
CREATE INDEX attempt_created_idx ON outbox.attempt (created_at);

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

CREATE FUNCTION outbox._endpoint_or_raise(p_endpoint_id uuid)
RETURNS outbox.endpoint
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    ep outbox.endpoint;
BEGIN
    SELECT * INTO ep FROM outbox.endpoint WHERE id = p_endpoint_id AND deleted_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'endpoint % does not exist', coalesce(p_endpoint_id::text, 'NULL')
            USING ERRCODE = 'no_data_found',
                  HINT = 'List endpoints with: SELECT id, url FROM outbox.endpoints;';
    END IF;
    RETURN ep;
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
    enabled     boolean  DEFAULT true
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id uuid;
BEGIN
    INSERT INTO outbox.endpoint (url, secret, event_types, headers, timeout, tenant_id, description, enabled)
    VALUES (
        outbox._check_url(create_endpoint.url),
        CASE WHEN create_endpoint.secret IS NULL THEN outbox.generate_secret()
             ELSE outbox._check_secret(create_endpoint.secret) END,
        outbox._check_event_types(create_endpoint.event_types),
        outbox._check_headers(coalesce(create_endpoint.headers, '{}')),
        outbox._check_timeout(create_endpoint.timeout),
        outbox._check_tenant(create_endpoint.tenant_id),
        create_endpoint.description,
        coalesce(create_endpoint.enabled, true)
    )
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- NULL arguments leave a field unchanged. event_types => '{*}' makes the endpoint receive
-- every event again; timeout => '0' returns it to the outbox.request_timeout default.
CREATE FUNCTION outbox.update_endpoint(
    endpoint_id uuid,
    url         text     DEFAULT NULL,
    event_types text[]   DEFAULT NULL,
    secret      text     DEFAULT NULL,
    headers     jsonb    DEFAULT NULL,
    timeout     interval DEFAULT NULL,
    description text     DEFAULT NULL
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
        updated_at  = now()
    WHERE e.id = update_endpoint.endpoint_id;
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
END
$$;

-- Deletes an endpoint and cancels its deliveries that were not finished; returns how many
-- were cancelled. A delivery in flight at that moment is cancelled too: an ack from its
-- sender is then refused, so the endpoint's history ends consistently.
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
    UPDATE outbox.endpoint SET enabled = false, disabled_reason = 'deleted', deleted_at = now(), updated_at = now()
    WHERE id = delete_endpoint.endpoint_id;
    UPDATE outbox.delivery d
       SET status = 'cancelled', finished_at = now(), lease_owner = NULL,
           last_error = 'cancelled: endpoint deleted'
     WHERE d.endpoint_id = delete_endpoint.endpoint_id AND d.status IN ('pending', 'in_flight');
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The signing secret (whsec_…) to hand to the receiver. Never shown by any view.
CREATE FUNCTION outbox.endpoint_secret(endpoint_id uuid)
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (outbox._endpoint_or_raise(endpoint_secret.endpoint_id)).secret
$$;

-------------------------------------------------------------------------------------------
-- Enqueue
-------------------------------------------------------------------------------------------

-- Creates one delivery per enabled endpoint whose filter matches event_type (same tenant), or
-- exactly one for endpoint_id when it is given (its filter and enabled flag are not consulted:
-- a disabled endpoint's delivery waits until it is enabled). Runs in the caller's
-- transaction. With event_id, enqueueing the same (event_id, endpoint) again returns the
-- existing delivery; the first enqueue's payload wins.
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
BEGIN
    PERFORM outbox._check_event(enqueue.event_type, enqueue.event_id, enqueue.tenant_id,
                                octet_length(enqueue.payload::text));

    IF enqueue.endpoint_id IS NOT NULL THEN
        v_targets := ARRAY[(outbox._endpoint_or_raise(enqueue.endpoint_id)).id];
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
            INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at)
            SELECT v_event_id, t, enqueue.tenant_id, coalesce(enqueue.deliver_at, now())
              FROM unnest(v_targets) AS t
            RETURNING id;
    ELSE
        -- A concurrent transaction enqueueing the same id makes these wait for it, then do
        -- nothing; the SELECT (a new snapshot) then sees its rows.
        INSERT INTO outbox.event (id, event_type, payload, tenant_id)
        VALUES (v_event_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id)
        ON CONFLICT (id) DO NOTHING;
        INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at)
        SELECT v_event_id, t, enqueue.tenant_id, coalesce(enqueue.deliver_at, now())
          FROM unnest(v_targets) AS t
        ON CONFLICT (event_id, endpoint_id) DO NOTHING;
        RETURN QUERY
            SELECT d.id FROM outbox.delivery d
             WHERE d.event_id = v_event_id AND d.endpoint_id = ANY (v_targets);
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

-- Claims up to batch_size due deliveries: pending ones whose time has come and in-flight
-- ones whose lease expired (their sender died). Each claimed row is in_flight with a lease
-- until now() + lease and its attempt number incremented; the attempt number is the fencing
-- token the ack must present. LANGUAGE sql: planned afresh on every call, so a plan made
-- while the table was empty is never reused when it holds millions of rows.
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
    tenant_id   text
)
LANGUAGE sql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH due AS (
        SELECT d.id
          FROM outbox.delivery d
          JOIN outbox.endpoint e ON e.id = d.endpoint_id
         WHERE d.status IN ('pending', 'in_flight')
           AND d.due_at <= now()
           AND e.enabled AND e.deleted_at IS NULL
           AND (claim.endpoint_id IS NULL OR d.endpoint_id = claim.endpoint_id)
           AND (claim.tenant_id IS NULL OR d.tenant_id = claim.tenant_id)
         ORDER BY d.due_at
         LIMIT outbox._check_claim(claim.batch_size, claim.lease)
           FOR UPDATE OF d SKIP LOCKED
    )
    UPDATE outbox.delivery d
       SET status = 'in_flight',
           attempts = d.attempts + 1,
           due_at = now() + claim.lease,
           lease_owner = claim.worker
      FROM due, outbox.endpoint e, outbox.event ev
     WHERE d.id = due.id AND e.id = d.endpoint_id AND ev.id = d.event_id
    RETURNING d.id, d.event_id, d.attempts, d.endpoint_id, e.url, e.secret, e.headers, e.timeout,
              ev.event_type,
              json_build_object('type', ev.event_type,
                                'timestamp', to_char(ev.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                                'data', ev.payload)::text,
              d.tenant_id
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
          FROM decided x
         WHERE d.id = x.id AND d.status = 'in_flight' AND d.attempts = x.attempt
        RETURNING d.id, d.endpoint_id
    ),
    gone AS (
        -- 410 Gone: the receiver wants no more deliveries; stop sending there.
        UPDATE outbox.endpoint e
           SET enabled = false, disabled_reason = 'receiver answered 410 Gone', updated_at = now()
          FROM decided x JOIN upd ON upd.id = x.id
         WHERE e.id = upd.endpoint_id AND x.status_code = 410 AND x.final_outcome = 'dead' AND e.enabled
    ),
    hist AS (
        INSERT INTO outbox.attempt (delivery_id, attempt, outcome, status_code, error, duration_ms, response_body, worker)
        SELECT x.id, x.attempt, x.final_outcome, x.status_code, x.error, x.duration_ms,
               x.response_body, ack_batch.worker
          FROM decided x JOIN upd ON upd.id = x.id
    )
    SELECT id FROM upd
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

CREATE VIEW outbox.endpoints AS
SELECT e.id, e.url, e.event_types, e.enabled, e.disabled_reason, e.timeout, e.headers,
       e.tenant_id, e.description, e.created_at, e.updated_at
  FROM outbox.endpoint e
 WHERE e.deleted_at IS NULL;

CREATE VIEW outbox.deliveries AS
SELECT d.id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url, d.tenant_id,
       d.status,
       (d.status = 'pending' AND d.attempts > 0) AS retrying,
       d.attempts,
       CASE WHEN d.status = 'pending' THEN d.due_at END AS next_attempt_at,
       CASE WHEN d.status = 'in_flight' THEN d.due_at END AS lease_expires_at,
       d.lease_owner, d.created_at, d.last_attempt_at, d.finished_at,
       d.last_status_code, d.last_error, ev.payload
  FROM outbox.delivery d
  JOIN outbox.event ev ON ev.id = d.event_id
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
  JOIN outbox.event ev ON ev.id = d.event_id
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE d.status = 'dead';

-------------------------------------------------------------------------------------------
-- Statistics
-------------------------------------------------------------------------------------------

-- Queue health in one row. Every count reads a partial index over the live part of the
-- table or a time-bounded range of the finished index, so the cost does not grow with the
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
    OUT success_rate_last_hour double precision
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
               count(*) FILTER (WHERE status = 'dead')      AS dead
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
                ELSE recent.delivered::double precision / (recent.delivered + recent.dead) END
      FROM live, recent, failures
$$;

-- Seconds until the next delivery on an enabled endpoint becomes due (a retry's time or an
-- expired lease), 0 if one is due now, NULL if none waits. The worker sleeps that long.
CREATE FUNCTION outbox._next_due()
RETURNS double precision
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT greatest(extract(epoch FROM min(d.due_at) - clock_timestamp()), 0)::double precision
      FROM outbox.delivery d JOIN outbox.endpoint e ON e.id = d.endpoint_id
     WHERE d.status IN ('pending', 'in_flight') AND e.enabled AND e.deleted_at IS NULL
$$;

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
    EXECUTE format('GRANT SELECT ON outbox.endpoints, outbox.deliveries, outbox.attempts, outbox.dead_letters TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.stats(), outbox.enable_endpoint(uuid), outbox.disable_endpoint(uuid, text) TO %s', role);
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
        outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean),
        outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text),
        outbox.delete_endpoint(uuid), outbox.endpoint_secret(uuid), outbox.generate_secret(),
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
        outbox._next_due()
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
