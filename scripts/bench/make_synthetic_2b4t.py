#!/usr/bin/env python3
"""Write a synthetic Hugging Face BitNet b1.58 directory with exactly the 2B-4T shapes.

The output is a model directory that `bitnet convert`, transformers' BitNet loader and the
GGUF converters of other engines read like microsoft/bitnet-b1.58-2B-4T, but with random
weights (fixed seed, so every run writes the same bytes) and a synthetic tokenizer. It exists
for speed comparisons on real shapes without downloading the real checkpoint: the text such a
model generates is gibberish.

What it writes into --out:
  config.json                 2B-4T hyper-parameters (hidden 2560, 30 layers, 20 heads, 5 KV heads,
                              FFN 6912, vocab 128256, relu2, rope_theta 500000, tied embeddings,
                              bfloat16). The linear layers are float master weights, declared as
                              quantization_config {quant_method: bitnet, linear_class:
                              autobitlinear, quantization_mode: online}: they are ternarized
                              (absmean) at load/convert time, not stored packed like the real
                              2B-4T (`bitlinear`, `offline`, uint8 + weight_scale).
  model-0000N-of-0000M.safetensors + model.safetensors.index.json
                              (or one model.safetensors when everything fits one shard):
                              BF16 tensors under the HF BitNet names, written tensor by tensor in
                              row blocks, so memory stays at a few hundred MB.
  tokenizer.json              byte-level BPE with 128000 regular tokens (256 byte symbols +
                              127744 deterministic synthetic merges) and Llama 3's 256 special
                              tokens (<|begin_of_text|> = 128000, <|end_of_text|> = 128001, ...):
                              128256 in all, so GGUF converters can embed a loadable vocabulary.
  tokenizer_config.json       bos/eos tokens, add_bos_token = true.
  generation_config.json      bos/eos ids.

Usage:
  python3 -m venv venv && venv/bin/pip install numpy safetensors tokenizers
  venv/bin/python scripts/bench/make_synthetic_2b4t.py --out /tmp/synth-2b4t
  venv/bin/python scripts/bench/make_synthetic_2b4t.py --out /tmp/synth-2l --layers 2   # quick test
  bitnet convert /tmp/synth-2b4t -o synth-i2_s.gguf --to i2_s

Options:
  --out DIR          output directory (created; existing files in it are overwritten)
  --layers N         number of transformer layers (default 30, the 2B-4T value)
  --seed S           random seed (default 0)
  --shard-gb G       maximum shard size in GB (default 2.0)
  --no-verify        skip re-reading the result with safetensors/tokenizers

Only numpy is required to write; safetensors and tokenizers (if installed) are used to verify
the result. Python 3.9+.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import numpy as np

# microsoft/bitnet-b1.58-2B-4T
HIDDEN = 2560
LAYERS = 30
HEADS = 20
KV_HEADS = 5
FFN = 6912
VOCAB = 128256
N_REGULAR = 128000  # Llama 3: regular BPE tokens; ids 128000..128255 are special
MAX_POS = 4096
BOS_ID = 128000
EOS_ID = 128001
HEAD_DIM = HIDDEN // HEADS
KV_DIM = KV_HEADS * HEAD_DIM

LINEAR_STD = 0.02  # transformers' initializer_range
EMBED_STD = 0.02
NORM_JITTER = 0.02  # norm weights are 1 + N(0, jitter)
BLOCK_ELEMS = 1 << 23  # values generated per block (8M floats = 32 MB)

# Llama 3's pre-tokenizer split pattern.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def config(n_layers: int) -> dict:
    return {
        "architectures": ["BitNetForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "relu2",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": MAX_POS,
        "model_type": "bitnet",
        "num_attention_heads": HEADS,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": KV_HEADS,
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def tensor_specs(n_layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in Hugging Face order; kind is embed, linear or norm."""
    specs = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "embed")]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (HIDDEN,), "norm"),
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN), "linear"),
            (f"{p}.self_attn.k_proj.weight", (KV_DIM, HIDDEN), "linear"),
            (f"{p}.self_attn.v_proj.weight", (KV_DIM, HIDDEN), "linear"),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN), "linear"),
            (f"{p}.self_attn.attn_sub_norm.weight", (HIDDEN,), "norm"),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,), "norm"),
            (f"{p}.mlp.gate_proj.weight", (FFN, HIDDEN), "linear"),
            (f"{p}.mlp.up_proj.weight", (FFN, HIDDEN), "linear"),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, FFN), "linear"),
            (f"{p}.mlp.ffn_sub_norm.weight", (FFN,), "norm"),
        ]
    specs.append(("model.norm.weight", (HIDDEN,), "norm"))
    return specs


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def tensor_blocks(name: str, shape: tuple[int, ...], kind: str, seed: int):
    """Yield the tensor's BF16 bytes in row blocks. Each tensor has its own generator, seeded by
    (seed, crc32(name)), so a tensor's values do not depend on --layers or on write order."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n = int(np.prod(shape))
    cols = shape[-1]
    rows_per_block = max(1, BLOCK_ELEMS // cols)
    done = 0
    while done < n:
        count = min(rows_per_block * cols, n - done)
        v = rng.standard_normal(count, dtype=np.float32)
        if kind == "norm":
            v = 1.0 + NORM_JITTER * v
        else:
            v *= EMBED_STD if kind == "embed" else LINEAR_STD
        yield f32_to_bf16(v).tobytes()
        done += count


def write_safetensors(out: str, specs, seed: int, shard_bytes: int) -> list[str]:
    """Write the tensors into shards of at most shard_bytes (a tensor is never split)."""
    shards: list[list] = [[]]
    size = 0
    for s in specs:
        nbytes = int(np.prod(s[1])) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    m = len(shards)
    names = (
        ["model.safetensors"]
        if m == 1
        else [f"model-{i + 1:05d}-of-{m:05d}.safetensors" for i in range(m)]
    )
    weight_map = {}
    total = 0
    for fname, group in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape, _ in group:
            nbytes = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[name] = fname
        hjson = json.dumps(header, separators=(",", ":")).encode()
        hjson += b" " * (-len(hjson) % 8)  # data starts 8-byte aligned
        path = os.path.join(out, fname)
        t0 = time.time()
        with open(path + ".tmp", "wb") as f:
            f.write(len(hjson).to_bytes(8, "little"))
            f.write(hjson)
            for name, shape, kind in group:
                for chunk in tensor_blocks(name, shape, kind, seed):
                    f.write(chunk)
        os.replace(path + ".tmp", path)
        total += off
        print(f"  {fname}: {len(group)} tensors, {off / 1e9:.2f} GB, {time.time() - t0:.1f} s", flush=True)
    if m > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    else:
        stale = os.path.join(out, "model.safetensors.index.json")
        if os.path.exists(stale):
            os.remove(stale)
    return names


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def special_tokens() -> list[str]:
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + VOCAB - N_REGULAR - len(named))]
    return named + reserved


def synthetic_bpe(seed: int) -> tuple[dict[str, int], list[str]]:
    """256 byte symbols plus N_REGULAR - 256 merges. Every merge joins two existing tokens into a
    new one (so the vocabulary is a valid BPE), biased towards word-like pieces: lowercase runs,
    optionally with a leading space (the byte-level 'Ġ'), capitalised words and digit pairs."""
    b2u = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[b2u[b]] = b
    rng = np.random.default_rng([seed, 0xB9E])
    lower = [b2u[c] for c in b"abcdefghijklmnopqrstuvwxyz"]
    # rough English letter frequencies, so frequent pairs come first
    freq = np.array([8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.2, 0.8, 4.0, 2.4,
                     6.7, 7.5, 1.9, 0.1, 6.0, 6.3, 9.1, 2.8, 1.0, 2.4, 0.2, 2.0, 0.1])
    freq /= freq.sum()
    upper = [b2u[c] for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    digits = [b2u[c] for c in b"0123456789"]
    punct = [b2u[c] for c in b".,;:!?'\"()-"]
    space, newline = b2u[ord(" ")], b2u[ord("\n")]
    merges: list[str] = []
    pieces: list[str] = []  # merged tokens without a leading space, extendable on the right

    def add(a: str, b: str) -> bool:
        t = a + b
        if t in vocab:
            return False
        vocab[t] = len(vocab)
        merges.append(f"{a} {b}")
        return True

    # fixed early merges: spaced letters, newline runs, digit pairs, spaced punctuation
    for c in lower + upper:
        add(space, c)
    add(newline, newline)
    add(space, space)
    for d1 in digits:
        for d2 in digits:
            add(d1, d2)
    for p in punct:
        add(space, p)
    target = N_REGULAR
    while len(vocab) < target:
        r = rng.random()
        if r < 0.55 or not pieces:
            # extend a lowercase piece (with or without a leading space) by one letter
            if pieces and rng.random() < 0.8:
                a = pieces[int(rng.integers(len(pieces)))]
            else:
                a = lower[int(rng.choice(26, p=freq))]
            b = lower[int(rng.choice(26, p=freq))]
            if add(a, b):
                pieces.append(a + b)
        elif r < 0.80:
            # give an existing piece a leading space: 'Ġ' + 'x...' needs 'Ġx' then rest; join
            # the spaced first letter with the remainder when the remainder is a token
            a = pieces[int(rng.integers(len(pieces)))]
            head, rest = space + a[0], a[1:]
            if rest and rest in vocab:
                if add(head, rest):
                    pieces.append(head + rest)
        elif r < 0.92:
            # capitalised word: 'X' + piece
            a = upper[int(rng.integers(26))]
            b = pieces[int(rng.integers(len(pieces)))]
            add(a, b)
        else:
            # piece + punctuation
            a = pieces[int(rng.integers(len(pieces)))]
            add(a, punct[int(rng.integers(len(punct)))])
    assert len(vocab) == N_REGULAR and len(merges) == N_REGULAR - 256
    return vocab, merges


def write_tokenizer(out: str, seed: int) -> None:
    vocab, merges = synthetic_bpe(seed)
    added = [
        {
            "id": N_REGULAR + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(special_tokens())
    ]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [BOS_ID], "tokens": ["<|begin_of_text|>"]}
            },
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    tcfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POS,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in added
        },
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)


def verify(out: str, specs, names: list[str]) -> None:
    try:
        from safetensors import safe_open
    except ImportError:
        print("  (safetensors not installed: skipping the tensor check)")
    else:
        want = {n: s for n, s, _ in specs}
        seen = {}
        for fname in names:
            with safe_open(os.path.join(out, fname), framework="numpy") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    seen[k] = (tuple(sl.get_shape()), sl.get_dtype())
        assert set(seen) == set(want), "tensor names differ"
        for n, s in want.items():
            assert seen[n] == (s, "BF16"), (n, seen[n], s)
        print(f"  safetensors: {len(seen)} tensors, names/shapes/dtypes as specified")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("  (tokenizers not installed: skipping the tokenizer check)")
    else:
        t = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
        assert t.get_vocab_size(with_added_tokens=True) == VOCAB, t.get_vocab_size(True)
        text = "The quick brown fox jumps over the lazy dog 1234.\nHello, World!"
        enc = t.encode(text)
        assert enc.ids[0] == BOS_ID
        assert t.decode(enc.ids, skip_special_tokens=True) == text
        print(f"  tokenizer: {t.get_vocab_size(True)} tokens; {len(enc.ids)} ids for a {len(text)}-char sample, round trip ok")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--layers", type=int, default=LAYERS, help="transformer layers (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size in GB (default 2)")
    ap.add_argument("--no-verify", action="store_true", help="skip the read-back check")
    a = ap.parse_args()
    if a.layers < 1:
        ap.error("--layers must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config(a.layers), f, indent=2)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}, f, indent=2)
    print("tokenizer ...", flush=True)
    write_tokenizer(a.out, a.seed)
    specs = tensor_specs(a.layers)
    n_params = sum(int(np.prod(s)) for _, s, _ in specs)
    print(f"weights: {len(specs)} tensors, {n_params / 1e9:.3f} B parameters (BF16) ...", flush=True)
    names = write_safetensors(a.out, specs, a.seed, int(a.shard_gb * 1e9))
    if not a.no_verify:
        print("verify ...", flush=True)
        verify(a.out, specs, names)
    print(f"done in {time.time() - t0:.1f} s: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
