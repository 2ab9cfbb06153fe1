#!/usr/bin/env bash
# Installs the Debian packages the gateway's tests and local stack need, once.
# Postfix is preseeded to "No configuration": the system's own Postfix is never set up
# or started; the tests and `make run` run private instances on loopback ports.
set -euo pipefail

packages=(postfix swaks systemd curl clamav-daemon libmagic1 libarchive13)
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
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
