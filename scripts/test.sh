#!/usr/bin/env bash
# Every test of the project, from a fresh machine: set-up, formatting and lints, the pure
# crates' unit tests, the SQL tests inside PostgreSQL (#[pg_test]), and the whole-system
# tests that start their own clusters.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/setup.sh

step() { printf '\n\033[1;32m== %s\033[0m\n' "$*"; }

step "format and lints"
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "unit tests of the pure crates"
cargo test -p outbox-core -p outbox-receiver -p outbox-sender

step "SQL tests inside PostgreSQL (#[pg_test])"
PGDATA_ROOT=/tmp/webhook-outbox-pgdata
if [ "$(id -u)" -eq 0 ]; then
  install -d -o postgres -g postgres "$PGDATA_ROOT"
  export CARGO_PGRX_TEST_RUNAS=postgres
else
  mkdir -p "$PGDATA_ROOT"
fi
CARGO_PGRX_TEST_PGDATA="$PGDATA_ROOT/data" \
  cargo test -p webhook_outbox --lib --no-default-features --features "pg15 pg_test"

step "whole-system tests (own clusters, real receivers on 127.0.0.1)"
install_extension
cargo test -p webhook_outbox --test '*'

step "Debian package: build, install on a clean Debian root, deliver"
scripts/test-package.sh

step "all tests passed"
