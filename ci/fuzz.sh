#!/usr/bin/env bash
# Runs every cargo-fuzz target of encap-proto for a bounded time each,
# seeded with the RFC 4475 torture corpus.
#   usage: ci/fuzz.sh [seconds-per-target]   (default 60)
# Needs a nightly toolchain (cargo fuzz builds with sanitizer flags).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cd encap-proto/fuzz
for target in $(cargo +nightly fuzz list); do
  corpus="corpus/${target}"
  mkdir -p "${corpus}"
  case "${target}" in
    sip_*) cp -n ../../conformance/corpus/rfc4475/*/*.sip "${corpus}/" 2>/dev/null || true ;;
  esac
  printf '\n[ci/fuzz %s] %s for %s s\n' "$(date -u +%H:%M:%S)" "${target}" "${seconds}"
  cargo +nightly fuzz run "${target}" "${corpus}" -- -max_total_time="${seconds}" -print_final_stats=1
done
