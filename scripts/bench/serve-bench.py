#!/usr/bin/env python3
"""Batching benchmark for `bitnet serve`: aggregate generation speed of N concurrent streaming
clients against one stream alone, on the same server and model, in one run.

    serve-bench.py BASE_URL API_KEY MODEL [--streams 16] [--max-tokens 128] [--rounds 3]

Each client streams /v1/completions (temperature 0.8, its own seed) and counts the tokens the
server reports in `usage`. One stream's speed is its tokens over the time from its first to
its last token; the aggregate is all tokens over the time from the first client's start to the
last client's end. Also reports time to first token (TTFT) and inter-token latency (ITL,
between content chunks) percentiles. Needs the `openai` package (scripts/golden/requirements-ci.txt).
"""
import argparse
import asyncio
import json
import statistics
import time

import openai

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("key")
ap.add_argument("model")
ap.add_argument("--streams", type=int, default=16)
ap.add_argument("--max-tokens", type=int, default=128)
ap.add_argument("--rounds", type=int, default=3)
args = ap.parse_args()


async def one(ac, seed):
    t0 = time.perf_counter()
    first = last = None
    stamps, tokens = [], 0
    s = await ac.completions.create(
        model=args.model, prompt=f"Story {seed}: Once upon a time", max_tokens=args.max_tokens,
        temperature=0.8, seed=seed, stream=True, stream_options={"include_usage": True})
    async for chunk in s:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if any(c.text for c in chunk.choices):
            first = first or now
            last = now
            stamps.append(now)
    return {"start": t0, "first": first, "last": last, "tokens": tokens, "stamps": stamps}


async def run(n):
    async with openai.AsyncOpenAI(base_url=args.base, api_key=args.key, max_retries=0, timeout=600) as ac:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(ac, 1000 + i) for i in range(n)))
        t1 = time.perf_counter()
    total = sum(r["tokens"] for r in res)
    itl = [b - a for r in res for a, b in zip(r["stamps"], r["stamps"][1:])]
    ttft = [r["first"] - r["start"] for r in res if r["first"]]
    return {
        "tokens": total,
        "wall_s": t1 - t0,
        "aggregate_tok_s": total / (t1 - t0),
        "per_stream_tok_s": statistics.median(
            (r["tokens"] - 1) / (r["last"] - r["first"]) for r in res if r["last"] and r["last"] > r["first"]),
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "itl_p50_ms": 1000 * statistics.median(itl) if itl else None,
        "itl_p95_ms": 1000 * statistics.quantiles(itl, n=20)[18] if len(itl) > 20 else None,
    }


asyncio.run(run(1))  # warm-up
rows = []
for r in range(args.rounds):
    single = asyncio.run(run(1))
    many = asyncio.run(run(args.streams))
    ratio = many["aggregate_tok_s"] / single["aggregate_tok_s"]
    rows.append({"round": r + 1, "single": single, "concurrent": many, "ratio": ratio})
    print(f"round {r + 1}: 1 stream {single['aggregate_tok_s']:.1f} tok/s; "
          f"{args.streams} streams {many['aggregate_tok_s']:.1f} tok/s aggregate "
          f"({many['per_stream_tok_s']:.1f} each, TTFT p50 {many['ttft_p50_ms']:.0f} ms, "
          f"ITL p50 {many['itl_p50_ms']:.0f} ms): {ratio:.2f}x", flush=True)
print(json.dumps({"median_ratio": statistics.median(r["ratio"] for r in rows), "rounds": rows}))
