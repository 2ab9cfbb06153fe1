#!/usr/bin/env bash
# Puts a private copy of Debian's Sendmail where tests/sendmail_harness.py finds it, once.
#
# Debian's sendmail-bin conflicts with postfix (both provide mail-transport-agent), and
# Postfix must stay installed, so Sendmail is never apt-installed here. Instead:
#   1. `apt-get download` sendmail-bin, sendmail-base and sendmail-cf into CACHE;
#   2. `dpkg -x` them into PREFIX: nothing under /usr or /etc changes, dpkg does not know
#      about them, and no maintainer script runs (no /etc/mail, no service, no cron job);
#   3. apt-get install the shared libraries sendmail-bin depends on, and m4 (to build a
#      sendmail.cf), only after a dry run shows apt would remove nothing: Postfix stays.
# A run with everything in place checks and prints, and changes nothing (well under 1 s).
#
# CACHE is /var/cache/school-milter-test/sendmail: outside the checkout, so every clone
# shares one download and `git clean` or `make clean` does not throw it away; /var/cache is
# where the FHS puts downloads that can be fetched again. PREFIX is
# /opt/school-milter-test/sendmail: a fixed path, so the tests find it whatever the
# checkout's location (a clone under /root is not readable by other users), beside but
# apart from a production /opt/school-milter. Both can be moved with the variables below;
# the tests read SCHOOL_MILTER_SENDMAIL_PREFIX too.
#
# Exit 0 with a message when the packages cannot be downloaded (no mirror) or apt would
# remove anything to install the libraries: the Sendmail tests then skip and say why.
# Exit 1 only for misuse (not root) or a broken extraction.
set -euo pipefail

PREFIX=${SCHOOL_MILTER_SENDMAIL_PREFIX:-/opt/school-milter-test/sendmail}
CACHE=${SCHOOL_MILTER_SENDMAIL_CACHE:-/var/cache/school-milter-test/sendmail}
PACKAGES=(sendmail-bin sendmail-base sendmail-cf)
BINARY=$PREFIX/usr/libexec/sendmail/sendmail
CF_DIR=$PREFIX/usr/share/sendmail/cf
STAMP=$PREFIX/.installed-by-school-milter

say() { echo "install-sendmail-for-tests: $*"; }

# Debian packages the private Sendmail needs that are not in PREFIX: the libraries of
# sendmail-bin's Depends (not sendmail-base/-cf, which are extracted, nor procps, which
# only its init script uses) and m4 for building a .cf.
needed_packages() {
  local depends
  depends=$(dpkg-deb -f "$1" Depends)
  tr ',' '\n' <<<"$depends" | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' -e 's/[[:space:]]//g' |
    grep -v -e '^$' -e '^sendmail-' -e '^procps$' -e '^libc6$'
  echo m4
}

missing_packages() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

unresolved_libraries() {
  ldd "$BINARY" 2>/dev/null | grep 'not found' || true
}

report() {
  say "Sendmail $(cat "$STAMP") is in $PREFIX"
  say "  binary:      $BINARY"
  say "  cf macros:   $CF_DIR   (m4 -D_CF_DIR_=$CF_DIR/ $CF_DIR/m4/cf.m4 x.mc > x.cf)"
  say "  .deb files:  $CACHE"
  say "  Debian's Postfix is untouched: $(dpkg-query -W -f='${Package} ${Version} ${Status}' postfix 2>/dev/null || echo 'not installed')"
}

# -- already done? --------------------------------------------------------------------
if [ -f "$STAMP" ] && [ -x "$BINARY" ] && [ -f "$CF_DIR/m4/cf.m4" ] && command -v m4 >/dev/null &&
  [ -z "$(unresolved_libraries)" ]; then
  say "Sendmail $(cat "$STAMP") is in $PREFIX (nothing to do)"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  say "need root to install a private Sendmail in $PREFIX (run: sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

# -- 1. download ------------------------------------------------------------------------
mkdir -p "$CACHE"
# apt-get download fetches as the unprivileged _apt user when it can write the directory;
# otherwise it warns and downloads as root.
if id _apt >/dev/null 2>&1; then chown _apt:root "$CACHE"; fi
download() { (cd "$CACHE" && apt-get download -qq "${PACKAGES[@]}") >/dev/null 2>&1; }
version=$(apt-cache policy sendmail-bin 2>/dev/null | awk '/Candidate:/ {print $2}')
have_debs() {
  local pkg
  for pkg in "${PACKAGES[@]}"; do
    compgen -G "$CACHE/${pkg}_${1//:/%3a}_*.deb" >/dev/null || return 1
  done
}
if [ -z "$version" ] || [ "$version" = "(none)" ] || ! have_debs "$version"; then
  # An old or missing package index (a fresh container) is the usual reason for a failure.
  if ! download; then
    apt-get update -qq >/dev/null 2>&1 || true
    version=$(apt-cache policy sendmail-bin 2>/dev/null | awk '/Candidate:/ {print $2}')
    download || true
  fi
fi
if [ -z "$version" ] || [ "$version" = "(none)" ] || ! have_debs "$version"; then
  say "could not download ${PACKAGES[*]} with apt-get (no Debian mirror reachable?)."
  say "The Sendmail integration tests (tests/integration/test_sendmail_milter.py) will be skipped."
  exit 0
fi
debs=()
for pkg in "${PACKAGES[@]}"; do
  debs+=("$(compgen -G "$CACHE/${pkg}_${version//:/%3a}_*.deb" | head -n 1)")
done

# -- 2. libraries (never at Postfix's expense) ------------------------------------------
mapfile -t wanted < <(needed_packages "${debs[0]}")
mapfile -t missing < <(missing_packages "${wanted[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  simulation=$(apt-get install -s --no-install-recommends "${missing[@]}" 2>&1) || {
    apt-get update -qq >/dev/null 2>&1 || true
    simulation=$(apt-get install -s --no-install-recommends "${missing[@]}" 2>&1) || {
      say "apt-get cannot install ${missing[*]}:"
      echo "$simulation" | tail -n 5
      say "The Sendmail integration tests will be skipped."
      exit 0
    }
  }
  if grep -q '^Remv ' <<<"$simulation"; then
    say "refusing: installing ${missing[*]} would remove packages:"
    grep '^Remv ' <<<"$simulation"
    say "The Sendmail integration tests will be skipped."
    exit 0
  fi
  say "installing Debian packages: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# -- 3. extract ---------------------------------------------------------------------------
staging=$(mktemp -d "$(dirname "$PREFIX")/.sendmail-staging.XXXXXX" 2>/dev/null) || {
  mkdir -p "$(dirname "$PREFIX")"
  staging=$(mktemp -d "$(dirname "$PREFIX")/.sendmail-staging.XXXXXX")
}
trap 'rm -rf "$staging"' EXIT
for deb in "${debs[@]}"; do
  dpkg -x "$deb" "$staging"
done
# The package's binaries are set-group-id (mail): a system Sendmail needs that for users'
# mail; the tests run it as root, so a private copy has no reason to keep it.
find "$staging" -type f -perm -2000 -exec chmod g-s {} +
echo "$version" >"$staging/.installed-by-school-milter"
chmod 0755 "$staging"
rm -rf "$PREFIX"
mv "$staging" "$PREFIX"
trap - EXIT

if [ ! -x "$BINARY" ] || [ ! -f "$CF_DIR/m4/cf.m4" ]; then
  say "extraction did not produce $BINARY and $CF_DIR/m4/cf.m4" >&2
  exit 1
fi
if [ -n "$(unresolved_libraries)" ]; then
  say "$BINARY still misses libraries:" >&2
  unresolved_libraries >&2
  exit 1
fi
report
