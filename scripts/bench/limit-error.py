"""The rate-limit error across replicas: three `bitnet serve` replicas on one PostgreSQL and one
Redis; in each run a fresh project limited to N requests a minute gets 3N concurrent requests
spread over the replicas; prints admitted - N per run.

    python3 scripts/bench/limit-error.py --bitnet target/release/bitnet --model M.gguf \
        [--database postgres://postgres@127.0.0.1:5432/bench_limits] [--redis redis://127.0.0.1:6379] \
        [--runs 10] [--limit 20]

The database is dropped and made again first (psql). Standard library only.
"""

import argparse
import http.client
import json
import re
import subprocess
import sys
import threading


def start(a, extra_env=None):
    p = subprocess.Popen(
        [a.bitnet, "serve", "-m", f"smol={a.model}", "--addr", "127.0.0.1:0", "--database", a.database,
         "--threads", "1", "--redis", a.redis],
        stderr=subprocess.PIPE, text=True)
    addr = admin = None
    for line in p.stderr:
        if m := re.search(r"http://([0-9.:]+)/v1", line):
            addr = m.group(1)
        if m := re.search(r"(sk-admin-\w+)", line):
            admin = m.group(1)
        if line.startswith("try:"):
            break
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    if not addr:
        sys.exit("a replica did not start")
    return p, addr, admin


def call(addr, method, path, key, body=None):
    h, port = addr.split(":")
    c = http.client.HTTPConnection(h, int(port), timeout=300)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, (json.loads(data) if data else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bitnet", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_limits")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--limit", type=int, default=20)
    a = ap.parse_args()
    db = a.database.rsplit("/", 1)[1]
    for sql in (f"DROP DATABASE IF EXISTS {db}", f"CREATE DATABASE {db}"):
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", sql], check=True)
    replicas = [start(a)]
    admin = replicas[0][2]
    replicas += [start(a), start(a)]
    addrs = [r[1] for r in replicas]
    errors = []
    try:
        for run in range(a.runs):
            _, p = call(addrs[0], "POST", "/v1/organization/projects", admin, {"name": f"run {run}"})
            _, sa = call(addrs[1], "POST", f"/v1/organization/projects/{p['id']}/service_accounts", admin,
                         {"name": "bench"})
            key = sa["api_key"]["value"]
            s, _ = call(addrs[2], "POST", f"/v1/organization/projects/{p['id']}/rate_limits/rl-smol", admin,
                        {"max_requests_per_1_minute": a.limit})
            assert s == 200
            statuses = []
            barrier = threading.Barrier(3 * a.limit)

            def one(i):
                barrier.wait()
                s, _ = call(addrs[i % 3], "POST", "/v1/chat/completions", key,
                            {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
                statuses.append(s)

            ts = [threading.Thread(target=one, args=(i,)) for i in range(3 * a.limit)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            admitted = statuses.count(200)
            other = [s for s in statuses if s not in (200, 429)]
            errors.append(admitted - a.limit)
            print(f"run {run + 1}: {admitted} of {3 * a.limit} admitted under a limit of {a.limit} "
                  f"(error {admitted - a.limit:+d}){'; other statuses ' + str(other) if other else ''}", flush=True)
    finally:
        for r in replicas:
            r[0].kill()
    print(f"admitted - limit over {len(errors)} runs: min {min(errors):+d}, max {max(errors):+d}")


if __name__ == "__main__":
    main()
