#!/usr/bin/env bash
# The test command: fetch the test assets if missing, then run every test of the workspace, then
# the server's end-to-end suite a second time on PostgreSQL. (The store's and the router's own
# tests run on SQLite and PostgreSQL within the first pass.) PostgreSQL comes from
# BITNET_TEST_POSTGRES (default postgres://postgres@127.0.0.1:5432/postgres); each test makes
# its own database and drops it. BITNET_TEST_POSTGRES=skip runs SQLite alone. The storage
# tests use SeaweedFS's S3 on 127.0.0.1:8333 (started here unless BITNET_TEST_S3=skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-test-assets.sh
if [ "${BITNET_TEST_S3:-}" != "skip" ]; then
  # Stop SeaweedFS when the tests end, if this run started it.
  export SEAWEEDFS_PIDFILE="${TMPDIR:-/tmp}/bitnet-seaweedfs.pid.$$"
  trap 'if [ -f "$SEAWEEDFS_PIDFILE" ]; then kill "$(cat "$SEAWEEDFS_PIDFILE")" 2>/dev/null || true; rm -f "$SEAWEEDFS_PIDFILE"; fi' EXIT
  bash scripts/tests/seaweedfs.sh
fi
cargo test --workspace --locked "$@"
if [ "${BITNET_TEST_POSTGRES:-}" != "skip" ]; then
  echo "test.sh: the server's end-to-end suite on PostgreSQL"
  BITNET_TEST_BACKEND=postgres cargo test --workspace --locked --test serve "$@"
fi
