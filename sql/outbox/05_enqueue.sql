-------------------------------------------------------------------------------------------
-- Enqueue
-------------------------------------------------------------------------------------------

-- Records a caller's id in table p_part of the two; false when the id is there already
-- (committed, or committed by a transaction this one waited for). A row there this
-- transaction could not see (REPEATABLE READ: committed after its snapshot) fails to
-- serialize.
CREATE FUNCTION outbox._remember_event_key(p_part smallint, p_id text, p_tenant text, p_event_type text, p_hash bytea)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- One statement per table, so that each names only its own: a rotation may be
    -- emptying the other.
    IF p_part = 0 THEN
        INSERT INTO outbox.event_key_0 (id, tenant_key, event_type, payload_hash)
        VALUES (p_id, p_tenant, p_event_type, p_hash) ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO outbox.event_key_1 (id, tenant_key, event_type, payload_hash)
        VALUES (p_id, p_tenant, p_event_type, p_hash) ON CONFLICT DO NOTHING;
    END IF;
    RETURN FOUND;
END
$$;

-- What a caller's id named, from table p_part of the two.
CREATE FUNCTION outbox._event_key(p_part smallint, p_id text, p_tenant text)
RETURNS TABLE (event_type text, payload_hash bytea)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_part = 0 THEN
        RETURN QUERY SELECT k.event_type, k.payload_hash FROM outbox.event_key_0 k
                      WHERE k.id = p_id AND k.tenant_key = p_tenant;
    ELSE
        RETURN QUERY SELECT k.event_type, k.payload_hash FROM outbox.event_key_1 k
                      WHERE k.id = p_id AND k.tenant_key = p_tenant;
    END IF;
END
$$;

-- Appends one event to the log, in the caller's transaction, and returns its id (the
-- `webhook-id`). Nothing else happens here: after the transaction commits, the worker (or
-- outbox.claim) reads the event and fans it out to the endpoints subscribed at that moment
-- (outbox._fan_out), or to endpoint_id alone when it is given (it must be the tenant's own;
-- its filter and enabled flag are not consulted: a disabled endpoint's delivery waits until
-- it is enabled). With event_id (unique per tenant), enqueueing the same event again does
-- nothing and returns the id, for outbox.retention_delivered at least after it was last
-- enqueued; the same id with another event type or payload (its JSON text, as jsonb
-- writes it) is refused.
CREATE FUNCTION outbox.enqueue(
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
    v_endpoint   outbox.endpoint;
    v_id         text;
    v_due        timestamptz;
    v_tenant     text := coalesce(enqueue.tenant_id, '');
    v_rc         boolean;
    v_part       smallint;
    v_gen        bigint;
    v_latest     bigint;
    v_hash       bytea;
    v_known_type text;
    v_known_hash bytea;
    v_new        boolean;
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

    -- A caller's id (outbox.event_key_0/_1). It goes into the table taking new ids, whose
    -- unique key makes a twin being enqueued at the same moment wait for this one (or this
    -- one for it, then find it); and it must not be known from the table before (an id
    -- outlives one turn). Under READ COMMITTED each look sees what committed before it.
    v_rc := current_setting('transaction_isolation') = 'read committed';
    SELECT r.current, r.generation, (SELECT g.last_value FROM outbox.event_key_generation g)
      INTO v_part, v_gen, v_latest
      FROM outbox.event_key_rotation r;
    -- Under REPEATABLE READ or SERIALIZABLE the looks see the transaction's snapshot. An id
    -- committed since then into the table this one goes to fails to serialize there; one
    -- committed into the other means the tables took turns since the snapshot (a rotation
    -- waits for the ids going into the table whose turn it ends), which the generation,
    -- read past any snapshot, tells.
    IF NOT v_rc AND v_gen <> v_latest THEN
        RAISE EXCEPTION 'the table of event ids was rotated after this transaction''s snapshot was taken'
            USING ERRCODE = 'serialization_failure',
                  HINT = 'Retry the transaction.';
    END IF;
    -- As UTF-8 whatever the client's encoding (textsend would convert to that).
    v_hash := sha256(convert_to(enqueue.payload::text, 'UTF8'));
    v_new := outbox._remember_event_key(v_part, enqueue.event_id, v_tenant, enqueue.event_type, v_hash);
    IF v_new AND (SELECT g.last_value FROM outbox.event_key_generation g) <> v_gen THEN
        -- A rotation begun since `current` was read ends that table's turn once this
        -- transaction ends: the id goes into the next one too, where a later snapshot
        -- looks first, and where a twin enqueued meanwhile is met. (Under REPEATABLE READ,
        -- retried instead.)
        IF NOT v_rc THEN
            RAISE EXCEPTION 'the table of event ids was rotated while this transaction enqueued %', quote_literal(enqueue.event_id)
                USING ERRCODE = 'serialization_failure',
                      HINT = 'Retry the transaction.';
        END IF;
        v_part := 1 - v_part;
        v_new := outbox._remember_event_key(v_part, enqueue.event_id, v_tenant, enqueue.event_type, v_hash);
    ELSIF v_new THEN
        -- New in this turn's table: it may be known from the turn before.
        SELECT k.event_type, k.payload_hash INTO v_known_type, v_known_hash
          FROM outbox._event_key((1 - v_part)::smallint, enqueue.event_id, v_tenant) k;
        v_new := NOT FOUND;
    ELSE
        SELECT k.event_type, k.payload_hash INTO v_known_type, v_known_hash
          FROM outbox._event_key(v_part, enqueue.event_id, v_tenant) k;
    END IF;
    IF NOT v_new THEN
        IF v_known_type IS DISTINCT FROM enqueue.event_type OR v_known_hash IS DISTINCT FROM v_hash THEN
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
CREATE FUNCTION outbox._trigger_event(
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
CREATE FUNCTION outbox.trigger()
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
