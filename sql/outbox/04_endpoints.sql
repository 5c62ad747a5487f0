-------------------------------------------------------------------------------------------
-- Endpoints
-------------------------------------------------------------------------------------------

-- Creates an endpoint and returns its id. With uid (the caller's key for it, unique per
-- tenant among live endpoints) it can run again, as a deploy script does: the endpoint the
-- key made before is returned, if the arguments describe it (its secret is compared only
-- when one is given, enabled not at all: operators and auto-disable change it); other
-- arguments are refused, for outbox.update_endpoint to apply.
CREATE FUNCTION outbox.create_endpoint(
    url         text,
    event_types text[]   DEFAULT NULL,
    secret      text     DEFAULT NULL,
    headers     jsonb    DEFAULT '{}',
    timeout     interval DEFAULT NULL,
    tenant_id   text     DEFAULT NULL,
    description text     DEFAULT NULL,
    enabled     boolean  DEFAULT true,
    ordered     boolean  DEFAULT false,
    rate_limit  integer  DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    uid         text     DEFAULT NULL
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id  uuid;
    v_known outbox.endpoint;
    -- Checked (and normalised) once: what is stored, and what a known endpoint must match.
    v_url     text     := outbox._check_url(create_endpoint.url);
    v_types   text[]   := outbox._check_event_types(create_endpoint.event_types);
    v_headers jsonb    := outbox._check_headers(coalesce(create_endpoint.headers, '{}'));
    v_timeout interval := outbox._check_timeout(create_endpoint.timeout);
    v_tenant  text     := outbox._check_tenant(create_endpoint.tenant_id);
    v_rate    integer  := outbox._check_limit('rate_limit', create_endpoint.rate_limit, 100000);
    v_max     integer  := outbox._check_limit('max_in_flight', create_endpoint.max_in_flight, 10000);
BEGIN
    IF create_endpoint.uid IS NOT NULL AND length(create_endpoint.uid) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'an endpoint uid is 1 to 256 characters, not %', length(create_endpoint.uid)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A concurrent create under the same key makes this wait for it, then do nothing; an
    -- endpoint deleted in between frees the key, and the insert is tried again.
    FOR i IN 1 .. 3 LOOP
        INSERT INTO outbox.endpoint (url, secret, event_types, headers, timeout, tenant_id, description, enabled,
                                     ordered, rate_limit, max_in_flight, uid)
        VALUES (
            v_url,
            CASE WHEN create_endpoint.secret IS NULL THEN outbox.generate_secret()
                 ELSE outbox._check_secret(create_endpoint.secret) END,
            v_types, v_headers, v_timeout, v_tenant,
            create_endpoint.description,
            coalesce(create_endpoint.enabled, true),
            coalesce(create_endpoint.ordered, false),
            v_rate, v_max, create_endpoint.uid
        )
        ON CONFLICT ((coalesce(tenant_id, '')), uid) WHERE uid IS NOT NULL AND deleted_at IS NULL DO NOTHING
        RETURNING id INTO new_id;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        SELECT * INTO v_known FROM outbox.endpoint e
         WHERE coalesce(e.tenant_id, '') = coalesce(v_tenant, '') AND e.uid = create_endpoint.uid
           AND e.deleted_at IS NULL;
        EXIT WHEN FOUND;
    END LOOP;
    IF v_known.id IS NULL THEN
        RAISE EXCEPTION 'endpoint uid % is being created and deleted concurrently', quote_literal(create_endpoint.uid)
            USING ERRCODE = 'serialization_failure', HINT = 'Try again.';
    END IF;
    IF v_known.url IS DISTINCT FROM v_url
       OR v_known.event_types IS DISTINCT FROM v_types
       OR (create_endpoint.secret IS NOT NULL AND v_known.secret IS DISTINCT FROM create_endpoint.secret)
       OR v_known.headers IS DISTINCT FROM v_headers
       OR v_known.timeout IS DISTINCT FROM v_timeout
       OR v_known.description IS DISTINCT FROM create_endpoint.description
       OR v_known.ordered IS DISTINCT FROM coalesce(create_endpoint.ordered, false)
       OR v_known.rate_limit IS DISTINCT FROM v_rate
       OR v_known.max_in_flight IS DISTINCT FROM v_max THEN
        RAISE EXCEPTION 'endpoint uid % exists with other settings', quote_literal(create_endpoint.uid)
            USING ERRCODE = 'unique_violation',
                  DETAIL = format('Its id is %s.', v_known.id),
                  HINT = 'Change it with outbox.update_endpoint(endpoint_id, ...), or create another under a new uid.';
    END IF;
    RETURN v_known.id;
END
$$;

-- NULL arguments leave a field unchanged. event_types => '{*}' makes the endpoint receive
-- every event again; timeout => '0' returns it to the outbox.request_timeout default;
-- rate_limit => 0 removes the limit; max_in_flight => 0 returns it to the
-- outbox.endpoint_max_in_flight default; uid => '' removes the caller's key (a deploy script
-- can give an endpoint made without one a key). Making an endpoint ordered puts what it has
-- queued in enqueue order first.
CREATE FUNCTION outbox.update_endpoint(
    endpoint_id uuid,
    url         text     DEFAULT NULL,
    event_types text[]   DEFAULT NULL,
    secret      text     DEFAULT NULL,
    headers     jsonb    DEFAULT NULL,
    timeout     interval DEFAULT NULL,
    description text     DEFAULT NULL,
    ordered     boolean  DEFAULT NULL,
    rate_limit  integer  DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    uid         text     DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM outbox._endpoint_or_raise(update_endpoint.endpoint_id);
    IF length(update_endpoint.uid) > 256 THEN
        RAISE EXCEPTION 'an endpoint uid is 1 to 256 characters, not %', length(update_endpoint.uid)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass uid => '''' to remove the endpoint''s uid.';
    END IF;
    -- Another live endpoint of the tenant with that uid: refused, as create_endpoint
    -- refuses a clash.
    IF update_endpoint.uid <> '' AND EXISTS (
           SELECT 1 FROM outbox.endpoint o, outbox.endpoint e
            WHERE e.id = update_endpoint.endpoint_id AND o.id <> e.id AND o.deleted_at IS NULL
              AND coalesce(o.tenant_id, '') = coalesce(e.tenant_id, '') AND o.uid = update_endpoint.uid) THEN
        RAISE EXCEPTION 'endpoint uid % belongs to another endpoint', quote_literal(update_endpoint.uid)
            USING ERRCODE = 'unique_violation',
                  HINT = 'A uid is unique among a tenant''s live endpoints: delete the other endpoint first, or choose another uid.';
    END IF;
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
        ordered     = coalesce(update_endpoint.ordered, e.ordered),
        rate_limit  = CASE WHEN update_endpoint.rate_limit IS NULL THEN e.rate_limit
                           WHEN update_endpoint.rate_limit = 0 THEN NULL
                           ELSE outbox._check_limit('rate_limit', update_endpoint.rate_limit, 100000) END,
        max_in_flight = CASE WHEN update_endpoint.max_in_flight IS NULL THEN e.max_in_flight
                             WHEN update_endpoint.max_in_flight = 0 THEN NULL
                             ELSE outbox._check_limit('max_in_flight', update_endpoint.max_in_flight, 10000) END,
        uid         = CASE WHEN update_endpoint.uid IS NULL THEN e.uid
                           WHEN update_endpoint.uid = '' THEN NULL
                           ELSE update_endpoint.uid END,
        updated_at  = now()
    WHERE e.id = update_endpoint.endpoint_id;
    IF update_endpoint.ordered THEN
        -- Its queue needs an order: wait for transactions enqueueing right now (they may have
        -- seen the endpoint unordered), then number what is queued, oldest first (rows of one
        -- transaction share created_at; their physical order is their insert order).
        LOCK TABLE outbox.delivery IN SHARE ROW EXCLUSIVE MODE;
        UPDATE outbox.delivery d SET seq = o.n
          FROM (SELECT q.id, nextval('outbox.delivery_seq') AS n
                  FROM (SELECT q.id FROM outbox.delivery q
                         WHERE q.endpoint_id = update_endpoint.endpoint_id AND q.seq IS NULL
                           AND q.status IN ('pending', 'in_flight')
                         ORDER BY q.created_at, q.ctid) q) o
         WHERE d.id = o.id;
    END IF;
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
    -- A fresh start: the circuit closes and the failure streak (which auto-disable counts)
    -- begins again.
    UPDATE outbox.endpoint_state s
       SET consecutive_failures = 0, failing_since = NULL, circuit = 'closed',
           circuit_changed_at = CASE WHEN s.circuit <> 'closed' THEN now() ELSE s.circuit_changed_at END,
           circuit_opened_at = NULL, next_probe_at = NULL, cooldown = NULL, updated_at = now()
     WHERE s.endpoint_id = enable_endpoint.endpoint_id;
    -- Its waiting deliveries are due now: wake the worker when this commits.
    PERFORM outbox._wake_at_commit();
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
    PERFORM outbox._operator_event('outbox.endpoint.disabled',
        jsonb_build_object('endpoint_id', disable_endpoint.endpoint_id,
                           'reason', coalesce(reason, 'disabled by operator')),
        disable_endpoint.endpoint_id);
END
$$;

-- Deletes an endpoint and cancels its deliveries that were not finished; returns how many
-- were cancelled. A delivery in flight at that moment is cancelled too: an ack from its
-- sender is then refused, so the endpoint's history ends consistently. The row stays for
-- the history to point at, but its secrets and headers (credentials, often) go.
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

-- The signing secret (whsec_…) to hand to the receiver. Never shown by any view.
CREATE FUNCTION outbox.endpoint_secret(endpoint_id uuid)
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (outbox._endpoint_or_raise(endpoint_secret.endpoint_id, false)).secret
$$;

-- Replaces an endpoint's secret (with `new_secret`, or a generated one) and returns the new
-- one. For `overlap` the old secret stays valid: every request carries both signatures, so
-- receivers can switch at their own pace; afterwards only the new one is sent.
CREATE FUNCTION outbox.rotate_secret(endpoint_id uuid, new_secret text DEFAULT NULL, overlap interval DEFAULT '24 hours')
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
