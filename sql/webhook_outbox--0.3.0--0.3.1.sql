-- webhook_outbox 0.3.0 -> 0.3.1: hardening.
--
-- The worker pins its search_path and never waits for locks users can hold; a dead worker's
-- leases are taken back when it restarts; caller event ids are scoped per tenant; texts
-- from receivers are bounded and notifications carry ids only; deliver_at has a range;
-- retry_dead keeps the attempt number growing; deleted endpoints keep no secrets; pg_dump
-- saves the queue. Functions that change are restated whole; queued deliveries are kept.

-- A deleted endpoint keeps no secret, and an old secret goes when its overlap ends.
ALTER TABLE outbox.endpoint
    ALTER COLUMN secret DROP NOT NULL,
    ADD CONSTRAINT endpoint_secret_present CHECK (secret IS NOT NULL OR deleted_at IS NOT NULL);
UPDATE outbox.endpoint
   SET secret = NULL, previous_secret = NULL, previous_secret_expires_at = NULL, headers = '{}'
 WHERE deleted_at IS NOT NULL;
UPDATE outbox.endpoint SET previous_secret = NULL, previous_secret_expires_at = NULL
 WHERE previous_secret_expires_at <= now();

-- Caller event ids are unique per tenant.
ALTER TABLE outbox.delivery DROP CONSTRAINT delivery_event_id_fkey;
ALTER TABLE outbox.event
    ADD COLUMN tenant_key text NOT NULL GENERATED ALWAYS AS (coalesce(tenant_id, '')) STORED,
    DROP CONSTRAINT event_pkey,
    ADD CONSTRAINT event_pkey PRIMARY KEY (id, tenant_key);
ALTER TABLE outbox.delivery
    ADD COLUMN tenant_key text NOT NULL GENERATED ALWAYS AS (coalesce(tenant_id, '')) STORED,
    ADD COLUMN retry_base integer NOT NULL DEFAULT 0;
-- Deliveries 0.3.0 made for a tenant under another tenant's event id (the hole this release
-- closes) get an event of their tenant's own, with what they were going to be sent.
INSERT INTO outbox.event (id, event_type, payload, tenant_id, created_at)
SELECT DISTINCT ON (d.event_id, d.tenant_key) ev.id, ev.event_type, ev.payload, d.tenant_id, ev.created_at
  FROM outbox.delivery d
  JOIN outbox.event ev ON ev.id = d.event_id
 WHERE NOT EXISTS (SELECT 1 FROM outbox.event o WHERE o.id = d.event_id AND o.tenant_key = d.tenant_key)
 ORDER BY d.event_id, d.tenant_key, ev.created_at;
ALTER TABLE outbox.delivery
    ADD CONSTRAINT delivery_event_fkey FOREIGN KEY (event_id, tenant_key) REFERENCES outbox.event (id, tenant_key);

-- 0.3.0 accepted deliver_at => 'infinity'; such a delivery is now due a year ahead.
UPDATE outbox.delivery SET due_at = now() + interval '1 year'
 WHERE status = 'pending' AND NOT isfinite(due_at);

-- pg_dump saves the user data (see outbox.sql).
SELECT pg_catalog.pg_extension_config_dump('outbox.endpoint', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.delivery', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.delivery_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.attempt', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.attempt_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.stats_hourly', '');

-- The bound ack_batch puts on response bodies: outbox.max_response_body, for every sender.
CREATE FUNCTION outbox._max_response_body() RETURNS integer
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'max_response_body_wrapper';

-- The event filter's rule moves into the library (validate::filter_matches), where the
-- worker can use it too; as an SQL function with a subquery it could not be inlined and was
-- planned anew on every enqueue (about 40 µs of each event).
CREATE OR REPLACE FUNCTION outbox._filter_matches(filter text[], event_type text) RETURNS boolean
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'filter_matches_wrapper';


-- When an enqueued event may first be sent: deliver_at, or now. A time in the past means
-- now; a time more than outbox._max_schedule_ahead() ahead, or a non-finite one, is
-- refused: every due time the worker computes with stays an ordinary timestamp (a retry
-- time an external sender gives is clamped to the same range).
CREATE OR REPLACE FUNCTION outbox._max_schedule_ahead()
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '1 year' $$;

CREATE OR REPLACE FUNCTION outbox._check_deliver_at(deliver_at timestamptz)
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
CREATE OR REPLACE FUNCTION outbox._truncate(t text, max_bytes integer)
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
CREATE OR REPLACE FUNCTION outbox._max_error_bytes()
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 2000 $$;

-- Is there room in the NOTIFY queue? A listener that never reads fills it, and a full queue
-- would fail the commit of whoever notifies: past half full, announcements are skipped (the
-- history and the views keep everything).
CREATE OR REPLACE FUNCTION outbox._notify_room()
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

-- Leases that expired (their sender died or hung) make their deliveries pending again, due
-- at once; the attempt number stays, so the old holder's late ack is refused. Returns how
-- many. The claim runs it first, for the endpoints it may serve. Endpoints whose state row
-- someone else holds (an operator's open transaction) are left for a later call: a claimer
-- never waits for them.
CREATE OR REPLACE FUNCTION outbox._requeue_expired(p_endpoint_id uuid)
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
CREATE OR REPLACE FUNCTION outbox._requeue_orphaned()
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
CREATE OR REPLACE FUNCTION outbox._lock_for_ack(ids uuid[])
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

-- Publishes one status change of a delivery on the live feed: channel outbox_feed, the
-- endpoint's channel outbox_feed_<endpoint id>, and the tenant's outbox_feed_tenant_<tenant>
-- (for tenant ids of at most 44 bytes, the rest of a channel name's room). Any role that
-- can connect may LISTEN, so the payload carries ids and the status only; whoever may know
-- more reads it from outbox.deliveries.
CREATE OR REPLACE FUNCTION outbox._feed(p_id uuid, p_endpoint_id uuid, p_tenant_id text, p_event_type text,
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
CREATE OR REPLACE FUNCTION outbox._operator_event(kind text, details jsonb, about_endpoint uuid)
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

-- Deletes an endpoint and cancels its deliveries that were not finished; returns how many
-- were cancelled. A delivery in flight at that moment is cancelled too: an ack from its
-- sender is then refused, so the endpoint's history ends consistently. The row stays for
-- the history to point at, but its secrets and headers (credentials, often) go.
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

-- Creates one delivery per enabled endpoint whose filter matches event_type (same tenant), or
-- exactly one for endpoint_id when it is given (it must be the tenant's own; its filter and
-- enabled flag are not consulted: a disabled endpoint's delivery waits until it is
-- enabled). Runs in the caller's transaction. With event_id (unique per tenant), enqueueing
-- the same event again returns the existing deliveries; the same id with another event type
-- or payload is refused.
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
    -- The endpoints' state rows first, in endpoint order, before anything else is written:
    -- the statement below writes them together with other rows (the hourly statistics,
    -- the deliveries), in an order no one controls, and two ackers of one endpoint (the
    -- worker and an external sender) that took those in opposite orders would deadlock.
    PERFORM 1 FROM outbox.endpoint_state s
     WHERE s.endpoint_id IN (SELECT d.endpoint_id FROM outbox.delivery d WHERE d.id = ANY (ack_batch.delivery_ids))
     ORDER BY s.endpoint_id
       FOR UPDATE;
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
          FROM batch b
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
       AND NOT EXISTS (SELECT 1 FROM outbox.delivery WHERE id = retry_dead.delivery_id) THEN
        RAISE EXCEPTION 'delivery % does not exist', retry_dead.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM outbox._wake_at_commit();
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
        outbox.endpoint_health, outbox.recent_failures, outbox.metrics, outbox.triggers TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.stats(), outbox.enable_endpoint(uuid), outbox.disable_endpoint(uuid, text),
        outbox.delivery_stats(interval, uuid, text, text), outbox.endpoint_stats(interval), outbox.event_type_stats(interval),
        outbox.retry_dead(uuid, uuid, timestamptz, timestamptz), outbox.replay(uuid, timestamptz, timestamptz),
        outbox.cancel(uuid, uuid), outbox._policy() TO %s', role);
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
        outbox._requeue_orphaned(), outbox._lock_for_ack(uuid[])
        TO %s', role);
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
-- Without options, nothing is parsed per row.
CREATE OR REPLACE FUNCTION outbox.trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_prefix   text := coalesce(TG_ARGV[0], TG_TABLE_NAME);
    v_type     text;
    v_data     jsonb;
    v_new      jsonb;
    v_old      jsonb;
    v_tenant   text;
    v_column   text;
    v_exclude  text[];
    v_supabase boolean := false;
    v_opt      text;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'outbox.trigger() must be used as an AFTER ... FOR EACH ROW trigger'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 1 .. TG_NARGS - 1 LOOP
        v_opt := TG_ARGV[i];
        IF strpos(v_opt, '=') = 0 AND i = 1 THEN
            v_column := v_opt;
        ELSIF starts_with(v_opt, 'tenant=') THEN
            v_column := substr(v_opt, 8);
        ELSIF starts_with(v_opt, 'exclude=') THEN
            v_exclude := regexp_split_to_array(btrim(substr(v_opt, 9)), '\s*,\s*');
        ELSIF v_opt IN ('shape=supabase', 'shape=outbox') THEN
            v_supabase := v_opt = 'shape=supabase';
        ELSE
            RAISE EXCEPTION 'outbox.trigger(): unknown argument "%" on table %.%', v_opt, TG_TABLE_SCHEMA, TG_TABLE_NAME
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Arguments: the event type prefix, then tenant=<column> (or the column alone), exclude=<column>[,<column>...], shape=outbox or shape=supabase.';
        END IF;
    END LOOP;
    IF TG_OP = 'INSERT' THEN
        v_type := v_prefix || '.created';
        v_new := to_jsonb(NEW);
    ELSIF TG_OP = 'UPDATE' THEN
        v_type := v_prefix || '.updated';
        v_new := to_jsonb(NEW);
        v_old := to_jsonb(OLD);
    ELSIF TG_OP = 'DELETE' THEN
        v_type := v_prefix || '.deleted';
        v_old := to_jsonb(OLD);
    ELSE
        RAISE EXCEPTION 'outbox.trigger() handles INSERT, UPDATE and DELETE, not %', TG_OP
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_column IS NOT NULL THEN
        IF NOT coalesce(v_new, v_old) ? v_column THEN
            RAISE EXCEPTION 'outbox.trigger(): table %.% has no column "%" for the tenant id', TG_TABLE_SCHEMA, TG_TABLE_NAME, v_column
                USING ERRCODE = 'undefined_column';
        END IF;
        v_tenant := coalesce(v_new, v_old) ->> v_column;
    END IF;
    IF v_exclude IS NOT NULL THEN
        IF NOT coalesce(v_new, v_old) ?& v_exclude THEN
            RAISE EXCEPTION 'outbox.trigger(): table %.% lacks a column of exclude=%', TG_TABLE_SCHEMA, TG_TABLE_NAME, array_to_string(v_exclude, ',')
                USING ERRCODE = 'undefined_column',
                      HINT = 'Name existing columns only: a misspelled one would be sent.';
        END IF;
        v_new := v_new - v_exclude;
        v_old := v_old - v_exclude;
    END IF;
    IF v_supabase THEN
        v_data := jsonb_build_object('type', TG_OP, 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                                     'record', v_new, 'old_record', v_old);
    ELSIF TG_OP = 'UPDATE' THEN
        v_data := jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                     'record', v_new, 'old_record', v_old);
    ELSE
        v_data := jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                     'record', coalesce(v_new, v_old));
    END IF;
    PERFORM outbox.enqueue(v_type, v_data, tenant_id => v_tenant);
    RETURN NULL;
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
       e.ordered, e.rate_limit, e.max_in_flight
  FROM outbox.endpoint e
 WHERE e.deleted_at IS NULL;

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
  JOIN outbox.endpoint e ON e.id = d.endpoint_id;

CREATE OR REPLACE VIEW outbox.dead_letters AS
SELECT d.id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url, d.tenant_id,
       d.attempts, d.last_status_code, d.last_error, d.created_at, d.finished_at AS died_at,
       ev.payload
  FROM outbox.delivery d
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE d.status = 'dead';

-- Failed attempts, newest first (attempt_failed_idx serves ORDER BY ... LIMIT).
CREATE OR REPLACE VIEW outbox.recent_failures AS
SELECT a.created_at, a.delivery_id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url,
       a.attempt, a.outcome, a.status_code, a.error, a.response_body
  FROM outbox.attempt a
  JOIN outbox.delivery d ON d.id = a.delivery_id
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE a.outcome IN ('retry', 'dead')
 ORDER BY a.created_at DESC;

-- One row per live endpoint: its backlog, what the last attempts said, its circuit breaker
-- (state, when it opened, when the next probe goes, the current cool-down), and what holds
-- its queue back, if anything, until when (NULL: until an operator or an outcome acts):
-- disabled, circuit open (until its probe), a probe in flight, an ordered endpoint's head in
-- flight or not due yet (a retry, or a deliver_at ahead: everything behind it waits), or
-- max_in_flight reached.
CREATE OR REPLACE VIEW outbox.endpoint_health AS
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

-- The tables that carry an outbox.trigger, and how: which changes make events, the event
-- type prefix, the arguments after it (tenant column, exclude=…, shape=…), whether it is
-- enabled, and its full definition.
CREATE OR REPLACE VIEW outbox.triggers AS
SELECT t.tgrelid::regclass AS table_name, t.tgname::text AS trigger_name,
       t.tgenabled <> 'D' AS enabled,
       array_remove(ARRAY[CASE WHEN t.tgtype & 4 <> 0 THEN 'INSERT' END,
                          CASE WHEN t.tgtype & 16 <> 0 THEN 'UPDATE' END,
                          CASE WHEN t.tgtype & 8 <> 0 THEN 'DELETE' END], NULL) AS events,
       coalesce(a.args[1], c.relname::text) AS event_prefix,
       coalesce(a.args[2:], '{}') AS arguments,
       pg_get_triggerdef(t.oid) AS definition
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
 CROSS JOIN LATERAL (
       SELECT (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1:t.tgnargs] AS args) a
 WHERE t.tgfoid = 'outbox.trigger()'::regprocedure AND NOT t.tgisinternal;

-- Roles the worker connects as get the worker's new functions.
DO $upgrade$
DECLARE
    g text;
BEGIN
    FOR g IN
        SELECT DISTINCT a.grantee::regrole::text FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'outbox._next_due()'::regprocedure AND a.grantee NOT IN (0, p.proowner)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._requeue_orphaned(), outbox._lock_for_ack(uuid[]) TO %s', g);
    END LOOP;
    -- Operators: outbox.endpoint_health reads the delivery-control settings now, and
    -- outbox.triggers is new.
    FOR g IN
        SELECT DISTINCT a.grantee::regrole::text FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'outbox.endpoint_health'::regclass AND a.privilege_type = 'SELECT'
           AND a.grantee NOT IN (0, c.relowner)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._policy() TO %s', g);
        EXECUTE format('GRANT SELECT ON outbox.triggers TO %s', g);
    END LOOP;
END
$upgrade$;

REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
