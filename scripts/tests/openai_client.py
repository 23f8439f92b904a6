#!/usr/bin/env python3
"""Drive a running `bitnet serve` with the official `openai` Python client (unmodified: only
base_url and api_key are set), the way users point existing code at us.

    openai_client.py BASE_URL API_KEY MODEL

Checks, each with an assertion that can fail:
  * chat.completions and completions, non-streaming and streaming, with usage in both
    (stream_options.include_usage), the streamed text equal to the non-streamed text;
  * a chat's second turn reports the prompt tokens the prefix cache reused
    (usage.prompt_tokens_details.cached_tokens);
  * seeded sampling is reproducible; n choices; logprobs with top_logprobs;
  * errors arrive as the client's typed exceptions: 401 AuthenticationError, 404 NotFoundError
    (unknown model), 400 BadRequestError (bad parameters, context overflow, JSON mode),
    429 RateLimitError (a full queue: the --busy mode);
  * 16 concurrent streaming clients all finish, each with exactly the text the same request
    gives alone (continuous batching does not change results).
With --busy (against a server started with --max-batch 1 --queue 1), only checks that a burst
gets 429 RateLimitError with Retry-After while the admitted requests complete.
Prints one JSON line of findings at the end.
"""
import asyncio
import json
import sys
import time

import openai

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
found = {}

if "--busy" in sys.argv:
    # The server runs with --max-batch 1 --queue 1: of 6 simultaneous requests some must be
    # refused with 429 and a Retry-After header, and the rest complete.
    async def one(ac, i):
        try:
            r = await ac.completions.create(model=model, prompt=f"Count to {i}:", max_tokens=24, temperature=0)
            return r.choices[0].finish_reason
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after") == "1", e.response.headers
            return 429

    async def burst():
        async with openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(6)))

    got = asyncio.run(burst())
    assert 429 in got and any(g != 429 for g in got), got
    print(json.dumps({"busy": got}))
    sys.exit(0)

msgs = [{"role": "user", "content": "Name three colours."}]

# Chat, non-streaming.
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
text = r.choices[0].message.content
assert r.object == "chat.completion" and r.model == model, r
assert text and r.choices[0].finish_reason in ("stop", "length"), r
u = r.usage
assert u.prompt_tokens > 0 and u.completion_tokens > 0, u
assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u

# Chat, streaming with usage: same text, same usage.
parts, usage, finish = [], None, None
for chunk in client.chat.completions.create(
    model=model, messages=msgs, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, ("".join(parts), text)
assert usage is not None and usage.completion_tokens == u.completion_tokens, usage
assert finish == r.choices[0].finish_reason, finish
found["chat"] = text

# A chat's next turn starts with the previous turn's prompt: the server's prefix cache reuses it,
# and the client reads how much in usage.prompt_tokens_details.cached_tokens.
turn1 = [{"role": "system", "content": "You are a careful assistant who answers in one short sentence about colours and paint."},
         {"role": "user", "content": "What colour is the sky?"}]
r1 = client.chat.completions.create(model=model, messages=turn1, max_tokens=8, temperature=0)
turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "And grass?"}]
r2 = client.chat.completions.create(model=model, messages=turn2, max_tokens=8, temperature=0)
cached = r2.usage.prompt_tokens_details.cached_tokens
assert 16 <= cached < r2.usage.prompt_tokens, r2.usage
found["cached_tokens"] = cached

# Completions, both ways.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert c.object == "text_completion" and c.choices[0].text, c
assert c.usage.completion_tokens > 0, c.usage
parts, usage = [], None
for chunk in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    parts.extend(ch.text for ch in chunk.choices)
assert "".join(parts) == c.choices[0].text, ("".join(parts), c.choices[0].text)
assert usage is not None and usage.total_tokens == c.usage.total_tokens, usage
found["completion"] = c.choices[0].text

# Seeded sampling reproduces; n choices differ in index and come back complete.
kw = dict(model=model, messages=msgs, max_tokens=16, temperature=0.9, seed=1234)
a = client.chat.completions.create(**kw).choices[0].message.content
b = client.chat.completions.create(**kw).choices[0].message.content
assert a == b, (a, b)
many = client.chat.completions.create(n=3, **kw)
assert [ch.index for ch in many.choices] == [0, 1, 2], many
assert many.choices[0].message.content == a, (many.choices[0].message.content, a)

# Logprobs.
lp = client.chat.completions.create(model=model, messages=msgs, max_tokens=5, temperature=0,
                                    logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert len(content) >= 1 and all(len(t.top_logprobs) == 3 for t in content), content
# Greedy: the chosen token is the most likely one.
assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4 for t in content), content

# Typed errors.
def expect(exc, fn, what):
    try:
        fn()
    except exc as e:
        found.setdefault("errors", {})[what] = e.status_code
        return e
    raise AssertionError(f"{what}: no {exc.__name__}")

bad = openai.OpenAI(base_url=base, api_key="bnk_notarealkey000000000000000000000000000000", max_retries=0)
expect(openai.AuthenticationError, lambda: bad.models.list(), "bad key")
expect(openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model", messages=msgs), "unknown model")
expect(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=msgs, temperature=7), "temperature")
expect(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=msgs, max_tokens=10**9), "huge max_tokens")
expect(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=msgs, response_format={"type": "json_object"}), "json mode")
expect(openai.BadRequestError, lambda: client.completions.create(model=model, prompt="x " * 20000, max_tokens=4), "prompt too long")
assert [m.id for m in client.models.list().data] == [model]

# 16 concurrent streams, each compared with the same request run alone.
prompts = [f"Write a sentence about the number {i}." for i in range(16)]

async def stream_one(ac, i):
    out = []
    s = await ac.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=32,
        temperature=0.8, seed=i, stream=True)
    async for chunk in s:
        for ch in chunk.choices:
            if ch.delta.content:
                out.append(ch.delta.content)
    return "".join(out)

async def concurrent():
    async with openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0) as ac:
        together = await asyncio.gather(*(stream_one(ac, i) for i in range(16)))
        alone = [await stream_one(ac, i) for i in range(16)]
    return together, alone

together, alone = asyncio.run(concurrent())
for i in range(16):
    assert together[i] == alone[i], (i, together[i], alone[i])
found["concurrent_identical"] = 16

print(json.dumps(found))
