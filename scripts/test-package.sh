#!/usr/bin/env bash
# The Debian package, tested the way a user gets it: built by scripts/package.sh, installed
# with dpkg on a minimal Debian 12 (bookworm) root made by debootstrap, with postgresql-15
# from Debian and none of the build tree's files. Inside that root: a cluster with the
# library preloaded, CREATE EXTENSION, one event delivered to a receiver on the host, and
# every earlier release's install script created and upgraded to the current one.
#
#   scripts/test-package.sh [PACKAGE.deb]     (default: build it with scripts/package.sh)
#
# The prepared root (bookworm + postgresql-15) is made once and cached as a tarball in
# $WEBHOOK_OUTBOX_CACHE (default /var/cache/webhook-outbox); every run unpacks a fresh copy
# into /var/tmp and removes it afterwards. WEBHOOK_OUTBOX_REFRESH_ROOT=1 remakes the cache.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# debootstrap, chroot and mount need root. The build steps then run as root too, with the
# caller's PATH and HOME, the way setup.sh's install_extension runs cargo.
if [ "$(id -u)" -ne 0 ]; then
  exec sudo env "PATH=$PATH" "HOME=$HOME" "$0" "$@"
fi

source scripts/setup.sh
install_packages debootstrap

SUITE=bookworm
ARCH=$(dpkg --print-architecture)
PKG=postgresql-15-webhook-outbox
CACHE=${WEBHOOK_OUTBOX_CACHE:-/var/cache/webhook-outbox}
# Part of the cache's name: bump it when the recipe in prepare_root changes, so that a root
# made by an older recipe is not reused.
ROOT_RECIPE=1
TARBALL=$CACHE/$SUITE-$ARCH-postgresql-15-r$ROOT_RECIPE.tar
TIMEOUT=${PACKAGE_TEST_TIMEOUT:-60}
PGBIN=/usr/lib/postgresql/15/bin
EXTDIR=/usr/share/postgresql/15/extension
# Paths inside the root.
SRV=/srv/outbox-test
DATA=$SRV/data
TEST_DB=outbox_test

started=$SECONDS
fail() { printf '\033[1;31m[package test] FAILED: %s\033[0m\n' "$*" >&2; exit 1; }
ok() { printf '\033[1;32m[package test]\033[0m %s\n' "$*"; }

# Where the host's apt gets bookworm from (deb822 sources first, then sources.list), so the
# root is made from the same mirror; deb.debian.org when none is found.
host_mirror() {
  local suite=$1 fallback=$2 found
  found=$(
    {
      awk -v suite="$suite" '
        BEGIN { RS = ""; FS = "\n" }
        {
          uris = ""; match_suite = 0; binary = 0
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, /[ \t]+/); uris = u[1] }
            if ($i ~ /^Types:/) { n = split($i, t, /[ \t]+/); for (j = 2; j <= n; j++) if (t[j] == "deb") binary = 1 }
            if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) match_suite = 1 }
          }
          if (binary && match_suite && uris ~ /^https?:/) print uris
        }' /etc/apt/sources.list.d/*.sources 2>/dev/null
      awk -v suite="$suite" '
        $1 == "deb" {
          i = 2; if ($i ~ /^\[/) while (i <= NF && $i !~ /\]$/) i++
          if ($i ~ /\]$/) i++
          if ($(i + 1) == suite && $i ~ /^https?:/) print $i
        }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | head -n 1
  ) || true
  echo "${found:-$fallback}"
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror "$SUITE" http://deb.debian.org/debian)}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_mirror "$SUITE-security" http://deb.debian.org/debian-security)}

WORK=$(mktemp -d /var/tmp/webhook-outbox-package-test.XXXXXX)
R=                 # the root being worked on (for chroot and the clean-up)
MOUNTS=()          # what this script mounted, in order, so the clean-up undoes exactly that
RECEIVER_PID=

in_root() {
  chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$@"
}
as_postgres() {
  in_root runuser -u postgres -- env HOME=/var/lib/postgresql "$@"
}
psql_in() {
  local db=$1; shift
  as_postgres env PGOPTIONS="-c client_min_messages=warning" "$PGBIN/psql" -X -q -tA \
    -v ON_ERROR_STOP=1 -h "$SRV" -p "$PG_PORT" -U postgres -d "$db" "$@"
}

# apt's and PostgreSQL's maintainer scripts and the server want /proc and /dev; /dev/shm gets
# a tmpfs of its own so that the root's dynamic shared memory is not the host's.
mount_filesystems() {
  mount -t proc proc "$R/proc"; MOUNTS+=("$R/proc")
  mount --bind /dev "$R/dev"; MOUNTS+=("$R/dev")
  # Private, so nothing mounted below it can propagate to the host's /dev.
  mount --make-private "$R/dev"
  mount -t tmpfs -o mode=1777,size=256m shm "$R/dev/shm"; MOUNTS+=("$R/dev/shm")
}
unmount_filesystems() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" ||
      echo "[package test] could not unmount ${MOUNTS[i]}" >&2
  done
  MOUNTS=()
}
mounted_under() { awk '{ print $2 }' /proc/self/mounts | grep -q "^$1\(/\|$\)"; }

# Processes still running with the root as their root directory (the server, its workers):
# a mount in use cannot be unmounted.
stop_root_processes() {
  [ -n "$R" ] && [ -d "$R" ] || return 0
  if [ -f "$R$DATA/postmaster.pid" ]; then
    as_postgres "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 20 stop >/dev/null 2>&1 || true
  fi
  local pid pids=() tries
  for tries in 1 2 3; do
    pids=()
    for pid in /proc/[0-9]*; do
      [ "$(readlink "$pid/root" 2>/dev/null)" = "$R" ] && pids+=("${pid#/proc/}")
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    if [ "$tries" -lt 3 ]; then kill -TERM "${pids[@]}" 2>/dev/null; else kill -KILL "${pids[@]}" 2>/dev/null; fi
    sleep 1
  done
}

# Bounded: a receiver sent SIGTERM while still starting up can miss it, and waiting for it
# unbounded would leave the server and the mounts behind.
stop_receiver() {
  [ -n "$RECEIVER_PID" ] || return 0
  kill -TERM "$RECEIVER_PID" 2>/dev/null
  for _ in $(seq 1 50); do
    kill -0 "$RECEIVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$RECEIVER_PID" 2>/dev/null
  wait "$RECEIVER_PID" 2>/dev/null
  RECEIVER_PID=
}

cleanup() {
  local rc=$?
  set +e
  trap - ERR
  stop_receiver
  stop_root_processes
  unmount_filesystems
  # Never delete through a mount that is still there (it would be the host's /dev).
  if mounted_under "$WORK"; then
    echo "[package test] left $WORK in place: something is still mounted under it" >&2
  else
    rm -rf --one-file-system "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A command that fails under set -e says which one it was (functions included, with -E).
set -E
trap 'printf "\033[1;31m[package test] FAILED (exit %s) at line %s: %s\033[0m\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

# A minimal bookworm with postgresql-15 from Debian, made once and cached.
prepare_root() {
  R=$WORK/prepare
  log "making a minimal $SUITE root with debootstrap from $MIRROR (once; cached as $TARBALL)"
  if ! debootstrap --variant=minbase --arch="$ARCH" "$SUITE" "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" "$R/debootstrap/debootstrap.log" 2>/dev/null
    fail "debootstrap $SUITE from $MIRROR"
  fi
  # The same suites as a real Debian 12 machine, so its postgresql-15 is the current one.
  cat > "$R/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
  cp -L /etc/resolv.conf "$R/etc/resolv.conf"
  # The root shares the host's network: no service may start there (port 5432 is the host's).
  printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
  chmod 0755 "$R/usr/sbin/policy-rc.d"
  # Nor is a default cluster wanted: the test makes its own (kept with --force-confold).
  mkdir -p "$R/etc/postgresql-common"
  echo "create_main_cluster = false" > "$R/etc/postgresql-common/createcluster.conf"
  mount_filesystems
  log "installing postgresql-15 from Debian into the root"
  if ! { in_root apt-get update -q &&
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confold postgresql-15 &&
    in_root apt-get clean; } >"$WORK/apt.log" 2>&1; then
    tail -n 30 "$WORK/apt.log"
    fail "installing postgresql-15 in the $SUITE root"
  fi
  stop_root_processes
  unmount_filesystems
  mkdir -p "$CACHE"
  # Written aside and renamed, so an interrupted run never leaves a half tarball to reuse.
  tar -C "$R" --one-file-system --numeric-owner -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf --one-file-system "$R"
  R=
}

free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 30000))
    # Nothing answers a connection there: free to listen on.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  return 1
}

diagnose() {
  echo "---- server log (last 40 lines)" >&2
  tail -n 40 "$R$SRV/server.log" >&2 2>/dev/null || true
  echo "---- outbox.deliveries and outbox.attempts" >&2
  psql_in "$TEST_DB" -c "SELECT id, event_id, status, attempts, last_status_code, last_error FROM outbox.deliveries" >&2 || true
  psql_in "$TEST_DB" -c "SELECT delivery_id, attempt, outcome, status_code, error FROM outbox.attempts" >&2 || true
  psql_in "$TEST_DB" -c "SELECT backend_type, state FROM pg_stat_activity WHERE backend_type LIKE 'webhook_outbox%'" >&2 || true
  echo "---- receiver" >&2
  cat "$WORK/receiver.err" "$WORK/received.jsonl" >&2 2>/dev/null || true
}

# ---- the package and the receiver, built from the tree on the host
if [ $# -ge 1 ]; then
  DEB=$(realpath "$1")
else
  # Its output is shown as it comes; the path is its last line. (Not tee /dev/stderr: with
  # stderr redirected to a file, that reopens the file and writes over its beginning.)
  scripts/package.sh | tee "$WORK/package.out"
  DEB=$(tail -n 1 "$WORK/package.out")
fi
[ -f "$DEB" ] || fail "no package at $DEB"
VERSION=$(dpkg-deb -f "$DEB" Version)
log "building the bundled receiver (it runs on the host; the root reaches it on 127.0.0.1)"
cargo build --release -q -p outbox-receiver

# ---- a fresh root, from the cache
if [ "${WEBHOOK_OUTBOX_REFRESH_ROOT:-0}" = 1 ] || [ ! -f "$TARBALL" ]; then
  t=$SECONDS
  prepare_root
  ok "prepared $SUITE root cached in $((SECONDS - t)) s ($(du -h "$TARBALL" | cut -f1))"
fi
t=$SECONDS
R=$WORK/root
mkdir "$R"
tar -C "$R" --numeric-owner -xpf "$TARBALL"
mount_filesystems
# shellcheck disable=SC2016 # dpkg-query's format fields, not shell expansions
ok "fresh $SUITE root with $(in_root dpkg-query -W -f='${Package} ${Version}' postgresql-15) in $R ($((SECONDS - t)) s)"
[ ! -e "$R$ROOT" ] || fail "the build tree ($ROOT) is visible inside the root"
in_root test ! -e "$EXTDIR/webhook_outbox.control" || fail "the root has the extension before the package is installed"

# ---- install the package as a user would
cp "$DEB" "$R/tmp/"
log "dpkg -i $(basename "$DEB") inside the root"
if ! in_root env DEBIAN_FRONTEND=noninteractive dpkg -i "/tmp/$(basename "$DEB")"; then
  log "dpkg -i left dependencies to resolve: apt-get -f install"
  in_root env DEBIAN_FRONTEND=noninteractive apt-get -f install -y -q || fail "apt-get -f install"
fi
# shellcheck disable=SC2016 # dpkg-query's format fields, not shell expansions
status=$(in_root dpkg-query -W -f='${db:Status-Status} ${Version}' "$PKG")
[ "$status" = "installed $VERSION" ] || fail "$PKG is '$status' in the root, expected 'installed $VERSION'"
in_root dpkg --verify "$PKG" || fail "dpkg --verify $PKG: files differ from the package's md5sums"
ok "$PKG $VERSION installed; its files: $(in_root dpkg -L "$PKG" | grep -c '\.\(so\|sql\|control\)$') library, control and SQL files"

# ---- a cluster in the root, the library preloaded
PG_PORT=${PACKAGE_TEST_PG_PORT:-$(free_port)} || fail "no free port for the server"
in_root install -d -o postgres -g postgres -m 0700 "$SRV"
as_postgres "$PGBIN/initdb" --auth=trust --username=postgres --encoding=UTF8 --locale=C.UTF-8 \
  -D "$DATA" >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log"; fail "initdb in the root"; }
# The worker's database exists before the server starts, so it connects on its first try.
as_postgres "$PGBIN/postgres" --single -D "$DATA" postgres <<<"CREATE DATABASE $TEST_DB;" \
  >"$WORK/single.log" 2>&1 || { cat "$WORK/single.log"; fail "creating database $TEST_DB"; }
# The receiver is on loopback, which the SSRF guard refuses unless allowed (docs/security.md).
cat >> "$R$DATA/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SRV'
shared_preload_libraries = 'webhook_outbox'
outbox.database = '$TEST_DB'
outbox.allowed_targets = '127.0.0.1/32'
CONF
as_postgres "$PGBIN/pg_ctl" -D "$DATA" -w -t 60 -l "$SRV/server.log" start >/dev/null ||
  { tail -n 30 "$R$SRV/server.log"; fail "starting PostgreSQL in the root"; }
ok "PostgreSQL $(psql_in postgres -c 'SHOW server_version') running in the root on 127.0.0.1:$PG_PORT, webhook_outbox preloaded"

psql_in "$TEST_DB" -c "CREATE EXTENSION webhook_outbox" || { diagnose; fail "CREATE EXTENSION webhook_outbox"; }
got=$(psql_in "$TEST_DB" -c "SELECT extversion FROM pg_extension WHERE extname = 'webhook_outbox'")
[ "$got" = "$VERSION" ] || fail "CREATE EXTENSION made version '$got', expected $VERSION"
ok "CREATE EXTENSION webhook_outbox: version $got"

# ---- one delivery to a real receiver on the host, its signature checked there
SECRET="whsec_$(head -c 32 /dev/urandom | base64 -w 0)"
: >"$WORK/receiver.err"   # read below before the receiver may have opened it
"${CARGO_TARGET_DIR:-$ROOT/target}/release/outbox-receiver" --port 0 --secret "$SECRET" --log "$WORK/received.jsonl" \
  >/dev/null 2>"$WORK/receiver.err" &
RECEIVER_PID=$!
RECEIVER_PORT=
for _ in $(seq 1 100); do
  RECEIVER_PORT=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\)/.*|\1|p' "$WORK/receiver.err")
  [ -n "$RECEIVER_PORT" ] && break
  kill -0 "$RECEIVER_PID" 2>/dev/null || { cat "$WORK/receiver.err"; fail "the receiver did not start"; }
  sleep 0.1
done
[ -n "$RECEIVER_PORT" ] || fail "the receiver did not say which port it listens on"
URL="http://127.0.0.1:$RECEIVER_PORT/package-test"
psql_in "$TEST_DB" -c "SELECT outbox.create_endpoint('$URL', secret => '$SECRET', description => 'package test receiver')" >/dev/null ||
  { diagnose; fail "outbox.create_endpoint"; }
NONCE=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
EVENT=$(psql_in "$TEST_DB" -c "SELECT outbox.enqueue('package.installed', jsonb_build_object('nonce', '$NONCE'))") ||
  { diagnose; fail "outbox.enqueue"; }
log "enqueued event $EVENT for $URL; waiting up to ${TIMEOUT}s for its delivery"
t=$SECONDS
while :; do
  delivery=$(psql_in "$TEST_DB" -c "SELECT status FROM outbox.deliveries WHERE event_id = '$EVENT'") ||
    { diagnose; fail "reading outbox.deliveries"; }
  request=$(grep -F "\"webhook_id\":\"$EVENT\"" "$WORK/received.jsonl" 2>/dev/null || true)
  [ "$delivery" = delivered ] && [ -n "$request" ] && break
  if [ $((SECONDS - t)) -ge "$TIMEOUT" ]; then
    diagnose
    fail "event $EVENT not delivered within ${TIMEOUT}s (delivery: '${delivery:-none}', receiver got it: $([ -n "$request" ] && echo yes || echo no))"
  fi
  sleep 0.5
done
# What arrived is this event: its id, its path, its payload, and a valid signature.
for expect in '"verified":true' '"path":"/package-test"' '"type":"package.installed"' "\"nonce\":\"$NONCE\""; do
  grep -qF "$expect" <<<"$request" || { diagnose; fail "the request the receiver got lacks $expect: $request"; }
done
ok "delivered in $((SECONDS - t)) s: the receiver got webhook-id $EVENT with a valid signature and the payload; outbox.deliveries says delivered"

# ---- earlier releases from the package's scripts, upgraded to this one
earlier=0
for script in "$R$EXTDIR"/webhook_outbox--*.sql; do
  v=$(basename "$script" .sql); v=${v#webhook_outbox--}
  case $v in *--*) continue ;; esac    # an upgrade script
  [ "$v" = "$VERSION" ] && continue
  db=upgrade_from_${v//./_}
  psql_in postgres -c "CREATE DATABASE $db" || fail "CREATE DATABASE $db"
  psql_in "$db" -c "CREATE EXTENSION webhook_outbox VERSION '$v'" -c "ALTER EXTENSION webhook_outbox UPDATE" ||
    { diagnose; fail "CREATE EXTENSION webhook_outbox VERSION '$v' then ALTER EXTENSION ... UPDATE"; }
  got=$(psql_in "$db" -c "SELECT extversion FROM pg_extension WHERE extname = 'webhook_outbox'")
  [ "$got" = "$VERSION" ] || fail "after ALTER EXTENSION UPDATE from $v the version is '$got', expected $VERSION"
  path=$(psql_in "$db" -c "SELECT path FROM pg_extension_update_paths('webhook_outbox') WHERE source = '$v' AND target = '$VERSION'")
  ok "CREATE EXTENSION VERSION '$v' + ALTER EXTENSION UPDATE -> $got (${path//--/ -> })"
  earlier=$((earlier + 1))
done
[ "$earlier" -gt 0 ] || fail "the package has no install script of an earlier release"

ok "all checks passed in $((SECONDS - started)) s"
