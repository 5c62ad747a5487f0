-------------------------------------------------------------------------------------------
-- Statistics
-------------------------------------------------------------------------------------------

-- Queue health in one row. Every count reads a partial index over the live part of the
-- table (pending, in flight) or a time-bounded range of the finished index, so the cost does not grow with the
-- history kept.
CREATE FUNCTION outbox.stats(
    OUT pending               bigint,
    OUT due                   bigint,
    OUT in_flight             bigint,
    OUT retrying              bigint,
    OUT dead                  bigint,
    OUT oldest_pending_age    interval,
    OUT delivered_last_hour   bigint,
    OUT dead_last_hour        bigint,
    OUT failed_attempts_last_hour bigint,
    OUT success_rate_last_hour double precision,
    OUT delivered_last_minute bigint
)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH live AS (
        SELECT count(*) FILTER (WHERE status = 'pending')                        AS pending,
               count(*) FILTER (WHERE status = 'pending' AND due_at <= now())    AS due,
               count(*) FILTER (WHERE status = 'in_flight')                      AS in_flight,
               count(*) FILTER (WHERE status = 'pending' AND attempts > retry_base) AS retrying,
               now() - min(created_at) FILTER (WHERE status = 'pending')         AS oldest
          FROM (SELECT status, due_at, attempts, retry_base, created_at FROM outbox.delivery WHERE status = 'pending'
                UNION ALL
                SELECT status, due_at, attempts, retry_base, created_at FROM outbox.delivery WHERE status = 'in_flight') d
    ),
    recent AS (
        SELECT count(*) FILTER (WHERE status = 'delivered') AS delivered,
               count(*) FILTER (WHERE status = 'dead')      AS dead,
               count(*) FILTER (WHERE status = 'delivered' AND finished_at >= now() - interval '1 minute') AS last_minute
          FROM (SELECT status, finished_at FROM outbox.delivery
                 WHERE finished_at >= now() - interval '1 hour'
                UNION ALL
                SELECT 'delivered', finished_at FROM outbox.history
                 WHERE finished_at >= now() - interval '1 hour') d
    ),
    failures AS (
        SELECT count(*) AS failed
          FROM outbox.attempt
         WHERE created_at >= now() - interval '1 hour' AND outcome <> 'delivered'
    )
    SELECT live.pending, live.due, live.in_flight, live.retrying,
           (SELECT count(*) FROM outbox.delivery WHERE status = 'dead'),
           live.oldest,
           recent.delivered, recent.dead, failures.failed,
           CASE WHEN recent.delivered + recent.dead = 0 THEN NULL
                ELSE recent.delivered::double precision / (recent.delivered + recent.dead) END,
           recent.last_minute
      FROM live, recent, failures
$$;

-- Latency percentile (ms) from histogram counts: the bucket where the cumulative count
-- reaches p, interpolated linearly inside it. The open last bucket reports its lower bound.
CREATE FUNCTION outbox._percentile(buckets smallint[], counts bigint[], p double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    WITH b AS (
        SELECT bucket, n, sum(n) OVER (ORDER BY bucket) AS cum, sum(n) OVER () AS total
          FROM unnest(buckets, counts) AS u(bucket, n)
    )
    SELECT CASE WHEN b.bucket >= cardinality(outbox._bucket_bounds()) THEN outbox._bucket_lower(b.bucket)
                ELSE outbox._bucket_lower(b.bucket)
                     + (outbox._bucket_lower(b.bucket + 1) - outbox._bucket_lower(b.bucket))
                       * ((p * b.total - (b.cum - b.n)) / b.n) END
      FROM b
     WHERE b.cum >= p * b.total AND b.n > 0
     ORDER BY b.bucket
     LIMIT 1
$$;

-- Delivery statistics over the last `since` (hour granularity: whole hours that began
-- within the window), optionally for one endpoint, event type or tenant. Reads the hourly
-- rollup, so its cost does not depend on how many deliveries the table holds.
CREATE FUNCTION outbox.delivery_stats(
    since       interval DEFAULT '1 hour',
    endpoint_id uuid     DEFAULT NULL,
    event_type  text     DEFAULT NULL,
    tenant_id   text     DEFAULT NULL,
    OUT total         bigint,
    OUT delivered     bigint,
    OUT dead          bigint,
    OUT success_rate  double precision,
    OUT avg_attempts  double precision,
    OUT p50_ms        double precision,
    OUT p95_ms        double precision,
    OUT p99_ms        double precision
)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH r AS (
        SELECT * FROM outbox.stats_hourly h
         WHERE h.hour >= date_trunc('hour', now() - delivery_stats.since)
           AND (delivery_stats.endpoint_id IS NULL OR h.endpoint_id = delivery_stats.endpoint_id)
           AND (delivery_stats.event_type IS NULL OR h.event_type = delivery_stats.event_type)
           AND (delivery_stats.tenant_id IS NULL OR h.tenant_id = delivery_stats.tenant_id)
    ),
    lat AS (
        SELECT array_agg(latency_bucket ORDER BY latency_bucket) AS b, array_agg(n ORDER BY latency_bucket) AS n
          FROM (SELECT latency_bucket, sum(deliveries)::bigint AS n FROM r WHERE outcome = 'delivered' GROUP BY 1) x
    )
    SELECT coalesce(sum(deliveries), 0)::bigint,
           coalesce(sum(deliveries) FILTER (WHERE outcome = 'delivered'), 0)::bigint,
           coalesce(sum(deliveries) FILTER (WHERE outcome = 'dead'), 0)::bigint,
           (sum(deliveries) FILTER (WHERE outcome = 'delivered'))::double precision / nullif(sum(deliveries), 0),
           sum(attempts)::double precision / nullif(sum(deliveries), 0),
           (SELECT outbox._percentile(lat.b, lat.n, 0.50) FROM lat),
           (SELECT outbox._percentile(lat.b, lat.n, 0.95) FROM lat),
           (SELECT outbox._percentile(lat.b, lat.n, 0.99) FROM lat)
      FROM r
$$;

-- delivery_stats per endpoint over the window (endpoints without deliveries included).
CREATE FUNCTION outbox.endpoint_stats(since interval DEFAULT '1 hour')
RETURNS TABLE (endpoint_id uuid, url text, total bigint, delivered bigint, dead bigint,
               success_rate double precision, avg_attempts double precision,
               p50_ms double precision, p95_ms double precision, p99_ms double precision)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.id, e.url, s.*
      FROM outbox.endpoint e, LATERAL outbox.delivery_stats(endpoint_stats.since, e.id) s
     WHERE e.deleted_at IS NULL
     ORDER BY s.total DESC, e.created_at
$$;

-- delivery_stats per event type over the window.
CREATE FUNCTION outbox.event_type_stats(since interval DEFAULT '1 hour')
RETURNS TABLE (event_type text, total bigint, delivered bigint, dead bigint,
               success_rate double precision, avg_attempts double precision,
               p50_ms double precision, p95_ms double precision, p99_ms double precision)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.event_type, s.*
      FROM (SELECT DISTINCT h.event_type FROM outbox.stats_hourly h
             WHERE h.hour >= date_trunc('hour', now() - event_type_stats.since)) t,
           LATERAL outbox.delivery_stats(event_type_stats.since, NULL, t.event_type) s
     ORDER BY s.total DESC, t.event_type
$$;
