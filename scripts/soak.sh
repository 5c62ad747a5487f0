#!/usr/bin/env bash
# Soak: steady load for a long time with retention on, reported minute by minute, to show
# that throughput, latency, the worker's memory and the tables stay flat. Not part of the
# tests (it takes ten minutes).
#
#   scripts/soak.sh                 # 10 minutes at 500 events/s
#   scripts/soak.sh 2 500           # 2 minutes at 500 events/s
#
# It is the harness's `soak` scenario (retention at one minute): a table on stdout and
# bench/results/latest.json.
set -euo pipefail
MINUTES=${1:-10}
RATE=${2:-500}
cd "$(dirname "$0")/.."
exec bench/run.sh soak --rate "$RATE" --seconds "$((MINUTES * 60))"
