"""The cost of authentication and the permission check, under load: GET /v1/models (a project
key) and GET /v1/organization/projects (an admin key) at a fixed rate while a generation
stream runs, reporting latency percentiles as the client sees them.

    python3 scripts/bench/auth-latency.py --bitnet target/release/bitnet --model M.gguf \
        [--database sqlite:///tmp/x.db | postgres://postgres@127.0.0.1/bench] [--rate 500] [--seconds 10] \
        [--serve-arg=--no-credential-cache]

It starts `bitnet serve` on a fresh database, reads the keys it prints, starts one long
streamed completion, then sends requests on a fixed schedule (open loop: a slow answer does not
slow the schedule) from a few keep-alive connections per route. Standard library only.
"""

import argparse
import http.client
import json
import re
import subprocess
import sys
import threading
import time


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bitnet", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--database", default="sqlite:///tmp/bitnet-auth-bench.db")
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second per route")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", default="1", help="kernel threads of the server")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="one more argument for `bitnet serve` (e.g. --serve-arg=--no-credential-cache)")
    a = ap.parse_args()

    srv = subprocess.Popen(
        [a.bitnet, "serve", "-m", f"smol={a.model}", "--addr", "127.0.0.1:0", "--database", a.database,
         "--threads", a.threads, *a.serve_arg],
        stderr=subprocess.PIPE, text=True)
    addr = project = admin = None
    for line in srv.stderr:
        if m := re.search(r"http://([0-9.:]+)/v1", line):
            addr = m.group(1)
        if m := re.search(r"(sk-proj-\w+)", line):
            project = m.group(1)
        if m := re.search(r"(sk-admin-\w+)", line):
            admin = m.group(1)
        if line.startswith("try:"):
            break
    threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
    if not (addr and project and admin):
        sys.exit("the server printed no keys: use a fresh database")
    host, port = addr.split(":")

    def stream():
        # One generation at a time, for the whole run (a new one when one ends).
        while not stop.is_set():
            c = http.client.HTTPConnection(host, int(port), timeout=600)
            body = json.dumps({"model": "smol", "prompt": "Once upon a time", "max_tokens": 4096,
                               "stream": True, "temperature": 1.0})
            c.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {project}",
                                                        "Content-Type": "application/json"})
            r = c.getresponse()
            while not stop.is_set() and r.read(256):
                pass
            c.close()

    stop = threading.Event()
    threading.Thread(target=stream, daemon=True).start()
    time.sleep(1.0)

    routes = {"/v1/models": project, "/v1/organization/projects": admin}
    lat = {r: [] for r in routes}
    errors = {r: 0 for r in routes}
    lag = {r: 0.0 for r in routes}
    start = time.perf_counter() + 0.2
    n = int(a.rate * a.seconds)
    workers = 4

    def worker(route, key, k):
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in range(k, n, workers):
            due = start + i / a.rate
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            t = time.perf_counter()
            try:
                c.request("GET", route, headers={"Authorization": f"Bearer {key}"})
                r = c.getresponse()
                r.read()
                ok = r.status == 200
            except OSError:
                c = http.client.HTTPConnection(host, int(port), timeout=30)
                ok = False
            lat[route].append((time.perf_counter() - t) * 1000)
            lag[route] = max(lag[route], t - due)
            if not ok:
                errors[route] += 1

    ts = [threading.Thread(target=worker, args=(r, k, w)) for r, k in routes.items() for w in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    srv.terminate()
    srv.wait()
    backend = a.database.split(":")[0] + "".join(" " + x for x in a.serve_arg)
    for r in routes:
        xs = lat[r]
        print(f"{backend:8s} {r:28s} {a.rate:.0f} req/s x {a.seconds:.0f} s: "
              f"p50 {percentile(xs, 50):.2f} ms  p95 {percentile(xs, 95):.2f} ms  "
              f"p99 {percentile(xs, 99):.2f} ms  errors {errors[r]}  "
              f"(the client fell behind its schedule by at most {lag[r] * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
