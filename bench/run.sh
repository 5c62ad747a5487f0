#!/usr/bin/env bash
# Benchmarks of webhook_outbox on fresh throwaway clusters (fsync on, default GUCs unless
# --set says otherwise), delivering to a receiver inside the benchmark process.
#
#   bench/run.sh                                   # throughput, then latency for 30 s
#   bench/run.sh throughput --n 50000
#   bench/run.sh latency --rate 200 --seconds 20
#   bench/run.sh drain --set outbox.batch_size=500
#   bench/run.sh backlog                           # 1,000,000 queued fast, drained, then retention
#   bench/run.sh backlog --n 50000                 # the same, smaller
#   bench/run.sh fanout --n 50000                  # 10 endpoints, 2 of them going bad
#   bench/run.sh memory --n 10000                  # worker RSS with 10,000 in flight
#   bench/run.sh enqueue-cost --seconds 15         # pgbench: plain, PgQ, bare append, outbox.trigger
#   bench/run.sh snapshot --rate 1000 --seconds 180  # latency without, then with an old snapshot held
#   bench/run.sh soak-novacuum --rate 2000 --seconds 600  # soak with autovacuum off for outbox tables
#   bench/run.sh nginx                             # 100,000 events in 10 transactions to nginx
#   bench/run.sh soak --rate 1000 --seconds 600    # 10 minutes, reported per minute
#   bench/run.sh all --seconds 30                  # every scenario
#   bench/run.sh --help
#
# Sets the machine up if needed, installs a release build of the extension into the system
# PostgreSQL 15, then runs the `outbox-bench` binary. Results: a table on stdout and
# bench/results/latest.json.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
cd "$BENCH_DIR/.."

# shellcheck source=../scripts/setup.sh
source scripts/setup.sh
install_extension --release
# PgQ (Debian's postgresql-15-pgq3), the anchor enqueue-cost measures beside ours, and
# nginx-light, the receiver that costs next to nothing for the nginx scenario.
install_packages postgresql-15-pgq3 nginx-light

# The clusters live in a directory of their own, so that whatever way the run ends
# (including Ctrl-C, which need not reach the postmasters) they are stopped and removed.
BENCH_TMP=$(mktemp -d /tmp/outbox-bench.XXXXXX)
chmod 755 "$BENCH_TMP" # as root, the clusters run as the postgres user
as_cluster_owner() {
  if [ "$(id -u)" -eq 0 ]; then sudo -u postgres "$@"; else "$@"; fi
}
cleanup() {
  for pidfile in "$BENCH_TMP"/*/data/postmaster.pid; do
    [ -e "$pidfile" ] || continue
    as_cluster_owner /usr/lib/postgresql/15/bin/pg_ctl stop -m immediate \
      -D "$(dirname "$pidfile")" >/dev/null 2>&1 || true
  done
  rm -rf "$BENCH_TMP"
}
trap cleanup EXIT

OUTBOX_BENCH_COMMAND="bench/run.sh${*:+ $(printf '%q ' "$@")}"
export OUTBOX_BENCH_COMMAND="${OUTBOX_BENCH_COMMAND% }"
TMPDIR=$BENCH_TMP cargo run --release -p outbox-bench -- "$@"
