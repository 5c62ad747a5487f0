-------------------------------------------------------------------------------------------
-- Reading the log
--
-- The log is read in batches bounded by transaction snapshots, never by a "last id seen"
-- (ids and transaction ids are handed out in one order and committed in another: such a
-- cursor skips a transaction that took a lower id and committed later). The cursor keeps
-- `done`, a snapshot every transaction visible in which has been read. A batch takes a
-- newer snapshot, `batch`, and is exactly the events of the transactions visible in
-- `batch` and not in `done`: every committed transaction is in exactly one batch, a
-- rolled-back one in none (its rows are invisible), and a long one delays only its own
-- events. The batch's fan-out and the cursor's advance to `batch` commit together, so a
-- crash re-reads an unfinished batch, loses nothing, and finds nothing of its first read
-- (which did not commit either).
-------------------------------------------------------------------------------------------

-- Who receives each event of p_events (n: its place there): the endpoint it was enqueued
-- for, unless that was deleted; otherwise every endpoint that is enabled, not deleted, of
-- the event's tenant and subscribed to its type (outbox._filter_matches) at this moment.
-- Events from outbox.trigger get their id here (outbox._log_event_id: the same on every
-- read).
CREATE FUNCTION outbox._targets(p_events outbox.log[])
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
CREATE FUNCTION outbox._fan_out(p_events outbox.log[], p_sent outbox._sent[] DEFAULT '{}',
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
CREATE FUNCTION outbox._read_part(c outbox.log_cursor, p_batch pg_snapshot, p_max integer, p_max_bytes bigint,
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
CREATE FUNCTION outbox._advance_cursor(c outbox.log_cursor, p_batch pg_snapshot, p_events outbox.log[], p_more boolean)
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
CREATE FUNCTION outbox._read_log(p_max integer DEFAULT 5000, p_max_bytes bigint DEFAULT 64 * 1024 * 1024)
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
CREATE FUNCTION outbox._read_batch(p_free integer, p_max integer, p_max_bytes bigint,
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
CREATE FUNCTION outbox._log_lock()
RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ('outbox.log'::regclass::oid::bigint % 2147483647)::integer;

-- Whether the attempts of the reader's open batch count in their endpoints' state rows
-- (outbox._read_batch, outbox._close_batch, outbox._account): only when other workers
-- claim beside it. A single worker keeps them in its memory, claims nothing while the
-- batch is open, and so writes an endpoint's state row about once a second under a flow
-- of successes. (An external outbox.claim of the same endpoint meanwhile does not see
-- them.)
CREATE FUNCTION outbox._batches_counted()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN coalesce(nullif(current_setting('outbox.workers', true), '')::integer, 1) > 1;

-- Makes the calling session the log's reader for as long as it lasts (the session lock
-- of outbox._log_lock), if no one else is; returns whether it is. Every endpoint's
-- in-flight count is set to its deliveries in flight then, correcting any count left wrong
-- (state rows someone holds are left for the claim's own recount).
CREATE FUNCTION outbox._become_reader()
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

-- Sets every endpoint's in-flight count to its deliveries in flight where the two differ;
-- returns how many it corrected. The reader runs it when it starts and once a second: an
-- attempt from a batch whose endpoint's state row someone held when the batch closed is
-- written in flight without being counted (outbox._close_batch never waits), and its
-- acknowledgement later takes one off. State rows someone holds are passed by; a row is
-- written only when its count is wrong.
CREATE FUNCTION outbox._recount_endpoints()
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

-- Whether a batch is read in part: the worker then comes back at once instead of sleeping.
CREATE FUNCTION outbox._log_behind()
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
CREATE FUNCTION outbox._rotate_log()
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
CREATE FUNCTION outbox._log_part_read(p integer, done pg_snapshot)
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
