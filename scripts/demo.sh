#!/usr/bin/env bash
# The main job, end to end: a local PostgreSQL 15 cluster with webhook_outbox preloaded, the
# bundled receiver on 127.0.0.1, an endpoint pointing at it, events enqueued in a transaction
# (and one in a transaction that rolls back), delivered by the background worker, and what the
# receiver and the outbox tables say about them.
#
#   scripts/demo.sh          set up (once), (re)start, enqueue, show
#   scripts/demo.sh stop     stop the demo cluster and receiver
#
# The cluster lives in /tmp/webhook-outbox-demo and stays up afterwards so you can explore:
#   psql -h 127.0.0.1 -p 55432 -U postgres
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DEMO=${DEMO_DIR:-/tmp/webhook-outbox-demo}
PG_PORT=${DEMO_PG_PORT:-55432}
RECEIVER_PORT=${DEMO_RECEIVER_PORT:-8099}
BIN=/usr/lib/postgresql/15/bin

as_pg() { if [ "$(id -u)" -eq 0 ]; then sudo -u postgres -- "$@"; else "$@"; fi; }
pg_running() { [ -f "$DEMO/data/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$DEMO/data" status >/dev/null 2>&1; }
stop_receiver() {
  if [ -f "$DEMO/receiver.pid" ]; then
    kill "$(cat "$DEMO/receiver.pid")" 2>/dev/null || true
    rm -f "$DEMO/receiver.pid"
  fi
}

if [ "${1:-}" = "stop" ]; then
  stop_receiver
  if pg_running; then as_pg "$BIN/pg_ctl" -D "$DEMO/data" -m fast -w stop; fi
  exit 0
fi

source scripts/setup.sh
install_extension --release
log "building the bundled receiver"
cargo build --release -q -p outbox-receiver

if [ ! -f "$DEMO/data/PG_VERSION" ]; then
  log "creating the demo cluster in $DEMO/data (port $PG_PORT)"
  mkdir -p "$DEMO"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DEMO"
  as_pg "$BIN/initdb" --auth=trust --username=postgres --encoding=UTF8 -D "$DEMO/data" >/dev/null
  as_pg tee -a "$DEMO/data/postgresql.conf" >/dev/null <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DEMO'
shared_preload_libraries = 'webhook_outbox'
CONF
fi
if pg_running; then
  log "restarting the demo cluster (to load the freshly installed library)"
  as_pg "$BIN/pg_ctl" -D "$DEMO/data" -m fast -w restart -l "$DEMO/data/server.log" >/dev/null
else
  log "starting the demo cluster"
  as_pg "$BIN/pg_ctl" -D "$DEMO/data" -w start -l "$DEMO/data/server.log" >/dev/null
fi

psql() { PGOPTIONS="-c client_min_messages=warning" "$BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }

# The receiver is on loopback, which the SSRF guard refuses unless allowed.
psql -c "ALTER SYSTEM SET outbox.allowed_targets = '127.0.0.1/32'"
psql -c "SELECT pg_reload_conf()" >/dev/null
psql -c "CREATE EXTENSION IF NOT EXISTS webhook_outbox"
psql -c "ALTER EXTENSION webhook_outbox UPDATE"   # a demo cluster from an earlier release
URL="http://127.0.0.1:$RECEIVER_PORT/webhooks"
EP=$(psql -tA -c "SELECT id FROM outbox.endpoints WHERE url = '$URL' LIMIT 1")
if [ -z "$EP" ]; then
  EP=$(psql -tA -c "SELECT outbox.create_endpoint('$URL', description => 'bundled demo receiver')")
fi
SECRET=$(psql -tA -c "SELECT outbox.endpoint_secret('$EP')")

stop_receiver
log "starting the receiver on 127.0.0.1:$RECEIVER_PORT (log: $DEMO/receiver.log)"
nohup "$ROOT/target/release/outbox-receiver" --port "$RECEIVER_PORT" --secret "$SECRET" \
  --log "$DEMO/receiver.log" >/dev/null 2>&1 &
echo $! > "$DEMO/receiver.pid"

log "enqueueing three orders in one transaction, and one in a transaction that rolls back"
psql <<'SQL'
CREATE TABLE IF NOT EXISTS demo_orders (id bigserial PRIMARY KEY, customer text, total numeric);
BEGIN;
WITH o AS (
    INSERT INTO demo_orders (customer, total)
    VALUES ('ada', 12.50), ('grace', 99.00), ('linus', 7.25)
    RETURNING id, customer, total
)
SELECT count(*) AS events_enqueued
  FROM o, outbox.enqueue('order.created', to_jsonb(o));
COMMIT;
BEGIN;
SELECT count(*) AS enqueued_then_rolled_back FROM outbox.enqueue('order.refunded', '{"id": -1}');
ROLLBACK;
SQL

log "waiting for the worker to deliver them"
for _ in $(seq 1 100); do
  left=$(psql -tA -c "SELECT pending + in_flight + (SELECT unread FROM outbox.log_status) FROM outbox.stats()")
  [ "$left" = "0" ] && break
  sleep 0.1
done

echo
log "what the receiver got (newest last; verified = the Standard Webhooks signature checked out):"
tail -n 3 "$DEMO/receiver.log"
echo
log "deliveries (newest first)"
psql -c "SELECT id, event_type, status, attempts, last_status_code, finished_at - created_at AS took
           FROM outbox.deliveries ORDER BY created_at DESC LIMIT 6"
log "queue health: SELECT * FROM outbox.stats()"
psql -x -c "SELECT * FROM outbox.stats()"
log "the cluster keeps running: psql -h 127.0.0.1 -p $PG_PORT -U postgres   (stop: scripts/demo.sh stop)"
