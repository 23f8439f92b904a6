#!/usr/bin/env python3
"""Write a 128-token byte-level BPE tokenizer with a ChatML template, for the tiny BitNet test
models whose vocabulary has 128 entries (testdata/models/tiny-bitnet-c-float).

Standard library only. The tokenizer covers the space, the newline and the printable ASCII
characters (other bytes are dropped, as a byte-level BPE without them does), has three special
tokens and 29 merges of common English pairs, so it can chat with a model of that vocabulary
through `bitnet serve`. The files follow Hugging Face `tokenizers`' tokenizer.json format and
transformers' tokenizer_config.json.

    python3 scripts/golden/make_tiny_tokenizer.py  # writes testdata/tokenizers/tiny-chat-128/
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parents[2] / "testdata" / "tokenizers" / "tiny-chat-128"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# GPT-2's byte-level alphabet spells the space as U+0120 and the newline as U+010A; printable
# ASCII stands for itself.
SYMBOLS = ["\u0120", "\u010a"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]
SP = "\u0120"
MERGES = [
    (SP, "t"), ("h", "e"), (SP, "a"), ("i", "n"), ("e", "r"), ("a", "n"), (SP, "s"), ("o", "n"),
    ("r", "e"), (SP, "w"), ("n", "d"), ("a", "t"), ("e", "n"), (SP, "o"), ("i", "s"), ("o", "r"),
    ("e", "s"), ("i", "t"), ("o", "u"), (SP, "b"), (SP, "m"), ("e", "d"), (SP, "h"), (SP, "c"),
    ("a", "r"), (SP, "f"), (SP, "I"), (SP + "t", "h"), (SP + "th", "e"),
]


def main() -> None:
    vocab = {}
    for tok in SPECIAL + SYMBOLS + [a + b for a, b in MERGES]:
        vocab.setdefault(tok, len(vocab))
    assert len(vocab) == 128, len(vocab)
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(SPECIAL)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in MERGES]},
    }
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                         "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1, ensure_ascii=False) + "\n")
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
