#!/usr/bin/env python3
"""Fairness of `bitnet serve` under heavy requests, measured from a second process on loopback.

    serve-fairness.py BASE_URL API_KEY MODEL [--long-words 1500] [--rounds 3] [--big-prompts 8]

Two measurements, each repeated `--rounds` times (medians printed):

* **TTFT behind a long prefill.** A streaming completion with a long prompt (`--long-words`
  words, max_tokens 1) starts; 0.3 s later a 4-token chat asks for one token. Printed: the
  short request's time to first token, and the long prompt's own time to first token.
* **/healthz while huge prompts are tokenized.** `--big-prompts` concurrent completions, each
  with a ~900 kB prompt (refused after tokenization as too long for the context), while
  /healthz is polled every 50 ms; printed: the slowest and median /healthz answer.

Standard library only (http.client and threads), so it runs from any Python 3.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlparse

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("key")
ap.add_argument("model")
ap.add_argument("--long-words", type=int, default=1500)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--big-prompts", type=int, default=8)
args = ap.parse_args()
u = urlparse(args.base)
HOST, PORT, PREFIX = u.hostname, u.port, u.path.rstrip("/")


def post(path, body, stream=False):
    c = http.client.HTTPConnection(HOST, PORT, timeout=600)
    c.request("POST", PREFIX + path, json.dumps(body),
              {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"})
    return c, c.getresponse()


def first_token(path, body):
    """Seconds from sending to the first SSE data line (or the whole answer when not streamed)."""
    t0 = time.perf_counter()
    c, r = post(path, body, stream=body.get("stream", False))
    if body.get("stream"):
        # The first chunk that carries text (a chat stream opens with an empty role chunk).
        while True:
            line = r.fp.readline()
            if not line:
                break
            if line.startswith(b"data: {"):
                ch = json.loads(line[6:]).get("choices") or [{}]
                c0 = ch[0]
                if c0.get("text") or (c0.get("delta") or {}).get("content"):
                    break
        # The rest is not needed (one token was asked for): the raw lines read above left the
        # chunked decoder behind, so the connection is just closed.
        dt = time.perf_counter() - t0
    else:
        r.read()
        dt = time.perf_counter() - t0
    c.close()
    return dt


def ttft_round(i):
    # A different first word each round: no round reuses another's prompt from the prefix cache.
    words = f"Round {i}: " + " ".join(["river"] * args.long_words)
    out = {}

    def long():
        out["long"] = first_token("/completions", {
            "model": args.model, "prompt": words, "max_tokens": 1, "stream": True, "temperature": 0})

    t = threading.Thread(target=long)
    t.start()
    time.sleep(0.3)
    out["short"] = first_token("/chat/completions", {
        "model": args.model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 1,
        "stream": True, "temperature": 0})
    t.join()
    return out


def healthz_round():
    stop = threading.Event()
    lat = []

    def poll():
        while not stop.is_set():
            c = http.client.HTTPConnection(HOST, PORT, timeout=600)
            t0 = time.perf_counter()
            c.request("GET", "/healthz")
            c.getresponse().read()
            lat.append(time.perf_counter() - t0)
            c.close()
            time.sleep(0.05)

    p = threading.Thread(target=poll)
    p.start()
    big = "word " * 180_000
    ts = [threading.Thread(target=lambda: post("/completions", {
        "model": args.model, "prompt": big, "max_tokens": 1})[1].read()) for _ in range(args.big_prompts)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    p.join()
    return max(lat), statistics.median(lat)


rounds = [ttft_round(i) for i in range(args.rounds)]
short = [r["short"] for r in rounds]
long_ = [r["long"] for r in rounds]
print("short request TTFT behind a %d-word prompt: %.3f s median (%s); the long prompt's TTFT %.3f s"
      % (args.long_words, statistics.median(short), ", ".join("%.3f" % v for v in short),
         statistics.median(long_)))
hz = [healthz_round() for _ in range(args.rounds)]
print("/healthz during %d concurrent ~900 kB prompts: slowest %.1f ms median of rounds (%s), median answer %.1f ms"
      % (args.big_prompts, statistics.median(h[0] for h in hz) * 1000,
         ", ".join("%.1f" % (h[0] * 1000) for h in hz), statistics.median(h[1] for h in hz) * 1000))
