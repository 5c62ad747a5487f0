-------------------------------------------------------------------------------------------
-- Enqueue
-------------------------------------------------------------------------------------------

-- Creates one delivery per enabled endpoint whose filter matches event_type (same tenant), or
-- exactly one for endpoint_id when it is given (it must be the tenant's own; its filter and
-- enabled flag are not consulted: a disabled endpoint's delivery waits until it is
-- enabled). Runs in the caller's transaction. With event_id (unique per tenant), enqueueing
-- the same event again returns the existing deliveries; the same id with another event type
-- or payload is refused.
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
