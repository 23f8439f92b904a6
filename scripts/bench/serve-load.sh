#!/usr/bin/env bash
# Load test of `bitnet serve` from a second process on loopback (issue 6, acceptance 4):
# /healthz and /v1/models at a fixed rate (oha, 30 s each) while one generation stream runs the
# whole time; reports oha's latency percentiles and the stream's time to first token and
# inter-token latency under that load.
#
#   scripts/bench/serve-load.sh MODEL [RATE] [SECONDS] [SERVE_FLAGS...]
#
# Needs oha (`cargo install oha --locked`, or OHA=path) and the test-assets venv (openai).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:?usage: serve-load.sh MODEL [RATE] [SECONDS] [SERVE_FLAGS...]}
rate=${2:-500}
secs=${3:-30}
shift $(( $# < 3 ? $# : 3 ))
oha=${OHA:-oha}
py=target/test-assets/venv/bin/python
bin=${BITNET_BIN:-target/release/bitnet}
work=$(mktemp -d)
port=${PORT:-8197}
"$bin" serve -m "m=$model" --addr "127.0.0.1:$port" --database "sqlite://$work/db" "$@" 2> "$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "^try:" "$work/serve.log" 2>/dev/null && break; sleep 0.2; done
key=$(grep -o 'sk-proj-[A-Za-z0-9]*' "$work/serve.log" | head -1)
base="http://127.0.0.1:$port"

# The generation stream: back-to-back streaming completions until told to stop.
cat > "$work/stream.py" <<'PY'
import json, os, statistics, sys, time, openai
base, key, stop = sys.argv[1], sys.argv[2], sys.argv[3]
c = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
ttft, itl, tokens, t_start = [], [], 0, time.perf_counter()
while not os.path.exists(stop):
    t0 = time.perf_counter(); prev = None
    s = c.completions.create(model="m", prompt="Once upon a time", max_tokens=256, temperature=0.8,
                             seed=len(ttft), stream=True, stream_options={"include_usage": True})
    for ch in s:
        now = time.perf_counter()
        if ch.usage is not None:
            tokens += ch.usage.completion_tokens
        if any(x.text for x in ch.choices):
            if prev is None: ttft.append(now - t0)
            else: itl.append(now - prev)
            prev = now
q = lambda v, p: 1000 * statistics.quantiles(v, n=100)[p - 1] if len(v) > 1 else float("nan")
print(json.dumps({"streams": len(ttft), "tokens": tokens, "tok_s": tokens / (time.perf_counter() - t_start),
                  "ttft_ms_p50": 1000 * statistics.median(ttft), "ttft_ms_max": 1000 * max(ttft),
                  "itl_ms_p50": q(itl, 50), "itl_ms_p95": q(itl, 95), "itl_ms_p99": q(itl, 99)}))
PY
"$py" "$work/stream.py" "$base" "$key" "$work/stop" > "$work/stream.json" &
streamer=$!
sleep 2
for path in /healthz /v1/models; do
    "$oha" -z "${secs}s" -q "$rate" -c 16 --no-tui --output-format json \
        -H "Authorization: Bearer $key" "$base$path" > "$work/oha.json"
    "$py" - "$path" "$work/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[2])); s, p = d["summary"], d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
print(f"{sys.argv[1]:<11} {s['requestsPerSec']:7.1f} req/s  ok {s['successRate']*100:5.1f}%  "
      f"p50 {p['p50']*1000:6.2f} ms  p95 {p['p95']*1000:6.2f} ms  p99 {p['p99']*1000:6.2f} ms  "
      f"max {s['slowest']*1000:7.2f} ms  statuses {codes}")
PY
done
touch "$work/stop"
wait $streamer
echo "generation stream during the load: $(cat "$work/stream.json")"
