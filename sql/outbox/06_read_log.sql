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

-- Turns events into deliveries: one per endpoint that is enabled, not deleted, of the
-- event's tenant and subscribed to its type (outbox._filter_matches) at this moment; or,
-- for an event enqueued for one endpoint, one for that endpoint unless it was deleted.
-- Deliveries to ordered endpoints are numbered in the order of p_events. Returns how many
-- deliveries it made.
CREATE FUNCTION outbox._fan_out(p_events outbox.log[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_made integer;
    v_fed  integer;
    v_feed boolean := outbox._feed_on();
BEGIN
    WITH ev AS MATERIALIZED (
        -- Events from outbox.trigger get their id here, once: what is made below commits
        -- with the cursor, so a read that fails leaves no id behind.
        SELECT e.txid, e.seq, coalesce(e.id, outbox._new_event_id()) AS id, e.event_type, e.payload,
               e.tenant_id, e.endpoint_id, e.deliver_at, e.created_at, e.n
          FROM unnest(p_events) WITH ORDINALITY
            AS e(txid, seq, id, event_type, payload, tenant_id, endpoint_id, deliver_at, created_at, n)
    ),
    target AS (
        SELECT ev.*, ep.id AS ep_id, ep.ordered
          FROM ev JOIN outbox.endpoint ep ON ep.id = ev.endpoint_id AND ep.deleted_at IS NULL
        UNION ALL
        SELECT ev.*, ep.id, ep.ordered
          FROM ev JOIN outbox.endpoint ep
            ON ev.endpoint_id IS NULL AND ep.enabled AND ep.deleted_at IS NULL
           AND ep.tenant_id IS NOT DISTINCT FROM ev.tenant_id
           AND outbox._filter_matches(ep.event_types, ev.event_type)
    ),
    events AS (
        -- A caller's id already has its row (enqueue claimed the id there).
        INSERT INTO outbox.event (id, event_type, payload, tenant_id, created_at)
        SELECT DISTINCT ON (t.id, coalesce(t.tenant_id, '')) t.id, t.event_type, t.payload, t.tenant_id, t.created_at
          FROM target t
        ON CONFLICT (id, tenant_key) DO NOTHING
    ),
    made AS (
        INSERT INTO outbox.delivery (event_id, endpoint_id, tenant_id, due_at, seq, created_at)
        SELECT t.id, t.ep_id, t.tenant_id, coalesce(t.deliver_at, now()),
               CASE WHEN t.ordered THEN nextval('outbox.delivery_seq') END, t.created_at
          FROM target t
         ORDER BY t.n, t.ep_id
        ON CONFLICT (event_id, endpoint_id, replay_of) DO NOTHING
        RETURNING id, endpoint_id, tenant_id, event_id
    )
    -- The live feed, when it is on, hears of each new delivery; its event type comes from
    -- a join (an event's id is unique within its tenant), not a lookup per delivery.
    SELECT count(*), count(outbox._feed(m.id, m.endpoint_id, m.tenant_id, e.event_type, 'queued', 0)) FILTER (WHERE v_feed)
      INTO v_made, v_fed
      FROM made m
      JOIN (SELECT DISTINCT ON (ev.id, ev.tenant_id) ev.id, ev.tenant_id, ev.event_type FROM ev) e
        ON e.id = m.event_id AND e.tenant_id IS NOT DISTINCT FROM m.tenant_id;
    RETURN v_made;
END
$$;

-- Reads the next part of the log (at most p_max events, and no more events once their
-- payloads reach p_max_bytes as stored) and fans it out; returns how many events it read. One
-- reader at a time: another caller meanwhile returns 0 at once (its claim goes on with what
-- is fanned out already). A batch larger than a part is read over several calls, from
-- where the last stopped. Only under READ COMMITTED: a transaction whose snapshot is older
-- than the cursor's could move it backwards.
CREATE FUNCTION outbox._read_log(p_max integer DEFAULT 5000, p_max_bytes bigint DEFAULT 64 * 1024 * 1024)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c         outbox.log_cursor;
    v_batch   pg_snapshot;
    v_late    xid8[];
    v_from    xid8;
    v_from_seq bigint;
    r         outbox.log;
    v_events  outbox.log[] := '{}';
    v_n       integer := 0;
    v_bytes   bigint := 0;
    v_more    boolean := false;
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
    -- Transactions in progress when `done` was taken that have ended since: their events
    -- lie below the range scanned next.
    v_late := ARRAY(SELECT x FROM pg_snapshot_xip(c.done) x WHERE pg_visible_in_snapshot(x, v_batch));
    -- Where the last part of this batch ended, if it is read in parts. Compared column by
    -- column: a row comparison would make (0, 0) the index scan's start, the log's beginning.
    v_from := coalesce(c.pos_txid, '0'::xid8);
    v_from_seq := coalesce(c.pos_seq, 0);

    -- A loop, so that the scan stops where the part ends: the byte bound keeps a batch of
    -- large payloads from becoming one array past what a backend can allocate.
    FOR r IN
        SELECT l.* FROM outbox.log l
         WHERE l.txid = ANY (v_late) AND l.txid >= v_from AND (l.txid > v_from OR l.seq > v_from_seq)
        UNION ALL
        SELECT l.* FROM outbox.log l
         WHERE l.txid >= greatest(pg_snapshot_xmax(c.done), v_from) AND l.txid < pg_snapshot_xmax(v_batch)
           AND pg_visible_in_snapshot(l.txid, v_batch)
           AND (l.txid > v_from OR l.seq > v_from_seq)
         ORDER BY 1, 2
    LOOP
        IF v_n >= greatest(p_max, 1) OR v_bytes >= p_max_bytes THEN
            v_more := true;
            EXIT;
        END IF;
        v_events := v_events || r;
        v_n := v_n + 1;
        v_bytes := v_bytes + pg_column_size(r.payload);
    END LOOP;
    IF v_n > 0 THEN
        PERFORM outbox._fan_out(v_events);
        -- The other workers claim too: they were woken by the producers' commits, found
        -- nothing fanned out yet, and would otherwise sleep until their poll interval.
        PERFORM outbox._wake_at_commit();
    END IF;

    IF v_more THEN
        -- More of this batch follows: remember where this part ended.
        INSERT INTO outbox.log_cursor (done, batch, pos_txid, pos_seq, events)
        VALUES (c.done, v_batch, (v_events[v_n]).txid, (v_events[v_n]).seq, v_n);
    ELSIF v_n > 0 OR c.batch IS NOT NULL OR c.created_at < now() - interval '10 seconds' THEN
        -- The batch is read. An empty one is recorded only now and then: what it would
        -- save the next read is an index probe, and a row per idle cycle is not worth it;
        -- but `done` must move on for rotation to free old partitions.
        INSERT INTO outbox.log_cursor (done, events) VALUES (v_batch, v_n);
    END IF;
    RETURN v_n;
END
$$;

-- The advisory lock that makes one reader at a time (its second key is 0); derived from
-- the log's OID, so it names this database's log and no user's own lock.
CREATE FUNCTION outbox._log_lock()
RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ('outbox.log'::regclass::oid::bigint % 2147483647)::integer;

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
