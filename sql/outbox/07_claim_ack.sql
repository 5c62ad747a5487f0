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
CREATE FUNCTION outbox._decided(
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
CREATE FUNCTION outbox._account(p_rows outbox._settled[], p_worker text, p_logged boolean DEFAULT false)
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
CREATE FUNCTION outbox._close_batch(
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
CREATE FUNCTION outbox._next_due()
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
