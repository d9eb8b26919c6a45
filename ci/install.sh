#!/usr/bin/env bash
# Installs what the tests need on a bare machine. Idempotent: every step
# checks first and does nothing when the tool is already there.
set -euo pipefail

step() { printf '\n[ci/install %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

step "rust components: rustfmt, clippy"
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "${component}"
  fi
done

# Debian packages the test suite drives for real (SIPp is the SIP client and
# server of the end-to-end tests; Kamailio is the other SIP load balancer the
# plain-SIP conformance traces run against). Installed only when missing.
apt_packages=()
command -v sipp >/dev/null 2>&1 || apt_packages+=(sip-tester)
[ -x /usr/sbin/kamailio ] || command -v kamailio >/dev/null 2>&1 || apt_packages+=(kamailio)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  step "apt packages: ${apt_packages[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"
fi
step "done"
