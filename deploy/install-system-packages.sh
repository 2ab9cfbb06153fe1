#!/usr/bin/env bash
# Installs the Debian packages the gateway's tests and local stack need, once.
# Postfix is preseeded to "No configuration": the system's own Postfix is never set up
# or started; the tests and `make run` run private instances on loopback ports.
# PostgreSQL likewise: the tests run private clusters (tests/pg_harness.py), never
# Debian's "main" cluster, which is therefore not created on a fresh install.
set -euo pipefail

# chromium (and a font) for the web console's browser tests, driven by Playwright.
packages=(postfix swaks systemd curl clamav-daemon libmagic1 libarchive13 postgresql chromium fonts-liberation)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-packages: need root to install: ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
# postgresql-NN's postinst creates (and starts) a "main" cluster on port 5432 unless
# createcluster.conf says create_main_cluster = false. Debian's createcluster.conf ends with
# `include_dir '/etc/postgresql-common/createcluster.d'` (read for *.conf files), so a drop-in
# there, written before postgresql-common is installed, is read on the first install too.
# It only affects pg_createcluster's default for new server versions: an existing cluster is
# left alone, and `pg_createcluster 15 main --start` still makes one by hand.
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false  # deploy/install-system-packages.sh: tests use private clusters" \
    > /etc/postgresql-common/createcluster.d/50-no-main-cluster.conf
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
