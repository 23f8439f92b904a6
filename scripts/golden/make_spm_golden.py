#!/usr/bin/env python3
"""A tiny LLaMA-style SentencePiece vocabulary in a GGUF, and what transformers and sentencepiece
make of it.

    python make_spm_golden.py [--out-root DIR]

Pinned stack: requirements.txt plus requirements-spm.txt (sentencepiece). Default output root:
<repo>/testdata. Deterministic: two runs give byte-identical files.

Writes
  models/tiny-llama-spm/tiny-llama-spm.gguf   arch llama, no tensors; the tokenizer as llama.cpp's
        convert_hf_to_gguf.py writes a SentencePiece vocabulary (TextModel._set_vocab_sentencepiece /
        _create_vocab_sentencepiece): tokenizer.ggml.model = "llama", tokenizer.ggml.pre = "default",
        tokens = IdToPiece(i) as UTF-8 (the U+2581 "▁" kept), scores = GetScore(i) (f32), token_type
        = 2 UNKNOWN / 3 CONTROL / 5 UNUSED / 6 BYTE / 1 NORMAL (checked in that order), then
        gguf.SpecialVocab's bos/eos/unk ids and add_bos_token / add_eos_token (true / false, as
        LLaMA-2's tokenizer_config.json says). No merges (SentencePiece BPE has none to write).
  golden/spm/tiny-llama-spm.model    the SentencePiece model the GGUF was made from
  golden/spm/tokenizer_golden.json   ~35 texts -> transformers ids (with and without special
        tokens), tokens, decodes; the same through sentencepiece; the differences; the backend
        (tokenizers) JSON transformers built; special tokens.

The vocabulary is trained here with LLaMA-2's trainer settings (its tokenizer.model's
trainer_spec/normalizer_spec: model_type BPE, byte_fallback, split_digits, add_dummy_prefix,
remove_extra_whitespaces false, identity normalization, allow_whitespace_only_pieces, unk/bos/eos =
0/1/2, no pad) on testdata/text/tiny.txt plus the EXTRA_CORPUS lines below, with vocab_size 600.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = "scripts/golden/make_spm_golden.py"
NAME = "tiny-llama-spm"
VOCAB_SIZE = 600

# llama.cpp's SentencePieceTokenTypes (gguf.TokenType): values written to tokenizer.ggml.token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Added to tiny.txt (which has no digits and only ASCII): digits, accents, a little CJK and emoji,
# so that the vocabulary has pieces for some of them and byte fallback covers the rest.
EXTRA_CORPUS = [
    "In 2024 the village counted 1,234 people and 56 cows; the road was 3.5 km long.",
    "Call 555-0199 before 10:30, or write to room 42 on floor 7.",
    "The years 1999, 2000 and 2001 were dry; 2002 was wet.",
    "The café served crème brûlée, and the naïve résumé mentioned déjà vu.",
    "Grüße aus München und Zürich, señor; ça va très bien.",
    "Ångström units are small: 1 Å is 0.1 nm.",
    "日本語の文章と中文的句子。",
    "Emoji make people smile 😀 and cheer 🎉 at parties 😀.",
    "Tabs\tand  double  spaces   appear here.",
]

TEXTS = [
    "",
    " ",
    "a",
    "Hello world",
    "The morning began with a thin layer of fog over the valley.",
    " leading single space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "\n",
    "line one\nline two\n\nline four\n",
    "\ttab\tseparated\t",
    "12345678",
    "I have 123 apples and 4567 oranges.",
    "3.14159 2024-01-01 1,000,000",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m e\u0301",
    "Gr\u00fc\u00dfe aus M\u00fcnchen",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587\u6d4b\u8bd5\uff0c\u6807\u70b9\u3002",
    "\ud55c\uad6d\uc5b4",
    "emoji \U0001F917\U0001F680\U0001F44D\U0001F3FD and ZWJ \U0001F468\u200D\U0001F469\u200D\U0001F467",
    "smile \U0001F600 cheer \U0001F389",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439",
    "<s>",
    "</s>",
    "<unk>",
    "<s>Hello</s>",
    "text with <s> inside and </s> end",
    "rare: \u0007 bell \ufffd replacement \U0001D54F math \ue000 private",
    "don't won't I'm",
    "https://example.com/path?q=1&r=2#frag",
    "\u00a0nbsp\u2003emspace\u3000ideographic",
    "\u2581 literal metaspace \u2581\u2581x",
    "<0x41> looks like a byte token",
    "MiXeD CASE, UPPER lower",
]


# id sequences decoded only: byte-fallback tokens that do not form valid UTF-8 (a cut emoji, a lone
# continuation byte, 0xFF), and one mixed with a normal piece; given as token strings, mapped to ids.
DECODE_ONLY = [
    ["<0xF0>", "<0x9F>"],
    ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"],
    ["<0x80>"],
    ["<0xFF>"],
    ["<0xC3>", "\u2581the"],
    ["\u2581the", "<0xC3>", "<0xA9>", "<s>", "\u2581the", "</s>"],
]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def pkg_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def train(text_path: Path) -> bytes:
    lines = [ln for ln in text_path.read_text(encoding="utf-8").splitlines() if ln.strip()] + EXTRA_CORPUS
    spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf,
        model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        character_coverage=0.99995, max_sentencepiece_length=16,
        split_by_unicode_script=True, split_by_number=True, split_by_whitespace=True,
        treat_whitespace_as_suffix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, minloglevel=2,
    )
    return buf.getvalue()


def vocab_from_sp(sp: spm.SentencePieceProcessor) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types as llama.cpp's converter derives them from a SentencePiece model."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            t = UNKNOWN
        elif sp.is_control(i):
            t = CONTROL
        elif sp.is_unused(i):
            t = UNUSED
        elif sp.is_byte(i):
            t = BYTE
        else:
            t = NORMAL
        types.append(t)
    return tokens, scores, types


def write_gguf(path: Path, tokens: list[bytes], scores: list[float], types: list[int],
               add_space_prefix: bool | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(NAME)
    # llama hyperparameters: transformers builds a LlamaConfig from them before it picks the
    # tokenizer class; there are no tensors (the tokenizer needs none).
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    # tokenizer, in the order convert_hf_to_gguf.py writes it
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if add_space_prefix is not None:  # llama.cpp's converter does not write it for LLaMA; only the scratch check
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_gguf(path: Path, tokens, scores, types) -> dict:
    r = gguf.GGUFReader(str(path))
    f = r.fields
    got_tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]) for i in f["tokenizer.ggml.tokens"].data]
    got_scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
    got_types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    assert got_tokens == tokens and got_types == types
    assert np.array_equal(np.array(got_scores, np.float32), np.array(scores, np.float32))
    assert len(r.tensors) == 0
    return {"keys": [k for k in f if not k.startswith("GGUF.")],
            "scores_f32_exact": bool(np.array_equal(np.array(scores, np.float32).astype(np.float64),
                                                    np.array(scores, np.float64)))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO_ROOT / "testdata")
    ap.add_argument("--text", type=Path, default=REPO_ROOT / "testdata" / "text" / "tiny.txt")
    args = ap.parse_args()

    proto = train(args.text)
    assert proto == train(args.text), "sentencepiece training is not deterministic"
    sp = spm.SentencePieceProcessor(model_proto=proto)
    tokens, scores, types = vocab_from_sp(sp)
    assert tokens[:3] == [b"<unk>", b"<s>", b"</s>"] and types[:3] == [UNKNOWN, CONTROL, CONTROL]
    assert types[3:259] == [BYTE] * 256 and tokens[3] == b"<0x00>" and tokens[258] == b"<0xFF>"

    model_dir = args.out_root / "models" / NAME
    gguf_path = model_dir / f"{NAME}.gguf"
    gold_dir = args.out_root / "golden" / "spm"
    gold_dir.mkdir(parents=True, exist_ok=True)
    (gold_dir / f"{NAME}.model").write_bytes(proto)
    write_gguf(gguf_path, tokens, scores, types)
    gguf_facts = check_gguf(gguf_path, tokens, scores, types)

    tok = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_path.name)
    backend = json.loads(tok.backend_tokenizer.to_str())

    # the merges transformers derived (the GGUF has none) vs the order of the BPE pieces
    merges = backend["model"]["merges"]
    cases, diffs = [], []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        ids_sp = tok.encode(text, add_special_tokens=True)
        sp_ids = sp.encode(text)
        sp_ids_bos = sp.encode(text, add_bos=True)
        case = {
            "text": text,
            "ids": ids,
            "ids_add_special": ids_sp,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decode": tok.decode(ids),
            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
            "decode_add_special": tok.decode(ids_sp),
            "decode_add_special_skip_special": tok.decode(ids_sp, skip_special_tokens=True),
            "sentencepiece": {
                "ids": sp_ids,
                "ids_add_bos": sp_ids_bos,
                "pieces": sp.encode(text, out_type=str),
                "decode": sp.decode(sp_ids),
            },
        }
        d = {}
        if ids != sp_ids:
            d["ids"] = True
        if ids_sp != sp_ids_bos:
            d["ids_add_special_vs_add_bos"] = True
        if tok.decode(ids, skip_special_tokens=True) != sp.decode(sp_ids):
            d["decode"] = True
        if case["decode_skip_special"] != text:
            d["transformers_decode_not_roundtrip"] = True
        if sp.decode(sp_ids) != text:
            d["sentencepiece_decode_not_roundtrip"] = True
        case["differences"] = d
        if d:
            diffs.append({"text": text, **d})
        cases.append(case)

    # agreement beyond the listed texts: every corpus line, and seeded random strings over a mixed
    # alphabet, none starting with a space or holding special-token text
    rng = np.random.default_rng(0x5B_0001)
    alphabet = list("abcdefghijklmnopqrstuvwxyzTHE ,.;0123456789\n\t") + list("\u00e9\u00fc\u00df\u65e5\u672c") + ["\U0001F600"]
    extra = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 40)))) for _ in range(300)]
    corpus = [ln for ln in args.text.read_text(encoding="utf-8").splitlines() if ln.strip()] + EXTRA_CORPUS
    agree = {"n": 0, "ids_equal": 0, "mismatches": []}
    for text in corpus + extra:
        if text[:1].isspace():
            text = "x" + text
        agree["n"] += 1
        a, b = tok.encode(text, add_special_tokens=False), sp.encode(text)
        if a == b:
            agree["ids_equal"] += 1
        elif len(agree["mismatches"]) < 10:
            agree["mismatches"].append({"text": text, "transformers": a, "sentencepiece": b})

    vocab_ids = tok.get_vocab()
    decode_only = []
    for toks in DECODE_ONLY:
        ids = [vocab_ids[t] for t in toks]
        decode_only.append({"tokens": toks, "ids": ids, "decode": tok.decode(ids),
                            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
                            "sentencepiece_decode": sp.decode(ids)})

    # tokenizer.ggml.add_space_prefix = false: does transformers read it? (a scratch GGUF, not kept)
    with tempfile.TemporaryDirectory() as tmp:
        p2 = Path(tmp) / "noprefix.gguf"
        write_gguf(p2, tokens, scores, types, add_space_prefix=False)
        tok2 = AutoTokenizer.from_pretrained(tmp, gguf_file=p2.name)
        b2 = json.loads(tok2.backend_tokenizer.to_str())
        add_space_prefix_false = {
            "backend_identical": b2 == backend,
            "pre_tokenizer": b2["pre_tokenizer"],
            "ids_Hello_world": tok2.encode("Hello world", add_special_tokens=False),
        }

    special = {role: {"token": getattr(tok, f"{role}_token"), "id": getattr(tok, f"{role}_token_id")}
               for role in ("bos", "eos", "unk", "pad")}
    doc = {
        "generator": GENERATOR,
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "sentencepiece": spm.__version__, "gguf": pkg_version("gguf")},
        "gguf_file": f"testdata/models/{NAME}/{gguf_path.name}",
        "gguf_sha256": sha256(gguf_path.read_bytes()),
        "gguf_keys": gguf_facts["keys"],
        "sentencepiece_model": f"testdata/golden/spm/{NAME}.model",
        "sentencepiece_model_sha256": sha256(proto),
        "trainer": {"model_type": "bpe", "vocab_size": VOCAB_SIZE, "byte_fallback": True, "split_digits": True,
                    "add_dummy_prefix": True, "remove_extra_whitespaces": False,
                    "normalization_rule_name": "identity", "allow_whitespace_only_pieces": True,
                    "character_coverage": 0.99995, "unk/bos/eos/pad": [0, 1, 2, -1],
                    "corpus": "testdata/text/tiny.txt (non-empty lines) + EXTRA_CORPUS in the script"},
        "vocab": {"size": len(tokens),
                  "token_type_counts": {str(t): types.count(t) for t in sorted(set(types))},
                  "first_normal_id": types.index(NORMAL),
                  "score_of_first_normal": scores[types.index(NORMAL)],
                  "scores_special_and_byte": sorted({scores[i] for i in range(259)}),
                  "normal_scores_strictly_decreasing": all(
                      scores[i] > scores[i + 1] for i in range(259, len(tokens) - 1)
                      if types[i] == NORMAL and types[i + 1] == NORMAL)},
        "loader": "transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)",
        "tokenizer_class": type(tok).__name__,
        "vocab_size": tok.vocab_size,
        "len_tokenizer": len(tok),
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": tok.add_eos_token,
        "special_tokens": special,
        "all_special_tokens": list(tok.all_special_tokens),
        "added_tokens": backend.get("added_tokens"),
        "backend": {k: backend.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
        "backend_model": {k: v for k, v in backend["model"].items() if k not in ("vocab", "merges")},
        "backend_n_merges": len(merges),
        "backend_tokenizer_json": backend,
        "differences": diffs,
        "agreement_without_leading_space_or_special_text": agree,
        "gguf_add_space_prefix_false": add_space_prefix_false,
        "decode_only": decode_only,
        "cases": cases,
    }
    out = gold_dir / "tokenizer_golden.json"
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: doc[k] for k in ("tokenizer_class", "vocab_size", "len_tokenizer", "add_bos_token",
                                          "add_eos_token", "special_tokens", "backend", "backend_model",
                                          "backend_n_merges", "vocab")}, indent=1, ensure_ascii=False))
    print("agreement:", json.dumps({k: v for k, v in agree.items() if k != "mismatches"}),
          json.dumps(agree["mismatches"][:3], ensure_ascii=False))
    print("add_space_prefix=false:", json.dumps(add_space_prefix_false, ensure_ascii=False))
    for d in decode_only:
        print("decode_only:", json.dumps(d, ensure_ascii=False))
    print(f"{len(diffs)} texts differ:")
    for d in diffs:
        print("  ", json.dumps(d, ensure_ascii=False))
    for p in (gguf_path, gold_dir / f"{NAME}.model", out):
        print(f"{p.stat().st_size:>9}  {sha256(p.read_bytes())[:16]}  {p.relative_to(args.out_root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
