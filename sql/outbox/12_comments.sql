-- webhook_outbox: the catalog descriptions of what users see in schema outbox, the ones
-- \d+ and \df+ (and obj_description / col_description) show. One COMMENT per table, view,
-- column and function, grouped by object: the relation first, then its columns in order.
-- Internal objects (outbox._*) and the partitions of outbox.log and outbox.history have
-- none. The longer explanations are in docs/ and above each object in sql/outbox/. The
-- outbox.grant_* functions are described in 11_privileges.sql, which defines them and is
-- emitted last.

-------------------------------------------------------------------------------------------
-- Tables
-------------------------------------------------------------------------------------------

COMMENT ON TABLE outbox.endpoint IS 'Webhook subscribers: where events are sent, how they are signed, and their delivery policy. Deleted endpoints stay as rows (deleted_at set) so history keeps its URL; query outbox.endpoints instead, which hides secrets.';
COMMENT ON COLUMN outbox.endpoint.id IS 'Endpoint id.';
COMMENT ON COLUMN outbox.endpoint.url IS 'Absolute http/https URL each event is POSTed to, stored normalized.';
COMMENT ON COLUMN outbox.endpoint.secret IS 'Signing secret (whsec_ + base64); read it with outbox.endpoint_secret(). NULL only once the endpoint is deleted.';
COMMENT ON COLUMN outbox.endpoint.event_types IS 'Event types it receives: exact names and ''prefix.*'' patterns. NULL = every event.';
COMMENT ON COLUMN outbox.endpoint.enabled IS 'false: its deliveries are not claimed; they stay pending until outbox.enable_endpoint().';
COMMENT ON COLUMN outbox.endpoint.disabled_reason IS 'Why it was disabled (by an operator, a 410 Gone, or auto-disable); NULL while enabled.';
COMMENT ON COLUMN outbox.endpoint.timeout IS 'Per-attempt request timeout, 100 ms to 5 min. NULL = the outbox.request_timeout setting.';
COMMENT ON COLUMN outbox.endpoint.headers IS 'JSON object of extra request headers sent with every attempt (values are often credentials; emptied when the endpoint is deleted).';
COMMENT ON COLUMN outbox.endpoint.tenant_id IS 'Tenant the endpoint belongs to: it receives only events of the same tenant (NULL matches NULL).';
COMMENT ON COLUMN outbox.endpoint.description IS 'Free-text description.';
COMMENT ON COLUMN outbox.endpoint.created_at IS 'When the endpoint was created.';
COMMENT ON COLUMN outbox.endpoint.updated_at IS 'When the endpoint was last changed.';
COMMENT ON COLUMN outbox.endpoint.deleted_at IS 'When it was deleted (outbox.delete_endpoint); NULL for live endpoints.';
COMMENT ON COLUMN outbox.endpoint.previous_secret IS 'During a secret rotation, the old secret, which keeps signing beside the new one until previous_secret_expires_at.';
COMMENT ON COLUMN outbox.endpoint.previous_secret_expires_at IS 'End of the rotation overlap: after it only the new secret signs.';
COMMENT ON COLUMN outbox.endpoint.ordered IS 'true: deliveries go strictly one at a time in enqueue order.';
COMMENT ON COLUMN outbox.endpoint.rate_limit IS 'Most requests per second (1-100000). NULL = unlimited.';
COMMENT ON COLUMN outbox.endpoint.max_in_flight IS 'Most requests in flight at once (1-10000). NULL = the outbox.endpoint_max_in_flight setting.';
COMMENT ON COLUMN outbox.endpoint.uid IS 'The caller''s key for the endpoint, unique per tenant among live endpoints: creating it again with the same uid returns the existing endpoint.';

COMMENT ON TABLE outbox.endpoint_state IS 'What senders learned about each endpoint: failure streak, circuit breaker, rate limit and requests in flight. Kept apart from outbox.endpoint so the worker never blocks producers or operators; not saved by pg_dump (restored endpoints start afresh).';
COMMENT ON COLUMN outbox.endpoint_state.endpoint_id IS 'The endpoint (outbox.endpoint.id).';
COMMENT ON COLUMN outbox.endpoint_state.consecutive_failures IS 'Failed attempts since the last success; outbox.circuit_threshold of them open the circuit.';
COMMENT ON COLUMN outbox.endpoint_state.last_success_at IS 'When an attempt last succeeded; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_state.last_failure_at IS 'When an attempt last failed; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_state.last_error IS 'Error of the last failed attempt.';
COMMENT ON COLUMN outbox.endpoint_state.updated_at IS 'When this row was last written.';
COMMENT ON COLUMN outbox.endpoint_state.circuit IS 'Circuit breaker state: closed (deliveries flow), open (nothing claimed until next_probe_at) or half_open (one probe in flight).';
COMMENT ON COLUMN outbox.endpoint_state.circuit_changed_at IS 'When the circuit last changed state.';
COMMENT ON COLUMN outbox.endpoint_state.circuit_opened_at IS 'When the circuit last opened from closed (kept while it stays open or half-open).';
COMMENT ON COLUMN outbox.endpoint_state.next_probe_at IS 'When an open circuit sends its next probe delivery.';
COMMENT ON COLUMN outbox.endpoint_state.cooldown IS 'Current wait of an open circuit before its probe: outbox.circuit_cooldown, doubled after each failed probe up to outbox.circuit_max_cooldown.';
COMMENT ON COLUMN outbox.endpoint_state.failing_since IS 'Start of the current run of failures without a success; auto-disable (outbox.auto_disable_after) counts from it. NULL when not failing.';
COMMENT ON COLUMN outbox.endpoint_state.rate_tat IS 'Rate limit bookkeeping (GCRA "theoretical arrival time"): one more request may go while it is less than a second ahead of now.';
COMMENT ON COLUMN outbox.endpoint_state.in_flight IS 'Deliveries of the endpoint currently in_flight, checked against max_in_flight by the claim.';

COMMENT ON TABLE outbox.event IS 'One row per event turned into deliveries. Its id is the webhook-id receivers deduplicate on; ids are per tenant (the same id in two tenants is two events).';
COMMENT ON COLUMN outbox.event.id IS 'Event id, sent as the webhook-id header: the caller''s event_id, or a generated msg_ id.';
COMMENT ON COLUMN outbox.event.event_type IS 'Event type, e.g. order.created.';
COMMENT ON COLUMN outbox.event.payload IS 'Event data, sent as "data" in the request body.';
COMMENT ON COLUMN outbox.event.tenant_id IS 'Tenant of the event; NULL for none.';
COMMENT ON COLUMN outbox.event.created_at IS 'When the event was enqueued (the body''s "timestamp").';
COMMENT ON COLUMN outbox.event.tenant_key IS 'The tenant as a key column: tenant_id, or '''' for none.';

COMMENT ON TABLE outbox.delivery IS 'One row per (event, endpoint) that needed state: the unit that is claimed, sent, retried and acknowledged. First attempts that succeeded straight from the log are in outbox.history instead; query outbox.deliveries for both.';
COMMENT ON COLUMN outbox.delivery.id IS 'Delivery id.';
COMMENT ON COLUMN outbox.delivery.event_id IS 'The event sent (outbox.event.id).';
COMMENT ON COLUMN outbox.delivery.endpoint_id IS 'The endpoint it is sent to.';
COMMENT ON COLUMN outbox.delivery.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.delivery.status IS 'pending, in_flight, delivered, dead or cancelled; the last three are final (dead can be put back with outbox.retry_dead).';
COMMENT ON COLUMN outbox.delivery.attempts IS 'Attempts started so far. Each claim increments it and an ack must name it: it is the fencing token and only ever grows.';
COMMENT ON COLUMN outbox.delivery.due_at IS 'pending: when it becomes due; in_flight: when its lease expires (then it is due again).';
COMMENT ON COLUMN outbox.delivery.lease_owner IS 'The sender that claimed it last (worker:<pid> for the built-in worker).';
COMMENT ON COLUMN outbox.delivery.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.delivery.finished_at IS 'When it reached a final status; NULL while unfinished.';
COMMENT ON COLUMN outbox.delivery.last_attempt_at IS 'When the outcome of the latest attempt was recorded; NULL before any.';
COMMENT ON COLUMN outbox.delivery.last_status_code IS 'HTTP status of the latest attempt; NULL when none was received (timeout, connection error).';
COMMENT ON COLUMN outbox.delivery.last_error IS 'Error text of the latest failed attempt (or why it was requeued).';
COMMENT ON COLUMN outbox.delivery.replay_of IS 'Set on deliveries made by outbox.replay: the delivery whose event is sent again. NULL otherwise.';
COMMENT ON COLUMN outbox.delivery.seq IS 'Enqueue order, set only for deliveries to ordered endpoints.';
COMMENT ON COLUMN outbox.delivery.tenant_key IS 'The tenant as a key column, as in outbox.event: tenant_id, or '''' for none.';
COMMENT ON COLUMN outbox.delivery.retry_base IS 'Attempts made before the last outbox.retry_dead: the retry schedule counts from here.';

COMMENT ON TABLE outbox.attempt IS 'Append-only history: one row per acknowledged attempt of a delivery in outbox.delivery, and per operator repair (requeued, replayed, cancelled). Query outbox.attempts, which adds first-attempt successes from outbox.history.';
COMMENT ON COLUMN outbox.attempt.id IS 'Attempt record id.';
COMMENT ON COLUMN outbox.attempt.delivery_id IS 'The delivery attempted.';
COMMENT ON COLUMN outbox.attempt.attempt IS 'Attempt number (the delivery''s attempts at the time); 0 for requeue and replay.';
COMMENT ON COLUMN outbox.attempt.outcome IS 'delivered, retry or dead as the sender decided; requeued, replayed or cancelled for an operator''s repair (no request sent).';
COMMENT ON COLUMN outbox.attempt.status_code IS 'HTTP status received; NULL when none (timeout, connection error, repair).';
COMMENT ON COLUMN outbox.attempt.error IS 'Error text of a failed attempt, e.g. timed out after 30000 ms; NULL on success.';
COMMENT ON COLUMN outbox.attempt.duration_ms IS 'Request duration in milliseconds.';
COMMENT ON COLUMN outbox.attempt.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';
COMMENT ON COLUMN outbox.attempt.worker IS 'Who recorded it: the sender (worker:<pid> for the built-in worker), or the session user for a repair.';
COMMENT ON COLUMN outbox.attempt.created_at IS 'When the attempt''s outcome was recorded.';

COMMENT ON TABLE outbox.history IS 'Deliveries whose first attempt, sent straight from the event log, succeeded: one appended row each with the delivery, its event and its attempt. Three partitions written in turn and truncated by retention; query outbox.deliveries and outbox.attempts.';
COMMENT ON COLUMN outbox.history.part IS 'Partition (0-2) the row was written to; outbox.history_rotation says which is current.';
COMMENT ON COLUMN outbox.history.delivery_id IS 'Delivery id.';
COMMENT ON COLUMN outbox.history.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.history.endpoint_id IS 'The endpoint it was delivered to.';
COMMENT ON COLUMN outbox.history.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.history.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.history.payload IS 'Event data (kept for outbox.replay).';
COMMENT ON COLUMN outbox.history.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.history.finished_at IS 'When it was delivered.';
COMMENT ON COLUMN outbox.history.attempt_id IS 'The attempt''s id, numbered like outbox.attempt.id.';
COMMENT ON COLUMN outbox.history.status_code IS 'HTTP status received (2xx).';
COMMENT ON COLUMN outbox.history.duration_ms IS 'Request duration in milliseconds.';
COMMENT ON COLUMN outbox.history.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';
COMMENT ON COLUMN outbox.history.worker IS 'The sender that delivered it (worker:<pid>).';

COMMENT ON TABLE outbox.event_key_0 IS 'Callers'' event ids (outbox.enqueue''s event_id) with what they named, so that enqueueing one again does nothing; outbox.event_key_1 is its twin. The two take turns taking new ids (outbox.event_key_rotation); the one whose turn comes is emptied first.';
COMMENT ON TABLE outbox.event_key_1 IS 'The twin of outbox.event_key_0.';
COMMENT ON TABLE outbox.event_key_rotation IS 'Which of outbox.event_key_0 and _1 takes new ids (current) since when; generation counts the turns, as outbox.event_key_generation does.';
COMMENT ON COLUMN outbox.event_key_0.id IS 'The caller''s event id.';
COMMENT ON COLUMN outbox.event_key_0.tenant_key IS 'The event''s tenant, or '''' for none.';
COMMENT ON COLUMN outbox.event_key_0.event_type IS 'The event type enqueued under the id.';
COMMENT ON COLUMN outbox.event_key_0.payload_hash IS 'SHA-256 of the payload as jsonb writes it.';
COMMENT ON COLUMN outbox.event_key_0.created_at IS 'When the id was first enqueued.';
COMMENT ON COLUMN outbox.event_key_1.id IS 'The caller''s event id.';
COMMENT ON COLUMN outbox.event_key_1.tenant_key IS 'The event''s tenant, or '''' for none.';
COMMENT ON COLUMN outbox.event_key_1.event_type IS 'The event type enqueued under the id.';
COMMENT ON COLUMN outbox.event_key_1.payload_hash IS 'SHA-256 of the payload as jsonb writes it.';
COMMENT ON COLUMN outbox.event_key_1.created_at IS 'When the id was first enqueued.';
COMMENT ON COLUMN outbox.event_key_rotation.current IS 'The table taking new ids: 0 or 1.';
COMMENT ON COLUMN outbox.event_key_rotation.generation IS 'The turn''s number, as outbox.event_key_generation gave it.';
COMMENT ON COLUMN outbox.event_key_rotation.since IS 'When the turn began.';
COMMENT ON TABLE outbox.history_rotation IS 'Which partition of outbox.history is being written (until NULL) since when, and when each other one stopped being written; a partition is emptied for reuse only once its newest row is past retention.';
COMMENT ON COLUMN outbox.history_rotation.part IS 'Partition number, 0-2.';
COMMENT ON COLUMN outbox.history_rotation.since IS 'When writing to this partition started.';
COMMENT ON COLUMN outbox.history_rotation.until IS 'When writing to it stopped; NULL for the partition written now.';

COMMENT ON TABLE outbox.log IS 'The event log producers append to, one row per enqueued event in the producer''s transaction; the worker reads it after commit and makes the deliveries. Three partitions by transaction-id window, truncated once read; watch outbox.log_status.';
COMMENT ON COLUMN outbox.log.txid IS 'Top-level transaction id of the producer that wrote the event.';
COMMENT ON COLUMN outbox.log.seq IS 'Order within the transaction (ordered endpoints receive events in this order).';
COMMENT ON COLUMN outbox.log.id IS 'Event id (webhook-id): the caller''s or one made by outbox.enqueue; NULL from outbox.trigger, whose events get theirs when read.';
COMMENT ON COLUMN outbox.log.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.log.payload IS 'Event data.';
COMMENT ON COLUMN outbox.log.tenant_id IS 'Tenant of the event; NULL for none.';
COMMENT ON COLUMN outbox.log.endpoint_id IS 'Set when the event is for one endpoint instead of every subscribed endpoint.';
COMMENT ON COLUMN outbox.log.deliver_at IS 'Earliest time of the first attempt; NULL = at once.';
COMMENT ON COLUMN outbox.log.created_at IS 'When the event was enqueued.';

COMMENT ON TABLE outbox.log_cursor IS 'Where reading the event log stands: one row appended per read step, the newest one counting (old rows are removed by log rotation).';
COMMENT ON COLUMN outbox.log_cursor.id IS 'Step number; the highest is current.';
COMMENT ON COLUMN outbox.log_cursor.done IS 'Snapshot whose visible transactions have all been read.';
COMMENT ON COLUMN outbox.log_cursor.batch IS 'Snapshot of a batch being read in parts; NULL when none is.';
COMMENT ON COLUMN outbox.log_cursor.pos_txid IS 'Transaction id of the last event of the batch already read; NULL when no batch is open.';
COMMENT ON COLUMN outbox.log_cursor.pos_seq IS 'seq of the last event of the batch already read; NULL when no batch is open.';
COMMENT ON COLUMN outbox.log_cursor.events IS 'Events read in this step.';
COMMENT ON COLUMN outbox.log_cursor.created_at IS 'When this step was recorded.';

COMMENT ON TABLE outbox.stats_hourly IS 'Hourly rollup of finished deliveries, written with each acknowledged batch and kept 90 days; outbox.delivery_stats and friends read it. Latency (enqueue to final outcome) is kept as a histogram.';
COMMENT ON COLUMN outbox.stats_hourly.hour IS 'Start of the hour.';
COMMENT ON COLUMN outbox.stats_hourly.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.stats_hourly.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.stats_hourly.tenant_id IS 'Tenant; '''' for none.';
COMMENT ON COLUMN outbox.stats_hourly.outcome IS 'Final status counted: delivered or dead.';
COMMENT ON COLUMN outbox.stats_hourly.latency_bucket IS 'Latency histogram bucket (10 ms, 25 ms, ... 24 h bounds), in milliseconds from enqueue to final outcome.';
COMMENT ON COLUMN outbox.stats_hourly.deliveries IS 'Deliveries that finished in this hour and bucket.';
COMMENT ON COLUMN outbox.stats_hourly.attempts IS 'Attempts those deliveries took, in total.';
COMMENT ON COLUMN outbox.stats_hourly.latency_ms_sum IS 'Sum of their latencies, in milliseconds.';
COMMENT ON TABLE outbox.stats_retired IS 'Sums of the rollup hours retention removed (older than 90 days), per endpoint, outcome and latency bucket: added to outbox.stats_hourly they give totals that never go down (the counters in outbox.metrics).';
COMMENT ON COLUMN outbox.stats_retired.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.stats_retired.outcome IS 'Final status counted: delivered or dead.';
COMMENT ON COLUMN outbox.stats_retired.latency_bucket IS 'Latency histogram bucket, as in outbox.stats_hourly.';
COMMENT ON COLUMN outbox.stats_retired.deliveries IS 'Deliveries counted.';
COMMENT ON COLUMN outbox.stats_retired.attempts IS 'Attempts those deliveries took.';
COMMENT ON COLUMN outbox.stats_retired.latency_ms_sum IS 'Sum of their latencies, milliseconds.';

-------------------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------------------

COMMENT ON VIEW outbox.endpoints IS 'Live (not deleted) endpoints, without secrets. Header values are shown only to roles that may read secrets; others see ******** in their place.';
COMMENT ON COLUMN outbox.endpoints.id IS 'Endpoint id.';
COMMENT ON COLUMN outbox.endpoints.url IS 'URL each event is POSTed to.';
COMMENT ON COLUMN outbox.endpoints.event_types IS 'Event types it receives (exact names and ''prefix.*''); NULL = every event.';
COMMENT ON COLUMN outbox.endpoints.enabled IS 'false: its deliveries wait until it is enabled.';
COMMENT ON COLUMN outbox.endpoints.disabled_reason IS 'Why it was disabled; NULL while enabled.';
COMMENT ON COLUMN outbox.endpoints.timeout IS 'Per-attempt timeout; NULL = the outbox.request_timeout setting.';
COMMENT ON COLUMN outbox.endpoints.headers IS 'Extra request headers (values masked as ******** unless the role may read secrets).';
COMMENT ON COLUMN outbox.endpoints.tenant_id IS 'Tenant the endpoint belongs to.';
COMMENT ON COLUMN outbox.endpoints.description IS 'Free-text description.';
COMMENT ON COLUMN outbox.endpoints.created_at IS 'When the endpoint was created.';
COMMENT ON COLUMN outbox.endpoints.updated_at IS 'When the endpoint was last changed.';
COMMENT ON COLUMN outbox.endpoints.ordered IS 'true: deliveries go strictly one at a time in enqueue order.';
COMMENT ON COLUMN outbox.endpoints.rate_limit IS 'Most requests per second; NULL = unlimited.';
COMMENT ON COLUMN outbox.endpoints.max_in_flight IS 'Most requests at once; NULL = the outbox.endpoint_max_in_flight setting.';
COMMENT ON COLUMN outbox.endpoints.uid IS 'The caller''s key for the endpoint (unique per tenant among live endpoints); NULL if none.';

COMMENT ON VIEW outbox.deliveries IS 'Every delivery: those with state (outbox.delivery) and first-attempt successes (outbox.history).';
COMMENT ON COLUMN outbox.deliveries.id IS 'Delivery id.';
COMMENT ON COLUMN outbox.deliveries.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.deliveries.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.deliveries.endpoint_id IS 'The endpoint it is sent to.';
COMMENT ON COLUMN outbox.deliveries.endpoint_url IS 'That endpoint''s URL.';
COMMENT ON COLUMN outbox.deliveries.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.deliveries.status IS 'pending, in_flight, delivered, dead or cancelled.';
COMMENT ON COLUMN outbox.deliveries.retrying IS 'true when pending after at least one failed attempt.';
COMMENT ON COLUMN outbox.deliveries.attempts IS 'Attempts started so far (the attempt number).';
COMMENT ON COLUMN outbox.deliveries.next_attempt_at IS 'When a pending delivery becomes due; NULL in other statuses.';
COMMENT ON COLUMN outbox.deliveries.lease_expires_at IS 'When an in_flight delivery''s lease expires (then it may be claimed again); NULL in other statuses.';
COMMENT ON COLUMN outbox.deliveries.lease_owner IS 'The sender that claimed it last.';
COMMENT ON COLUMN outbox.deliveries.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.deliveries.last_attempt_at IS 'When the outcome of the latest attempt was recorded.';
COMMENT ON COLUMN outbox.deliveries.finished_at IS 'When it reached a final status; NULL while unfinished.';
COMMENT ON COLUMN outbox.deliveries.last_status_code IS 'HTTP status of the latest attempt; NULL when none was received.';
COMMENT ON COLUMN outbox.deliveries.last_error IS 'Error text of the latest failed attempt.';
COMMENT ON COLUMN outbox.deliveries.payload IS 'Event data.';

COMMENT ON VIEW outbox.attempts IS 'Every acknowledged attempt and operator repair (outbox.attempt), plus first-attempt successes (outbox.history).';
COMMENT ON COLUMN outbox.attempts.id IS 'Attempt record id.';
COMMENT ON COLUMN outbox.attempts.delivery_id IS 'The delivery attempted.';
COMMENT ON COLUMN outbox.attempts.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.attempts.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.attempts.attempt IS 'Attempt number; 0 for requeue and replay.';
COMMENT ON COLUMN outbox.attempts.outcome IS 'delivered, retry or dead; requeued, replayed or cancelled for an operator''s repair.';
COMMENT ON COLUMN outbox.attempts.status_code IS 'HTTP status received; NULL when none.';
COMMENT ON COLUMN outbox.attempts.error IS 'Error text of a failed attempt; NULL on success.';
COMMENT ON COLUMN outbox.attempts.duration_ms IS 'Request duration in milliseconds.';
COMMENT ON COLUMN outbox.attempts.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';
COMMENT ON COLUMN outbox.attempts.worker IS 'Who recorded it: the sender, or the session user for a repair.';
COMMENT ON COLUMN outbox.attempts.created_at IS 'When the outcome was recorded.';

COMMENT ON VIEW outbox.dead_letters IS 'Dead deliveries: the receiver refused, or every retry failed. Put them back with outbox.retry_dead.';
COMMENT ON COLUMN outbox.dead_letters.id IS 'Delivery id.';
COMMENT ON COLUMN outbox.dead_letters.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.dead_letters.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.dead_letters.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.dead_letters.endpoint_url IS 'That endpoint''s URL.';
COMMENT ON COLUMN outbox.dead_letters.tenant_id IS 'Tenant of the event.';
COMMENT ON COLUMN outbox.dead_letters.attempts IS 'Attempts made.';
COMMENT ON COLUMN outbox.dead_letters.last_status_code IS 'HTTP status of the last attempt; NULL when none was received.';
COMMENT ON COLUMN outbox.dead_letters.last_error IS 'Error text of the last attempt.';
COMMENT ON COLUMN outbox.dead_letters.created_at IS 'When the event was enqueued.';
COMMENT ON COLUMN outbox.dead_letters.died_at IS 'When the delivery went dead.';
COMMENT ON COLUMN outbox.dead_letters.payload IS 'Event data.';

COMMENT ON VIEW outbox.endpoint_health IS 'One row per live endpoint: its backlog, recent results, circuit breaker, and what holds its queue back, if anything.';
COMMENT ON COLUMN outbox.endpoint_health.endpoint_id IS 'Endpoint id.';
COMMENT ON COLUMN outbox.endpoint_health.url IS 'Endpoint URL.';
COMMENT ON COLUMN outbox.endpoint_health.enabled IS 'false: nothing is claimed for it.';
COMMENT ON COLUMN outbox.endpoint_health.disabled_reason IS 'Why it was disabled; NULL while enabled.';
COMMENT ON COLUMN outbox.endpoint_health.tenant_id IS 'Tenant the endpoint belongs to.';
COMMENT ON COLUMN outbox.endpoint_health.pending IS 'Deliveries pending (due or not).';
COMMENT ON COLUMN outbox.endpoint_health.in_flight IS 'Deliveries in flight.';
COMMENT ON COLUMN outbox.endpoint_health.retrying IS 'Pending deliveries with at least one failed attempt.';
COMMENT ON COLUMN outbox.endpoint_health.oldest_pending_age IS 'Age of the oldest pending delivery; NULL when none is pending.';
COMMENT ON COLUMN outbox.endpoint_health.consecutive_failures IS 'Failed attempts since the last success.';
COMMENT ON COLUMN outbox.endpoint_health.last_success_at IS 'When an attempt last succeeded; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_health.last_failure_at IS 'When an attempt last failed; NULL if never.';
COMMENT ON COLUMN outbox.endpoint_health.last_error IS 'Error of the last failed attempt.';
COMMENT ON COLUMN outbox.endpoint_health.circuit IS 'Circuit breaker: closed, open (nothing claimed until next_probe_at) or half_open (a probe is in flight).';
COMMENT ON COLUMN outbox.endpoint_health.circuit_opened_at IS 'When the circuit last opened from closed.';
COMMENT ON COLUMN outbox.endpoint_health.next_probe_at IS 'When an open circuit sends its next probe.';
COMMENT ON COLUMN outbox.endpoint_health.circuit_cooldown IS 'Current wait of an open circuit before its probe (doubles after each failed probe).';
COMMENT ON COLUMN outbox.endpoint_health.failing_since IS 'Start of the current run of failures; auto-disable counts from it. NULL when not failing.';
COMMENT ON COLUMN outbox.endpoint_health.held_reason IS 'What holds the queue back: disabled, circuit open, circuit half-open, an ordered endpoint''s head in flight or not due yet, or max_in_flight reached. NULL: nothing.';
COMMENT ON COLUMN outbox.endpoint_health.held_until IS 'Until when it is held; NULL: until an operator or an outcome acts.';

COMMENT ON VIEW outbox.recent_failures IS 'Failed attempts (outcome retry or dead), newest first.';
COMMENT ON COLUMN outbox.recent_failures.created_at IS 'When the attempt''s outcome was recorded.';
COMMENT ON COLUMN outbox.recent_failures.delivery_id IS 'The delivery attempted.';
COMMENT ON COLUMN outbox.recent_failures.event_id IS 'Event id (the webhook-id).';
COMMENT ON COLUMN outbox.recent_failures.event_type IS 'Event type.';
COMMENT ON COLUMN outbox.recent_failures.endpoint_id IS 'The endpoint.';
COMMENT ON COLUMN outbox.recent_failures.endpoint_url IS 'That endpoint''s URL.';
COMMENT ON COLUMN outbox.recent_failures.attempt IS 'Attempt number.';
COMMENT ON COLUMN outbox.recent_failures.outcome IS 'retry or dead.';
COMMENT ON COLUMN outbox.recent_failures.status_code IS 'HTTP status received; NULL when none (timeout, connection error).';
COMMENT ON COLUMN outbox.recent_failures.error IS 'Error text.';
COMMENT ON COLUMN outbox.recent_failures.response_body IS 'Start of the response body (at most outbox.max_response_body bytes).';

COMMENT ON VIEW outbox.log_status IS 'How far reading the event log has come. Unread events that stay there mean nothing (no worker, no outbox.claim) is reading the log.';
COMMENT ON COLUMN outbox.log_status.unread IS 'Events committed but not read yet (so not yet deliveries); should be near zero.';
COMMENT ON COLUMN outbox.log_status.oldest_unread_age IS 'How long the oldest unread event has waited; NULL when none.';
COMMENT ON COLUMN outbox.log_status.last_read_at IS 'When the reader last recorded progress.';
COMMENT ON COLUMN outbox.log_status.reading IS 'true while a batch is being read in parts.';

COMMENT ON VIEW outbox.metrics IS 'Counters, gauges and the delivery latency histogram for Prometheus exporters: one row per metric and label set (see contrib/). The *_total counters and the histogram never go down.';
COMMENT ON COLUMN outbox.metrics.metric IS 'Metric name, e.g. outbox_deliveries, outbox_log_unread, outbox_finished_total.';
COMMENT ON COLUMN outbox.metrics.status IS 'status label: pending, in_flight or dead for outbox_deliveries; delivered or dead for outbox_finished_total; the circuit state for outbox_endpoint_circuit_open; NULL otherwise.';
COMMENT ON COLUMN outbox.metrics.endpoint_id IS 'endpoint_id label, for per-endpoint metrics; NULL otherwise.';
COMMENT ON COLUMN outbox.metrics.value IS 'The value (counts; ages and latencies in seconds).';
COMMENT ON COLUMN outbox.metrics.le IS 'le label of outbox_delivery_latency_seconds_bucket: the bucket''s upper bound in seconds, or +Inf; NULL otherwise.';

COMMENT ON VIEW outbox.triggers IS 'Every table that carries an outbox.trigger, and how it is set up.';
COMMENT ON COLUMN outbox.triggers.table_name IS 'The table.';
COMMENT ON COLUMN outbox.triggers.trigger_name IS 'The trigger''s name.';
COMMENT ON COLUMN outbox.triggers.enabled IS 'false when the trigger is disabled.';
COMMENT ON COLUMN outbox.triggers.events IS 'Row changes that make events: INSERT, UPDATE, DELETE.';
COMMENT ON COLUMN outbox.triggers.event_prefix IS 'Event type prefix (default: the table''s name): events are <prefix>.created, .updated, .deleted.';
COMMENT ON COLUMN outbox.triggers.arguments IS 'Arguments after the prefix: tenant column, exclude=..., shape=....';
COMMENT ON COLUMN outbox.triggers.definition IS 'The full CREATE TRIGGER statement.';

-------------------------------------------------------------------------------------------
-- Functions
-------------------------------------------------------------------------------------------

COMMENT ON FUNCTION outbox.create_endpoint(text,text[],text,jsonb,interval,text,text,boolean,boolean,integer,integer,text) IS 'Registers a webhook endpoint and returns its id; generates a secret when none is given. With uid, calling it again with the same settings returns the existing endpoint (other settings: 23505).';
COMMENT ON FUNCTION outbox.update_endpoint(uuid,text,text[],text,jsonb,interval,text,boolean,integer,integer,text) IS 'Changes the given fields of an endpoint; NULL leaves a field as it is. event_types => ''{*}'', timeout => ''0'' and max_in_flight => 0 restore the defaults, rate_limit => 0 removes the limit, uid => '''' removes the caller''s key.';
COMMENT ON FUNCTION outbox.enable_endpoint(uuid) IS 'Re-enables an endpoint: clears its reason, closes its circuit, restarts its failure count and wakes the worker; deliveries waiting for a retry keep their time.';
COMMENT ON FUNCTION outbox.disable_endpoint(uuid,text) IS 'Stops claiming an endpoint''s deliveries; they stay pending until outbox.enable_endpoint.';
COMMENT ON FUNCTION outbox.delete_endpoint(uuid) IS 'Deletes an endpoint and cancels its unfinished deliveries, returning how many. The row stays (deleted_at set) without its secrets and headers.';
COMMENT ON FUNCTION outbox.endpoint_secret(uuid) IS 'The endpoint''s signing secret (whsec_...) to configure in the receiver. No view shows secrets.';
COMMENT ON FUNCTION outbox.rotate_secret(uuid,text,interval) IS 'Replaces an endpoint''s secret (given or generated) and returns the new one. For overlap (0 to 30 days) requests carry both signatures, so receivers can switch at their own pace.';
COMMENT ON FUNCTION outbox.enqueue(text,jsonb,uuid,text,text,timestamp with time zone) IS 'Appends one event to the log in the caller''s transaction and returns its id (webhook-id); deliveries are made after commit. Optional: one endpoint, idempotent event_id, tenant_id, deliver_at.';
COMMENT ON FUNCTION outbox.trigger() IS 'Row trigger (AFTER ... FOR EACH ROW) that enqueues <prefix>.created, .updated and .deleted events. Arguments: prefix (default: table name), then tenant column or tenant=, exclude=, shape= options.';
COMMENT ON FUNCTION outbox.claim(integer,text,interval,uuid,text) IS 'For senders: claims up to batch_size due deliveries (FOR UPDATE SKIP LOCKED), sets them in_flight for lease, and returns what to send. Respects each endpoint''s delivery control; optionally scoped to one endpoint or tenant.';
COMMENT ON FUNCTION outbox.ack_batch(uuid[],integer[],outbox.attempt_outcome[],integer[],text[],double precision[],timestamp with time zone[],text[],text) IS 'Records the outcomes of many attempts at once and returns the accepted delivery ids. An outcome is accepted only from the holder of the current attempt; others are skipped.';
COMMENT ON FUNCTION outbox.ack(uuid,integer,outbox.attempt_outcome,integer,text,double precision,timestamp with time zone,text,text) IS 'Records one attempt''s outcome (delivered, retry or dead) and returns the delivery''s new status. Refused (55000) unless the caller holds that attempt.';
COMMENT ON FUNCTION outbox.stats() IS 'Queue health in one row: pending, due, in flight, retrying and dead counts, oldest pending age, and last-hour / last-minute results.';
COMMENT ON FUNCTION outbox.delivery_stats(interval,uuid,text,text) IS 'Totals, success rate, average attempts and latency percentiles (ms, enqueue to final outcome) of deliveries finished within since (whole hours), optionally for one endpoint, event type or tenant.';
COMMENT ON FUNCTION outbox.endpoint_stats(interval) IS 'outbox.delivery_stats per endpoint over the window (endpoints without deliveries included).';
COMMENT ON FUNCTION outbox.event_type_stats(interval) IS 'outbox.delivery_stats per event type over the window.';
COMMENT ON FUNCTION outbox.retry_dead(uuid,uuid,timestamp with time zone,timestamp with time zone) IS 'Puts dead deliveries (one, an endpoint''s, and/or those that died in [since, until)) back in the queue, due now, with a fresh retry schedule. Returns how many; at least one argument is required.';
COMMENT ON FUNCTION outbox.replay(uuid,timestamp with time zone,timestamp with time zone) IS 'Sends events already delivered to an endpoint since since (until until) again, as new deliveries with the same event id. Returns how many.';
COMMENT ON FUNCTION outbox.cancel(uuid,uuid) IS 'Cancels unfinished deliveries: one by id, or every one of an endpoint. A sender still holding one has its ack refused. Returns how many.';
COMMENT ON FUNCTION outbox.purge(interval,interval) IS 'Deletes finished deliveries older than older_than (dead ones older than dead_older_than, default the same), with their attempts and orphaned events, now. For manual use; returns how many.';
COMMENT ON FUNCTION outbox.generate_secret() IS 'A fresh signing secret: whsec_ + base64 of 32 random bytes.';
COMMENT ON FUNCTION outbox.retry_delay(integer) IS 'Delay after failed attempt number attempt under outbox.retry_schedule, with +/-20 % jitter; NULL when the schedule is exhausted.';
COMMENT ON FUNCTION outbox.sign(text,text,bigint,text) IS 'The v1,... Standard Webhooks signature of (msg_id, timestamp, body) with a secret, for checking a receiver''s verification.';
