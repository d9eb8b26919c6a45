#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). CI runs exactly this.
#   1. install what the tests need (ci/install.sh)
#   2. formatting and lints, warnings are errors
#   3. the container images, when Docker is there (ci/images.sh)
#   4. every test of the workspace
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n[ci/test %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
started=$(date +%s)

bash ci/install.sh

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --workspace --bins (the binaries the end-to-end tests run)"
cargo build --workspace --bins --locked

# The container tests (tests/tests/containers.rs) run the images built
# here from this tree's binaries; without Docker they skip, saying so.
if docker info >/dev/null 2>&1; then
  step "container images from the debug binaries (PROFILE=dev ci/images.sh)"
  PROFILE=dev bash ci/images.sh
else
  step "no Docker engine: container images not built, container tests will skip"
fi

step "cargo test --workspace"
# insta: never write snapshots in CI, fail on any difference.
CI=true INSTA_UPDATE=no cargo test --workspace --locked

step "all green in $(( $(date +%s) - started )) s"
