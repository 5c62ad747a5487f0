#!/usr/bin/env bash
# Builds the Debian package of the extension for the system PostgreSQL 15:
#
#   scripts/package.sh      -> target/debian/postgresql-15-webhook-outbox_<version>_<arch>.deb
#
# The package holds what `cargo pgrx package` lays out (library, control file, the current
# release's install script, the upgrade scripts) plus the install scripts of earlier releases,
# which pgrx leaves out but `CREATE EXTENSION ... VERSION` and upgrades from them need. The
# path of the .deb is the last line printed. See docs/packaging.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# Same toolchain set-up as demo.sh and test.sh, so that this works on a fresh machine.
source scripts/setup.sh
# dpkg-shlibdeps (the library's dependencies) and strip come with dpkg-dev and binutils.
install_packages dpkg-dev binutils

EXT=webhook_outbox
PKG=postgresql-15-webhook-outbox
# cargo resolves the version however Cargo.toml spells it (workspace inheritance included).
VERSION=$(cargo pkgid -p "$EXT" | sed 's/.*[#@]//')
ARCH=$(dpkg --print-architecture)
LIBDIR=$("$PG_CONFIG" --pkglibdir)
EXTDIR=$("$PG_CONFIG" --sharedir)/extension
# pgrx writes under cargo's target directory, which CARGO_TARGET_DIR can move.
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PGRX_OUT=$TARGET/release/$EXT-pg15
OUT=$TARGET/debian
# dpkg-shlibdeps expects to run from a source tree whose debian/<package>/ is the package root.
STAGE=$OUT/build
PKGROOT=$STAGE/debian/$PKG
DEB=$OUT/${PKG}_${VERSION}_${ARCH}.deb

die() { printf '\033[1;31m[outbox] %s\033[0m\n' "$*" >&2; exit 1; }

# A field of Cargo.toml's [package] table written as a one-line string, or nothing.
cargo_field() {
  awk -v key="$1" '
    /^\[/ { in_package = ($0 == "[package]") }
    in_package && $1 == key && $2 == "=" {
      sub(/^[^=]*=[ \t]*"/, ""); sub(/"[ \t]*$/, ""); print; exit
    }' Cargo.toml
}

# pgrx copies into its output directory without clearing it: start empty so that a script
# removed from sql/ cannot linger in the package.
rm -rf "$PGRX_OUT" "$STAGE"
log "cargo pgrx package $VERSION (release build: several minutes unless already built)"
cargo pgrx package --pg-config "$PG_CONFIG"

[ -f "$PGRX_OUT$LIBDIR/$EXT.so" ] || die "pgrx left no $LIBDIR/$EXT.so in $PGRX_OUT"
[ -f "$PGRX_OUT$EXTDIR/$EXT--$VERSION.sql" ] || die "pgrx left no $EXT--$VERSION.sql in $PGRX_OUT"
grep -q "^default_version = '$VERSION'" "$PGRX_OUT$EXTDIR/$EXT.control" ||
  die "$EXT.control in $PGRX_OUT does not name $VERSION as default_version"

mkdir -p "$PKGROOT"
cp -a "$PGRX_OUT/." "$PKGROOT/"

# pgrx ships the upgrade scripts but not earlier releases' install scripts. Anything of the
# extension's in sql/ that is missing is added; what pgrx generated (the current release's
# script) is never replaced.
for f in sql/"$EXT"--*.sql; do
  dest=$PKGROOT$EXTDIR/$(basename "$f")
  if [ -e "$dest" ]; then
    cmp -s "$f" "$dest" || die "$(basename "$f") from pgrx differs from $f"
  else
    log "adding $(basename "$f") (not in pgrx's layout)"
    cp "$f" "$dest"
  fi
done

# Debian strips installed libraries the way dh_strip does; the exported symbols PostgreSQL
# looks up are in the dynamic table and stay, as does the unwind information panics need.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$PKGROOT$LIBDIR/$EXT.so"

DOC=$PKGROOT/usr/share/doc/$PKG
mkdir -p "$DOC"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: $EXT"
  echo
  echo "Files: *"
  echo "Copyright: $(sed -n 's/^Copyright (c) //p' LICENSE | head -n 1)"
  echo "License: PostgreSQL"
  # A DEP-5 licence text is indented by one space, with " ." for an empty line.
  sed -e 's/^$/./' -e 's/^/ /' LICENSE
} > "$DOC/copyright"
gzip -9n < CHANGELOG.md > "$DOC/changelog.gz"

# Owner root comes from --root-owner-group; modes are set here so that the build user's umask
# and pgrx's executable bit on the library do not leak into the package (policy: 0644 for
# shared libraries).
find "$PKGROOT" -type d -exec chmod 0755 {} +
find "$PKGROOT" -type f -exec chmod 0644 {} +

# The library's own dependencies (libc6, libgcc-s1) with the minimum versions its symbols need.
# It finds the package root by its DEBIAN directory.
mkdir -p "$PKGROOT/DEBIAN"
printf 'Source: webhook-outbox\n\nPackage: %s\nArchitecture: any\n' "$PKG" > "$STAGE/debian/control"
SHLIBS=$(cd "$STAGE" && dpkg-shlibdeps -O "debian/$PKG$LIBDIR/$EXT.so" | sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || die "dpkg-shlibdeps found no dependencies for $EXT.so"

DESCRIPTION=$(cargo_field description)
HOMEPAGE=${DEB_HOMEPAGE:-$(cargo_field homepage)}
HOMEPAGE=${HOMEPAGE:-$(cargo_field repository)}
(cd "$PKGROOT" && find usr -type f -print0 | sort -z | xargs -0 md5sum) > "$PKGROOT/DEBIAN/md5sums"
{
  echo "Package: $PKG"
  echo "Version: $VERSION"
  echo "Architecture: $ARCH"
  echo "Maintainer: ${DEB_MAINTAINER:-The webhook_outbox Authors}"
  echo "Installed-Size: $(du -sk --apparent-size "$PKGROOT/usr" | cut -f1)"
  # postgresql-15 is the server the library is built for; ca-certificates is what the
  # worker's TLS trusts by default (HTTPS endpoints), not needed for plain HTTP.
  echo "Depends: postgresql-15, $SHLIBS"
  echo "Recommends: ca-certificates"
  echo "Section: database"
  echo "Priority: optional"
  [ -z "$HOMEPAGE" ] || echo "Homepage: $HOMEPAGE"
  echo "License: PostgreSQL"
  echo "Description: ${DESCRIPTION:-Transactional webhook delivery from inside PostgreSQL}"
  echo " PostgreSQL 15 extension: an application enqueues an event in the same"
  echo " transaction as its business rows; a background worker inside PostgreSQL signs"
  echo " it (Standard Webhooks), sends it over HTTP, retries it on a schedule and"
  echo " dead-letters what fails for good, all of it visible in SQL."
  echo " ."
  echo " Load it with shared_preload_libraries = 'webhook_outbox', restart the server,"
  echo " then CREATE EXTENSION webhook_outbox."
} > "$PKGROOT/DEBIAN/control"

rm -f "$DEB"
dpkg-deb --root-owner-group --build "$PKGROOT" "$DEB" >/dev/null
log "built $(du -h "$DEB" | cut -f1) package: Depends: $(dpkg-deb -f "$DEB" Depends)"
echo "$DEB"
