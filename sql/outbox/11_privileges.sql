-- Emitted after everything else, Rust functions included: the REVOKE below covers them.

-------------------------------------------------------------------------------------------
-- pg_dump
--
-- Endpoints (with their secrets), events, deliveries in every state, the attempt history
-- and the hourly statistics are user data: pg_dump saves them and a restore brings them
-- back, with the sequences behind them. outbox.endpoint_state is not: it is what senders
-- learned (circuit, failure streak, requests in flight), and a restore starts it afresh
-- (every restored endpoint gets a new state row from its trigger).
-------------------------------------------------------------------------------------------

SELECT pg_catalog.pg_extension_config_dump('outbox.endpoint', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.delivery', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.delivery_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.attempt', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.attempt_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.stats_hourly', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.stats_retired', '');
-- Callers' ids, so that a restored database still knows them (both tables are looked in;
-- which takes new ones is not dumped: a restored database starts a new turn).
SELECT pg_catalog.pg_extension_config_dump('outbox.event_key_0', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_key_1', '');
-- The history's partitions hold its rows (which partition is written next is not dumped:
-- a restored database starts a new turn).
SELECT pg_catalog.pg_extension_config_dump('outbox.history_0', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.history_1', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.history_2', '');

-------------------------------------------------------------------------------------------
-- Privileges
--
-- Nothing is granted to PUBLIC. The API functions run as the extension's owner (SECURITY
-- DEFINER, with a pinned search_path), so a role needs only EXECUTE on the functions of its
-- job and never any privilege on the tables: in particular no role but the owner can read
-- outbox.endpoint.secret. The grant_* functions below hand out the three usual jobs.
-------------------------------------------------------------------------------------------

REVOKE ALL ON SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;

-- Producers enqueue events (directly or through outbox.trigger) and nothing else.
CREATE FUNCTION outbox.grant_producer(role regrole)
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
CREATE FUNCTION outbox.grant_operator(role regrole)
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
        outbox.cancel(uuid, uuid), outbox._policy(), outbox._workers_running(), outbox._bucket_bounds() TO %s', role);
END
$$;

-- Administrators manage endpoints (and their secrets), and may act as a sender with
-- outbox.claim / outbox.ack; they get everything an operator and a producer get.
CREATE FUNCTION outbox.grant_admin(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM outbox.grant_producer(role);
    PERFORM outbox.grant_operator(role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION
        outbox.create_endpoint(text, text[], text, jsonb, interval, text, text, boolean, boolean, integer, integer, text),
        outbox.update_endpoint(uuid, text, text[], text, jsonb, interval, text, boolean, integer, integer, text),
        outbox.delete_endpoint(uuid), outbox.endpoint_secret(uuid), outbox.generate_secret(),
        outbox.rotate_secret(uuid, text, interval),
        outbox.purge(interval, interval),
        outbox.sign(text, text, bigint, text), outbox.retry_delay(integer),
        outbox.claim(integer, text, interval, uuid, text),
        outbox.ack(uuid, integer, outbox.attempt_outcome, integer, text, double precision, timestamptz, text, text),
        outbox.ack_batch(uuid[], integer[], outbox.attempt_outcome[], integer[], text[], double precision[], timestamptz[], text[], text)
        TO %s', role);
END
$$;

-- The role the background worker connects as (outbox.worker_role): exactly what a sender
-- needs, through the same SECURITY DEFINER functions, and no table privilege at all.
CREATE FUNCTION outbox.grant_worker(role regrole)
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
        outbox._requeue_orphaned(), outbox._lock_for_ack(uuid[]), outbox._read_log(integer, bigint), outbox._rotate_log(),
        outbox._rotate_event_keys(interval),
        outbox._claim(integer, text, interval, uuid, text), outbox._log_lock(), outbox._become_reader(),
        outbox._read_batch(integer, integer, bigint, bigint, pg_snapshot, boolean, bigint, bigint), outbox._recount_endpoints(),
        outbox._close_batch(bigint, pg_snapshot, integer, bigint, uuid[], bigint[], bigint[], uuid[], integer[],
                            outbox.attempt_outcome[], integer[], text[], double precision[], timestamptz[], text[],
                            text, interval)
        TO %s', role);
END
$$;

REVOKE ALL ON FUNCTION outbox.grant_producer(regrole), outbox.grant_operator(regrole), outbox.grant_admin(regrole),
                       outbox.grant_worker(regrole) FROM PUBLIC;

COMMENT ON FUNCTION outbox.grant_producer(regrole) IS 'Lets a role enqueue events (outbox.enqueue, outbox.trigger) and nothing else.';
COMMENT ON FUNCTION outbox.grant_operator(regrole) IS 'Lets a role watch and steer delivery: views, statistics, enabling and disabling endpoints, repair. No secrets, endpoint creation, enqueue or claim.';
COMMENT ON FUNCTION outbox.grant_admin(regrole) IS 'Lets a role manage endpoints and their secrets and act as a sender (claim, ack), purge, plus everything operators and producers may do.';
COMMENT ON FUNCTION outbox.grant_worker(regrole) IS 'Grants the role the background worker connects as (outbox.worker_role) exactly what a sender needs, and no table privilege.';

-------------------------------------------------------------------------------------------
-- A word at CREATE EXTENSION time if nothing will send what gets queued here
-------------------------------------------------------------------------------------------

DO $$
BEGIN
    IF current_setting('shared_preload_libraries') !~ '(^|[\s,"])webhook_outbox([\s,"]|$)' THEN
        RAISE NOTICE 'webhook_outbox: deliveries will queue up but not be sent: the delivery worker needs shared_preload_libraries = ''webhook_outbox'' and a server restart';
    ELSIF current_database() <> ALL (SELECT btrim(d) FROM unnest(string_to_array(
              coalesce(current_setting('outbox.database', true), 'postgres'), ',')) d) THEN
        RAISE NOTICE 'webhook_outbox: the delivery workers serve outbox.database = ''%'', which does not list "%"; add it (ALTER SYSTEM SET outbox.database = ''%, %'') and reload to deliver from here',
            current_setting('outbox.database', true), current_database(),
            current_setting('outbox.database', true), current_database();
    END IF;
END
$$;
