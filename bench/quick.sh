#!/usr/bin/env bash
# First figures, against the demo cluster (scripts/demo.sh starts it): drain rate of a
# backlog, delivery rate right after a large transaction, and commit-to-receipt latency.
#
#   bench/quick.sh [backlog size, default 50000]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-50000}
PG_PORT=${DEMO_PG_PORT:-55432}
RX_PORT=${BENCH_RECEIVER_PORT:-8098}
P=(/usr/lib/postgresql/15/bin/psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -tA)

"${P[@]}" -c "SELECT 1" >/dev/null 2>&1 || "$ROOT/scripts/demo.sh" >/dev/null
[ -x "$ROOT/target/release/outbox-receiver" ] || cargo build --release -q -p outbox-receiver
"$ROOT/target/release/outbox-receiver" --port "$RX_PORT" >/dev/null 2>&1 &
RX_PID=$!
trap 'kill $RX_PID 2>/dev/null || true' EXIT
sleep 0.3

EP=$("${P[@]}" -c "SELECT outbox.create_endpoint('http://127.0.0.1:$RX_PORT/bench', event_types => '{bench.*}')")
settled() { [ "$("${P[@]}" -c "SELECT count(*) FROM outbox.delivery WHERE endpoint_id = '$EP' AND status IN ('pending', 'in_flight')")" = "0" ]; }
now() { date +%s.%N; }

# 1. Backlog drain: queue N while the endpoint is disabled, then enable it.
"${P[@]}" -c "SELECT outbox.disable_endpoint('$EP')" >/dev/null
"${P[@]}" -c "SELECT count(*) FROM generate_series(1, $N) g, outbox.enqueue('bench.item', jsonb_build_object('n', g), endpoint_id => '$EP')" >/dev/null
t0=$(now); "${P[@]}" -c "SELECT outbox.enable_endpoint('$EP')" >/dev/null
until settled; do sleep 0.05; done; t1=$(now)
python3 -c "print('backlog drain: %d deliveries in %.2f s = %.0f/s' % ($N, $t1 - $t0, $N / ($t1 - $t0)))"

# 2. One large transaction: enqueue rate, then delivery rate after its commit.
M=$((N / 2))
t0=$(now)
"${P[@]}" -c "SELECT count(*) FROM generate_series(1, $M) g, outbox.enqueue('bench.item', jsonb_build_object('n', g), endpoint_id => '$EP')" >/dev/null
t1=$(now); until settled; do sleep 0.05; done; t2=$(now)
python3 -c "print('one transaction: enqueue %.0f events/s, then delivery %.0f/s' % ($M / ($t1 - $t0), $M / ($t2 - $t1)))"

"${P[@]}" -c "SELECT outbox.delete_endpoint('$EP')" >/dev/null

# 3. Commit -> receipt latency, one event per transaction.
python3 "$ROOT/bench/latency.py" --port "$PG_PORT"
