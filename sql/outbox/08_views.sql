-------------------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------------------

-- Header values are often credentials: only roles that may read the endpoints' secrets
-- (administrators) see them; others see which headers are set, with masked values.
CREATE VIEW outbox.endpoints AS
SELECT e.id, e.url, e.event_types, e.enabled, e.disabled_reason, e.timeout,
       CASE WHEN pg_catalog.has_function_privilege('outbox.endpoint_secret(uuid)', 'EXECUTE') THEN e.headers
            ELSE (SELECT coalesce(jsonb_object_agg(h.key, '********'), '{}') FROM jsonb_each(e.headers) h)
       END AS headers,
       e.tenant_id, e.description, e.created_at, e.updated_at,
       e.ordered, e.rate_limit, e.max_in_flight, e.uid
  FROM outbox.endpoint e
 WHERE e.deleted_at IS NULL;

-- Every delivery: those with state (outbox.delivery) and those delivered at their first
-- attempt straight from the log (outbox.history).
CREATE VIEW outbox.deliveries AS
SELECT d.id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url, d.tenant_id,
       d.status,
       (d.status = 'pending' AND d.attempts > d.retry_base) AS retrying,
       d.attempts,
       CASE WHEN d.status = 'pending' THEN d.due_at END AS next_attempt_at,
       CASE WHEN d.status = 'in_flight' THEN d.due_at END AS lease_expires_at,
       d.lease_owner, d.created_at, d.last_attempt_at, d.finished_at,
       d.last_status_code, d.last_error, ev.payload
  FROM outbox.delivery d
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
UNION ALL
SELECT h.delivery_id, h.event_id, h.event_type, h.endpoint_id, e.url, h.tenant_id,
       'delivered'::outbox.delivery_status, false, 1, NULL::timestamptz, NULL::timestamptz,
       NULL::text, h.created_at, h.finished_at, h.finished_at,
       h.status_code, NULL::text, h.payload
  FROM outbox.history h
  JOIN outbox.endpoint e ON e.id = h.endpoint_id;

CREATE VIEW outbox.attempts AS
SELECT a.id, a.delivery_id, d.event_id, d.endpoint_id, a.attempt, a.outcome, a.status_code,
       a.error, a.duration_ms, a.response_body, a.worker, a.created_at
  FROM outbox.attempt a
  JOIN outbox.delivery d ON d.id = a.delivery_id
UNION ALL
SELECT h.attempt_id, h.delivery_id, h.event_id, h.endpoint_id, 1, 'delivered'::outbox.attempt_outcome,
       h.status_code, NULL::text, h.duration_ms, h.response_body, h.worker, h.finished_at
  FROM outbox.history h;

CREATE VIEW outbox.dead_letters AS
SELECT d.id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url, d.tenant_id,
       d.attempts, d.last_status_code, d.last_error, d.created_at, d.finished_at AS died_at,
       ev.payload
  FROM outbox.delivery d
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE d.status = 'dead';

-------------------------------------------------------------------------------------------
-- Operations views
-------------------------------------------------------------------------------------------

-- One row per live endpoint: its backlog, what the last attempts said, its circuit breaker
-- (state, when it opened, when the next probe goes, the current cool-down), and what holds
-- its queue back, if anything, until when (NULL: until an operator or an outcome acts):
-- disabled, circuit open (until its probe), a probe in flight, an ordered endpoint's head in
-- flight or not due yet (a retry, or a deliver_at ahead: everything behind it waits), or
-- max_in_flight reached.
CREATE VIEW outbox.endpoint_health AS
SELECT e.id AS endpoint_id, e.url, e.enabled, e.disabled_reason, e.tenant_id,
       coalesce(q.pending, 0) AS pending, coalesce(q.in_flight, 0) AS in_flight,
       coalesce(q.retrying, 0) AS retrying, q.oldest_pending_age,
       coalesce(st.consecutive_failures, 0) AS consecutive_failures,
       st.last_success_at, st.last_failure_at, st.last_error,
       coalesce(st.circuit, 'closed') AS circuit, st.circuit_opened_at, st.next_probe_at,
       st.cooldown AS circuit_cooldown, st.failing_since,
       held.reason AS held_reason, held.until AS held_until
  FROM outbox.endpoint e
  LEFT JOIN outbox.endpoint_state st ON st.endpoint_id = e.id
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.status = 'pending') AS pending,
               count(*) FILTER (WHERE d.status = 'in_flight') AS in_flight,
               count(*) FILTER (WHERE d.status = 'pending' AND d.attempts > d.retry_base) AS retrying,
               now() - min(d.created_at) FILTER (WHERE d.status = 'pending') AS oldest_pending_age
          FROM (SELECT d.status, d.attempts, d.retry_base, d.created_at FROM outbox.delivery d
                 WHERE d.endpoint_id = e.id AND d.status = 'pending'
                UNION ALL
                SELECT d.status, d.attempts, d.retry_base, d.created_at FROM outbox.delivery d
                 WHERE d.endpoint_id = e.id AND d.status = 'in_flight') d
       ) q ON true
  LEFT JOIN LATERAL (
        SELECT h.status, h.due_at FROM outbox.delivery h
         WHERE e.ordered AND h.endpoint_id = e.id AND h.seq IS NOT NULL AND h.status IN ('pending', 'in_flight')
         ORDER BY h.seq LIMIT 1
       ) head ON true
 CROSS JOIN LATERAL (
        SELECT CASE WHEN NOT e.enabled THEN 'disabled'
                    WHEN st.circuit = 'open' THEN 'circuit open'
                    WHEN st.circuit = 'half_open' THEN 'circuit half-open: a probe is in flight'
                    WHEN head.status = 'in_flight' THEN 'ordered: its head is in flight'
                    WHEN head.due_at > now() THEN 'ordered: its head is not due yet'
                    WHEN q.pending > 0 AND q.in_flight >= coalesce(e.max_in_flight,
                             nullif((outbox._policy()).endpoint_max_in_flight, 0)) THEN 'max_in_flight reached'
               END AS reason,
               CASE WHEN NOT e.enabled THEN NULL
                    WHEN st.circuit = 'open' THEN st.next_probe_at
                    WHEN st.circuit = 'half_open' OR head.status = 'in_flight' THEN NULL
                    WHEN head.due_at > now() THEN head.due_at
               END AS until
       ) held
 WHERE e.deleted_at IS NULL;

-- Failed attempts, newest first (attempt_failed_idx serves ORDER BY ... LIMIT).
CREATE VIEW outbox.recent_failures AS
SELECT a.created_at, a.delivery_id, d.event_id, ev.event_type, d.endpoint_id, e.url AS endpoint_url,
       a.attempt, a.outcome, a.status_code, a.error, a.response_body
  FROM outbox.attempt a
  JOIN outbox.delivery d ON d.id = a.delivery_id
  JOIN outbox.event ev ON ev.id = d.event_id AND ev.tenant_key = d.tenant_key
  JOIN outbox.endpoint e ON e.id = d.endpoint_id
 WHERE a.outcome IN ('retry', 'dead')
 ORDER BY a.created_at DESC;

-- How far reading the log has come: events committed but not yet read (so not yet
-- deliveries), how long the oldest of them has waited, when the log was last read, and
-- whether a batch is being read in parts. Unread events that stay there mean no worker
-- (or outbox.claim) is reading: see docs/troubleshooting.md.
CREATE VIEW outbox.log_status AS
SELECT u.unread, u.oldest_unread_age, c.created_at AS last_read_at, c.batch IS NOT NULL AS reading
  FROM (SELECT * FROM outbox.log_cursor ORDER BY id DESC LIMIT 1) c
 CROSS JOIN LATERAL (
       SELECT count(*) AS unread, now() - min(l.created_at) AS oldest_unread_age
         FROM outbox.log l
        WHERE (l.txid >= pg_snapshot_xmax(c.done) OR l.txid = ANY (ARRAY(SELECT pg_snapshot_xip(c.done))))
          AND NOT pg_visible_in_snapshot(l.txid, c.done)
          AND (c.pos_txid IS NULL OR (l.txid, l.seq) > (c.pos_txid, c.pos_seq))) u;

-- Worker processes connected to this database now. SECURITY DEFINER: pg_stat_activity
-- hides other roles' backend types from a monitoring role without pg_read_all_stats.
CREATE FUNCTION outbox._workers_running()
RETURNS integer
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*)::integer FROM pg_stat_activity
     WHERE backend_type = 'webhook_outbox worker'
       AND datid = (SELECT oid FROM pg_database WHERE datname = current_database())
$$;

-- Counters and gauges in the shape Prometheus exporters want: one row per metric and label
-- set (see contrib/). The *_total counters and the latency histogram add what retention
-- moved out of the hourly rollup (outbox.stats_retired) to what it still holds, so they
-- never go down: a decrease would read as a counter reset. The histogram is Prometheus's:
-- cumulative buckets by `le` (seconds, enqueue to delivered), then _sum and _count.
CREATE VIEW outbox.metrics AS
WITH totals AS (
    SELECT t.endpoint_id, t.outcome, t.latency_bucket,
           sum(t.deliveries) AS deliveries, sum(t.attempts) AS attempts, sum(t.latency_ms_sum) AS latency_ms_sum
      FROM (SELECT r.endpoint_id, r.outcome, r.latency_bucket, r.deliveries, r.attempts, r.latency_ms_sum
              FROM outbox.stats_retired r
            UNION ALL
            SELECT h.endpoint_id, h.outcome, h.latency_bucket, h.deliveries, h.attempts, h.latency_ms_sum
              FROM outbox.stats_hourly h) t
     GROUP BY 1, 2, 3
), delivered AS (
    SELECT * FROM totals WHERE outcome = 'delivered'
), workers AS (
    -- One look at pg_stat_activity for both worker gauges.
    SELECT outbox._workers_running() AS n
)
SELECT 'outbox_deliveries'::text AS metric, 'pending'::text AS status, NULL::text AS endpoint_id,
       count(*)::double precision AS value, NULL::text AS le
  FROM outbox.delivery WHERE status = 'pending'
UNION ALL
SELECT 'outbox_deliveries', 'in_flight', NULL, count(*), NULL FROM outbox.delivery WHERE status = 'in_flight'
UNION ALL
SELECT 'outbox_deliveries', 'dead', NULL, count(*), NULL FROM outbox.delivery WHERE status = 'dead'
UNION ALL
SELECT 'outbox_oldest_pending_seconds', NULL, NULL,
       coalesce(extract(epoch FROM now() - min(created_at)), 0), NULL
  FROM outbox.delivery WHERE status = 'pending'
UNION ALL
-- How long the most overdue delivery has waited past its due time, among endpoints that
-- may be sent to (enabled, circuit closed: those held otherwise have series of their own).
-- Deliveries scheduled for later and retries waiting for their turn do not count, so it
-- grows only when due work is not going out: the worker behind or stopped, or an endpoint
-- held by its rate limit, max_in_flight or ordering. One index probe per endpoint.
SELECT 'outbox_oldest_due_seconds', NULL, NULL,
       coalesce(extract(epoch FROM now() - min(f.due_at)), 0), NULL
  FROM outbox.endpoint e
  JOIN outbox.endpoint_state st ON st.endpoint_id = e.id
 CROSS JOIN LATERAL (
       SELECT d.due_at FROM outbox.delivery d
        WHERE d.endpoint_id = e.id AND d.status = 'pending'
        ORDER BY d.due_at LIMIT 1) f
 WHERE e.enabled AND e.deleted_at IS NULL AND st.circuit = 'closed' AND f.due_at <= now()
UNION ALL
-- Events committed but not read from the log yet, and the oldest one's age: a reader that
-- stopped shows here before anything shows as pending.
SELECT 'outbox_log_unread', NULL, NULL, s.unread, NULL FROM outbox.log_status s
UNION ALL
SELECT 'outbox_log_oldest_unread_seconds', NULL, NULL, coalesce(extract(epoch FROM s.oldest_unread_age), 0), NULL
  FROM outbox.log_status s
UNION ALL
SELECT 'outbox_worker_up', NULL, NULL, CASE WHEN w.n > 0 THEN 1 ELSE 0 END, NULL FROM workers w
UNION ALL
SELECT 'outbox_worker_processes', NULL, NULL, w.n, NULL FROM workers w
UNION ALL
SELECT 'outbox_finished_total', t.outcome::text, t.endpoint_id::text, sum(t.deliveries), NULL
  FROM totals t GROUP BY t.outcome, t.endpoint_id
UNION ALL
SELECT 'outbox_attempts_total', NULL, t.endpoint_id::text, sum(t.attempts), NULL
  FROM totals t GROUP BY t.endpoint_id
UNION ALL
-- Bucket i of the rollup holds latencies below bound i + 1 (the last is open), so the
-- cumulative count at le = bound k is the sum of buckets 0 .. k - 1.
SELECT 'outbox_delivery_latency_seconds_bucket', NULL, d.endpoint_id::text,
       coalesce(sum(d.deliveries) FILTER (WHERE d.latency_bucket < b.k), 0), b.le
  FROM delivered d
 CROSS JOIN (SELECT k, (bound / 1000)::text AS le
               FROM unnest(outbox._bucket_bounds()) WITH ORDINALITY AS u(bound, k)
             UNION ALL
             SELECT cardinality(outbox._bucket_bounds()) + 1, '+Inf') b
 GROUP BY d.endpoint_id, b.k, b.le
UNION ALL
SELECT 'outbox_delivery_latency_seconds_sum', NULL, d.endpoint_id::text, sum(d.latency_ms_sum) / 1000, NULL
  FROM delivered d GROUP BY d.endpoint_id
UNION ALL
SELECT 'outbox_delivery_latency_seconds_count', NULL, d.endpoint_id::text, sum(d.deliveries), NULL
  FROM delivered d GROUP BY d.endpoint_id
UNION ALL
SELECT 'outbox_endpoint_consecutive_failures', NULL, st.endpoint_id::text, st.consecutive_failures, NULL
  FROM outbox.endpoint_state st JOIN outbox.endpoint e ON e.id = st.endpoint_id WHERE e.deleted_at IS NULL
UNION ALL
SELECT 'outbox_endpoint_enabled', NULL, e.id::text, CASE WHEN e.enabled THEN 1 ELSE 0 END, NULL
  FROM outbox.endpoint e WHERE e.deleted_at IS NULL
UNION ALL
SELECT 'outbox_endpoint_circuit_open', st.circuit::text, st.endpoint_id::text,
       CASE WHEN st.circuit = 'closed' THEN 0 ELSE 1 END, NULL
  FROM outbox.endpoint_state st JOIN outbox.endpoint e ON e.id = st.endpoint_id WHERE e.deleted_at IS NULL;

-- The tables that carry an outbox.trigger, and how: which changes make events, the event
-- type prefix, the arguments after it (tenant column, exclude=…, shape=…), whether it is
-- enabled, and its full definition.
CREATE VIEW outbox.triggers AS
SELECT t.tgrelid::regclass AS table_name, t.tgname::text AS trigger_name,
       t.tgenabled <> 'D' AS enabled,
       array_remove(ARRAY[CASE WHEN t.tgtype & 4 <> 0 THEN 'INSERT' END,
                          CASE WHEN t.tgtype & 16 <> 0 THEN 'UPDATE' END,
                          CASE WHEN t.tgtype & 8 <> 0 THEN 'DELETE' END], NULL) AS events,
       coalesce(a.args[1], c.relname::text) AS event_prefix,
       coalesce(a.args[2:], '{}') AS arguments,
       pg_get_triggerdef(t.oid) AS definition
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
 CROSS JOIN LATERAL (
       SELECT (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1:t.tgnargs] AS args) a
 WHERE t.tgfoid = 'outbox.trigger()'::regprocedure AND NOT t.tgisinternal;
