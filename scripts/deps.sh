#!/usr/bin/env bash
# Installs what blockd needs to build and test on Debian 12 (bookworm): run as root; safe to repeat.
set -euo pipefail
build_pkgs=(cmake ninja-build g++ pkg-config libcaf-dev libboost-json1.81-dev liburing-dev googletest libgtest-dev
            zlib1g-dev libzstd-dev libgnutls28-dev nettle-dev)
oracle_pkgs=(qemu-utils qemu-system-common libnbd-bin python3-libnbd nbdkit fio python3 gnutls-bin)
want=("${build_pkgs[@]}")
[ "${1:-}" = "--with-oracles" ] && want+=("${oracle_pkgs[@]}")
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "blockd: installing ${missing[*]}" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "blockd: need root to install packages (try: sudo $0 $*)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
