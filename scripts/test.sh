#!/usr/bin/env bash
# The test command: fetch the test assets if missing, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-test-assets.sh
exec cargo test --workspace --locked "$@"
