#!/usr/bin/env bash
# Machine set-up shared by scripts/demo.sh and scripts/test.sh: system packages, cargo-pgrx
# and `cargo pgrx init` against the system PostgreSQL 15. Every step is skipped when it is
# already done, so a second run costs well under a second.
set -euo pipefail

PGRX_VERSION=0.18.1
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { printf '\033[1;34m[outbox]\033[0m %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs whichever of the given Debian packages are missing (bench/run.sh uses it too).
install_packages() {
  local need=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "installing system packages: ${need[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  fi
}

install_packages postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo pkg-config

# The Debian package starts a cluster on 5432 that the project does not use; it is left alone.

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  log "installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "pg15" "$PGRX_HOME/config.toml"; then
  log "cargo pgrx init (system PostgreSQL 15)"
  cargo pgrx init --pg15 "$PG_CONFIG"
fi

log "toolchain ready (cargo-pgrx $PGRX_VERSION, PostgreSQL $("$PG_CONFIG" --version | awk '{print $2}'))"

# Builds the extension with the given cargo profile flag ("" or "--release") and installs it
# into the system PostgreSQL so that any cluster on this machine can CREATE EXTENSION it.
install_extension() {
  log "installing the extension into $("$PG_CONFIG" --pkglibdir) ${1:-(debug build)}"
  (cd "$ROOT" && as_root env "PATH=$PATH" "HOME=$HOME" cargo pgrx install ${1:-} --pg-config "$PG_CONFIG" >/dev/null)
  # Install scripts of earlier releases, so `CREATE EXTENSION ... VERSION` and upgrade paths
  # from them work (pgrx itself installs the current script and the upgrade scripts).
  as_root cp "$ROOT"/sql/webhook_outbox--[0-9]*.[0-9]*.[0-9]*.sql "$("$PG_CONFIG" --sharedir)/extension/"
}
