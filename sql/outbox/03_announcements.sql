-------------------------------------------------------------------------------------------
-- Live feed and operator events (LISTEN / NOTIFY)
-------------------------------------------------------------------------------------------

-- Is the live feed on (outbox.live_feed)? Off unless switched on.
CREATE FUNCTION outbox._feed_on()
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(current_setting('outbox.live_feed', true), 'off') = 'on'
$$;

-- Is there room in the NOTIFY queue? A listener that never reads fills it, and a full queue
-- would fail the commit of whoever notifies: past half full, announcements are skipped (the
-- history and the views keep everything).
CREATE FUNCTION outbox._notify_room()
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

-- Publishes one status change of a delivery on the live feed: channel outbox_feed, the
-- endpoint's channel outbox_feed_<endpoint id>, and the tenant's outbox_feed_tenant_<tenant>
-- (for tenant ids of at most 44 bytes, the rest of a channel name's room). Any role that
-- can connect may LISTEN, so the payload carries ids and the status only; whoever may know
-- more reads it from outbox.deliveries.
CREATE FUNCTION outbox._feed(p_id uuid, p_endpoint_id uuid, p_tenant_id text, p_event_type text,
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
CREATE FUNCTION outbox._operator_event(kind text, details jsonb, about_endpoint uuid)
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
