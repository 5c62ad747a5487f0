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
       AND NOT EXISTS (SELECT 1 FROM outbox.deliveries WHERE id = cancel.delivery_id) THEN
        RAISE EXCEPTION 'delivery % does not exist', cancel.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN n;
END
$$;

-------------------------------------------------------------------------------------------
-- Retention
-------------------------------------------------------------------------------------------

-- Empties the oldest partition of outbox.history for reuse, when its turn has come: the
-- partition written now has been for half of p_age, and every row of the next one is older
-- than p_age (rows are kept from p_age to one and a half times it). TRUNCATE, never DELETE:
-- nothing is left for VACUUM. A partition someone is reading (a lock held) is not waited
-- for: the next call tries again. Returns whether it rotated.
CREATE FUNCTION outbox._rotate_history(p_age interval)
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
CREATE FUNCTION outbox._rotate_event_keys(p_age interval)
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
