-- webhook_outbox 0.3.1 -> 0.4.0: the event log.
--
-- Producers append one row to outbox.log and nothing else; the worker (or outbox.claim)
-- reads the log in snapshot-bounded batches and fans each event out to its endpoints after
-- the producer committed. outbox.enqueue returns the event id instead of delivery ids.
-- Functions that change are restated whole; queued deliveries are kept as they are.

-- The event log: what producers write, and all they write. One row per enqueued event,
-- stamped with the producer's top-level transaction id; the worker reads it in batches
-- bounded by transaction snapshots (outbox._read_log) and fans each event out to its
-- endpoints after the producer committed. Rows are never updated or deleted one by one:
-- the log is three partitions by transaction-id window, and a partition is truncated
-- whole once every transaction that could have written to it was read
-- (outbox._rotate_log). So the producer's cost is one insert into a small table, and
-- neither an old snapshot nor VACUUM falling behind lets the log grow dead rows.
--
-- outbox._stamp() returns pg_current_xact_id() and, once per transaction, arranges for
-- the workers to be woken at commit: any insert into the log wakes them, however it came.
CREATE FUNCTION outbox._stamp()
RETURNS xid8
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'stamp_wrapper';

-- The partition a transaction id's rows go to: windows of 65,536 transaction ids, taking
-- turns over three partitions. While producers write to one, the one before it is being
-- read, and the one before that can be truncated.
CREATE FUNCTION outbox._log_part(txid xid8)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ((txid::text::bigint >> 16) % 3)::integer;

-- The rules every log row obeys (event type, tenant id, payload size: see the Rust
-- validate module), raising a clear error; true otherwise.
CREATE FUNCTION outbox._check_log(event_type text, tenant_id text, payload_bytes integer)
RETURNS boolean
LANGUAGE c STABLE PARALLEL SAFE
AS 'MODULE_PATHNAME', 'check_log_wrapper';

-- A counter of this backend's log rows: with the transaction id (a transaction belongs to
-- one backend) it orders and identifies a transaction's events, for a fraction of what a
-- sequence costs (no lock, no WAL).
CREATE FUNCTION outbox._seq()
RETURNS bigint
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'seq_wrapper';

CREATE TABLE outbox.log (
    txid        xid8        NOT NULL DEFAULT outbox._stamp(),
    -- Order within a transaction (ordered endpoints receive events in this order).
    seq         bigint      NOT NULL DEFAULT outbox._seq(),
    -- The `webhook-id`: the caller's event id, or the one outbox.enqueue made up; NULL from
    -- outbox.trigger, whose events get theirs when they are read (outbox._fan_out).
    id          text,
    event_type  text        NOT NULL,
    payload     jsonb       NOT NULL,
    tenant_id   text,
    -- Set when the event is for one endpoint (enqueue's endpoint_id) instead of a fan-out.
    endpoint_id uuid,
    deliver_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT log_valid CHECK (outbox._check_log(event_type, tenant_id, pg_column_size(payload)))
) PARTITION BY LIST (outbox._log_part(txid));

CREATE TABLE outbox.log_0 PARTITION OF outbox.log FOR VALUES IN (0);
CREATE TABLE outbox.log_1 PARTITION OF outbox.log FOR VALUES IN (1);
CREATE TABLE outbox.log_2 PARTITION OF outbox.log FOR VALUES IN (2);
-- The reader's range scans, in the order events are fanned out.
CREATE INDEX log_txid_idx ON outbox.log (txid, seq);

-- Where reading the log stands: a row per read step, the newest row counting (rows are
-- appended, never updated, so an old snapshot leaves no chain of dead versions to walk;
-- outbox._rotate_log truncates the old ones). `done`: every transaction visible in this
-- snapshot has been read. `batch`: the snapshot of a batch read in parts, and `pos_txid`,
-- `pos_seq` the last event of it already read (a batch's events are fixed once its
-- snapshot is taken: every transaction in it has ended).
CREATE TABLE outbox.log_cursor (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    done       pg_snapshot NOT NULL,
    batch      pg_snapshot,
    pos_txid   xid8,
    pos_seq    bigint,
    events     integer     NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Reading starts here: events committed from now on.
INSERT INTO outbox.log_cursor (done) VALUES (pg_current_snapshot());

-- Whether the caller runs inside a transaction block: outbox.claim reads the log only
-- outside one.
CREATE FUNCTION outbox._in_transaction_block() RETURNS bool
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'in_transaction_block_wrapper';

-- outbox.enqueue returns the event id now: a new signature, so it is dropped and made
-- again, and whoever could run it gets it back (with what outbox.trigger needs).
SELECT set_config('webhook_outbox_upgrade.producers',
                  coalesce(string_agg(DISTINCT a.grantee::regrole::text, ','), ''), true)
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'outbox.enqueue(text, jsonb, uuid, text, text, timestamptz)'::regprocedure
   AND a.grantee NOT IN (0, p.proowner);
DROP FUNCTION outbox.enqueue(text, jsonb, uuid, text, text, timestamptz);


-- A new event id (the `webhook-id` of an event enqueued without one): `msg_` and 32 hex
-- digits of a random UUID.
CREATE OR REPLACE FUNCTION outbox._new_event_id()
RETURNS text
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN 'msg_' || replace(gen_random_uuid()::text, '-', '');

-- Appends one event to the log, in the caller's transaction, and returns its id (the
-- `webhook-id`). Nothing else happens here: after the transaction commits, the worker (or
-- outbox.claim) reads the event and fans it out to the endpoints subscribed at that moment
-- (outbox._fan_out), or to endpoint_id alone when it is given (it must be the tenant's own;
-- its filter and enabled flag are not consulted: a disabled endpoint's delivery waits until
-- it is enabled). With event_id (unique per tenant), enqueueing the same event again does
-- nothing and returns the id; the same id with another event type or payload is refused.
CREATE OR REPLACE FUNCTION outbox.enqueue(
    event_type  text,
    payload     jsonb,
    endpoint_id uuid        DEFAULT NULL,
    event_id    text        DEFAULT NULL,
    tenant_id   text        DEFAULT NULL,
    deliver_at  timestamptz DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_endpoint outbox.endpoint;
    v_known    outbox.event;
    v_id       text;
    v_due      timestamptz;
BEGIN
    -- The payload counts by its stored size, as the log's CHECK counts it: one rule, and
    -- no conversion of the JSON to text to measure it.
    PERFORM outbox._check_event(enqueue.event_type, enqueue.event_id, enqueue.tenant_id,
                                pg_column_size(enqueue.payload));
    IF enqueue.deliver_at IS NOT NULL THEN
        v_due := outbox._check_deliver_at(enqueue.deliver_at);
    END IF;

    IF enqueue.endpoint_id IS NOT NULL THEN
        v_endpoint := outbox._endpoint_or_raise(enqueue.endpoint_id, false);
        IF v_endpoint.tenant_id IS DISTINCT FROM enqueue.tenant_id THEN
            -- Said as if it did not exist: another tenant's endpoints are not to be probed.
            RAISE EXCEPTION 'endpoint % does not exist for tenant %', enqueue.endpoint_id,
                            coalesce(quote_literal(enqueue.tenant_id), 'NULL')
                USING ERRCODE = 'no_data_found',
                      HINT = 'Pass the endpoint''s own tenant_id; list them with: SELECT id, tenant_id FROM outbox.endpoints;';
        END IF;
    END IF;

    IF enqueue.event_id IS NULL THEN
        v_id := outbox._new_event_id();
        INSERT INTO outbox.log (id, event_type, payload, tenant_id, endpoint_id, deliver_at)
        VALUES (v_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id, enqueue.endpoint_id, v_due);
        RETURN v_id;
    END IF;

    -- A caller's id is claimed in outbox.event, the table that keeps events by id: a
    -- concurrent transaction enqueueing the same id makes this wait for it, then do nothing
    -- (the SELECT, a new snapshot, then sees its row); one that rolled back leaves it free.
    INSERT INTO outbox.event (id, event_type, payload, tenant_id)
    VALUES (enqueue.event_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id)
    ON CONFLICT (id, tenant_key) DO NOTHING;
    IF NOT FOUND THEN
        SELECT * INTO v_known FROM outbox.event ev
         WHERE ev.id = enqueue.event_id AND ev.tenant_key = coalesce(enqueue.tenant_id, '');
        IF v_known.event_type IS DISTINCT FROM enqueue.event_type OR v_known.payload IS DISTINCT FROM enqueue.payload THEN
            RAISE EXCEPTION 'event id % was enqueued before with another event type or payload', quote_literal(enqueue.event_id)
                USING ERRCODE = 'unique_violation',
                      HINT = 'An event id names one event (receivers deduplicate on it): enqueue a new event under a new id.';
        END IF;
        RETURN enqueue.event_id;
    END IF;
    INSERT INTO outbox.log (id, event_type, payload, tenant_id, endpoint_id, deliver_at)
    VALUES (enqueue.event_id, enqueue.event_type, enqueue.payload, enqueue.tenant_id, enqueue.endpoint_id, v_due);
    RETURN enqueue.event_id;
END
$$;

-- What an outbox.trigger with options makes of a row change: the event type, payload and
-- tenant, or an error that says what is wrong with the trigger. Called only when the
-- trigger has arguments after the prefix (or is misused); the common case never gets here.
CREATE OR REPLACE FUNCTION outbox._trigger_event(
    tg_when text, tg_level text, tg_op text, tg_table_schema name, tg_table_name name, tg_argv text[],
    v_new jsonb, v_old jsonb,
    OUT event_type text, OUT payload jsonb, OUT tenant_id text
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- TG_ARGV counts from 0; a slice counts from 1.
    v_args     text[] := tg_argv[array_lower(tg_argv, 1):array_upper(tg_argv, 1)];
    v_prefix   text := coalesce(v_args[1], tg_table_name);
    v_column   text;
    v_exclude  text[];
    v_supabase boolean := false;
    v_opt      text;
BEGIN
    IF tg_level <> 'ROW' OR tg_when <> 'AFTER' THEN
        RAISE EXCEPTION 'outbox.trigger() must be used as an AFTER ... FOR EACH ROW trigger'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 2 .. coalesce(cardinality(v_args), 0) LOOP
        v_opt := v_args[i];
        IF strpos(v_opt, '=') = 0 AND i = 2 THEN
            v_column := v_opt;
        ELSIF starts_with(v_opt, 'tenant=') THEN
            v_column := substr(v_opt, 8);
        ELSIF starts_with(v_opt, 'exclude=') THEN
            v_exclude := regexp_split_to_array(btrim(substr(v_opt, 9)), '\s*,\s*');
        ELSIF v_opt IN ('shape=supabase', 'shape=outbox') THEN
            v_supabase := v_opt = 'shape=supabase';
        ELSE
            RAISE EXCEPTION 'outbox.trigger(): unknown argument "%" on table %.%', v_opt, tg_table_schema, tg_table_name
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Arguments: the event type prefix, then tenant=<column> (or the column alone), exclude=<column>[,<column>...], shape=outbox or shape=supabase.';
        END IF;
    END LOOP;
    IF tg_op = 'INSERT' THEN
        event_type := v_prefix || '.created';
        v_old := NULL;
    ELSIF tg_op = 'UPDATE' THEN
        event_type := v_prefix || '.updated';
    ELSIF tg_op = 'DELETE' THEN
        event_type := v_prefix || '.deleted';
        v_new := NULL;
    ELSE
        RAISE EXCEPTION 'outbox.trigger() handles INSERT, UPDATE and DELETE, not %', tg_op
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_column IS NOT NULL THEN
        IF NOT coalesce(v_new, v_old) ? v_column THEN
            RAISE EXCEPTION 'outbox.trigger(): table %.% has no column "%" for the tenant id', tg_table_schema, tg_table_name, v_column
                USING ERRCODE = 'undefined_column';
        END IF;
        tenant_id := coalesce(v_new, v_old) ->> v_column;
    END IF;
    IF v_exclude IS NOT NULL THEN
        IF NOT coalesce(v_new, v_old) ?& v_exclude THEN
            RAISE EXCEPTION 'outbox.trigger(): table %.% lacks a column of exclude=%', tg_table_schema, tg_table_name, array_to_string(v_exclude, ',')
                USING ERRCODE = 'undefined_column',
                      HINT = 'Name existing columns only: a misspelled one would be sent.';
        END IF;
        v_new := v_new - v_exclude;
        v_old := v_old - v_exclude;
    END IF;
    IF v_supabase THEN
        payload := jsonb_build_object('type', tg_op, 'table', tg_table_name, 'schema', tg_table_schema,
                                      'record', v_new, 'old_record', v_old);
    ELSIF tg_op = 'UPDATE' THEN
        payload := jsonb_build_object('schema', tg_table_schema, 'table', tg_table_name, 'op', tg_op,
                                      'record', v_new, 'old_record', v_old);
    ELSE
        payload := jsonb_build_object('schema', tg_table_schema, 'table', tg_table_name, 'op', tg_op,
                                      'record', coalesce(v_new, v_old));
    END IF;
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
-- Without options, nothing is parsed per row (options: outbox._trigger_event). It runs as
-- the user whose statement fired it (never as the extension's owner: building the payload runs the table's types' casts and
-- output functions, which that user may have written), with the privilege grant_producer
-- gives: inserting an event into outbox.log.
CREATE OR REPLACE FUNCTION outbox.trigger()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- The common case (a row trigger with at most a prefix) in one statement: plpgsql sets
    -- up each expression it evaluates once per transaction, and a producer that writes one
    -- row per transaction pays for every one. No SET clause either (it costs a GUC save and
    -- restore per row): every name below is schema-qualified instead, so nothing on the
    -- caller's search_path can stand in for it.
    IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' AND TG_WHEN OPERATOR(pg_catalog.=) 'AFTER'
       AND TG_NARGS OPERATOR(pg_catalog.<=) 1 THEN
        INSERT INTO outbox.log (event_type, payload)
        VALUES (coalesce(TG_ARGV[0], TG_TABLE_NAME::text) OPERATOR(pg_catalog.||)
                    CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN '.created'
                         WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN '.updated'
                         ELSE '.deleted' END,
                CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE'
                     THEN pg_catalog.jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                                        'record', pg_catalog.to_jsonb(NEW), 'old_record', pg_catalog.to_jsonb(OLD))
                     ELSE pg_catalog.jsonb_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
                                                        'record', pg_catalog.to_jsonb(coalesce(NEW, OLD))) END);
    ELSE
        INSERT INTO outbox.log (event_type, payload, tenant_id)
        SELECT e.event_type, e.payload, e.tenant_id
          FROM outbox._trigger_event(TG_WHEN, TG_LEVEL, TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV,
                                     pg_catalog.to_jsonb(NEW), pg_catalog.to_jsonb(OLD)) e;
    END IF;
    RETURN NULL;
END
$$;

-- Turns events into deliveries: one per endpoint that is enabled, not deleted, of the
-- event's tenant and subscribed to its type (outbox._filter_matches) at this moment; or,
-- for an event enqueued for one endpoint, one for that endpoint unless it was deleted.
-- Deliveries to ordered endpoints are numbered in the order of p_events. Returns how many
-- deliveries it made.
CREATE OR REPLACE FUNCTION outbox._fan_out(p_events outbox.log[])
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
CREATE OR REPLACE FUNCTION outbox._read_log(p_max integer DEFAULT 5000, p_max_bytes bigint DEFAULT 64 * 1024 * 1024)
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
CREATE OR REPLACE FUNCTION outbox._log_lock()
RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ('outbox.log'::regclass::oid::bigint % 2147483647)::integer;

-- Whether a batch is read in part: the worker then comes back at once instead of sleeping.
CREATE OR REPLACE FUNCTION outbox._log_behind()
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
CREATE OR REPLACE FUNCTION outbox._rotate_log()
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
CREATE OR REPLACE FUNCTION outbox._log_part_read(p integer, done pg_snapshot)
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

CREATE OR REPLACE FUNCTION outbox.claim(
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

-- Producers enqueue events (directly or through outbox.trigger) and nothing else.
CREATE OR REPLACE FUNCTION outbox.grant_producer(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, jsonb, uuid, text, text, timestamptz), outbox.trigger() TO %s', role);
    -- What outbox.trigger, running as the writing user, needs for its one insert: the
    -- columns of an event (never txid, the caller's id or the routing columns, which only
    -- outbox.enqueue sets), and the functions behind the others' defaults and checks.
    EXECUTE format('GRANT INSERT (event_type, payload, tenant_id) ON outbox.log TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._stamp(), outbox._seq(), outbox._check_log(text, text, integer), outbox._log_part(xid8) TO %s', role);
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
        outbox.endpoint_health, outbox.recent_failures, outbox.metrics, outbox.triggers, outbox.log_status TO %s', role);
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
        outbox._requeue_orphaned(), outbox._lock_for_ack(uuid[]), outbox._read_log(integer, bigint), outbox._rotate_log()
        TO %s', role);
END
$$;

-- How far reading the log has come: events committed but not yet read (so not yet
-- deliveries), how long the oldest of them has waited, when the log was last read, and
-- whether a batch is being read in parts. Unread events that stay there mean no worker
-- (or outbox.claim) is reading: see docs/troubleshooting.md.
CREATE OR REPLACE VIEW outbox.log_status AS
SELECT u.unread, u.oldest_unread_age, c.created_at AS last_read_at, c.batch IS NOT NULL AS reading
  FROM (SELECT * FROM outbox.log_cursor ORDER BY id DESC LIMIT 1) c
 CROSS JOIN LATERAL (
       SELECT count(*) AS unread, now() - min(l.created_at) AS oldest_unread_age
         FROM outbox.log l
        WHERE (l.txid >= pg_snapshot_xmax(c.done) OR l.txid = ANY (ARRAY(SELECT pg_snapshot_xip(c.done))))
          AND NOT pg_visible_in_snapshot(l.txid, c.done)
          AND (c.pos_txid IS NULL OR (l.txid, l.seq) > (c.pos_txid, c.pos_seq))) u;

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
-- Events committed but not read from the log yet, and the oldest one's age: a reader that
-- stopped shows here before anything shows as pending.
SELECT 'outbox_log_unread', NULL, NULL, s.unread FROM outbox.log_status s
UNION ALL
SELECT 'outbox_log_oldest_unread_seconds', NULL, NULL, coalesce(extract(epoch FROM s.oldest_unread_age), 0)
  FROM outbox.log_status s
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


-- Producers get the new enqueue back, and the insert into the log outbox.trigger makes as
-- the writing user; roles the worker connects as get the log's rotation.
DO $upgrade$
DECLARE
    g text;
BEGIN
    FOR g IN SELECT r FROM unnest(string_to_array(current_setting('webhook_outbox_upgrade.producers'), ',')) r
              WHERE r <> '' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, jsonb, uuid, text, text, timestamptz) TO %s', g);
        EXECUTE format('GRANT INSERT (event_type, payload, tenant_id) ON outbox.log TO %s', g);
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._stamp(), outbox._seq(), outbox._check_log(text, text, integer), outbox._log_part(xid8) TO %s', g);
    END LOOP;
    FOR g IN
        SELECT DISTINCT a.grantee::regrole::text FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'outbox._next_due()'::regprocedure AND a.grantee NOT IN (0, p.proowner)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox._read_log(integer, bigint), outbox._rotate_log() TO %s', g);
    END LOOP;
    -- Operators see how far reading the log has come.
    FOR g IN
        SELECT DISTINCT a.grantee::regrole::text FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'outbox.endpoint_health'::regclass AND a.privilege_type = 'SELECT'
           AND a.grantee NOT IN (0, c.relowner)
    LOOP
        EXECUTE format('GRANT SELECT ON outbox.log_status TO %s', g);
    END LOOP;
END
$upgrade$;

REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
