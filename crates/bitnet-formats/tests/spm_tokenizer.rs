//! GGUF SentencePiece tokenizers (`tokenizer.ggml.model = llama`: LLaMA 1/2, Mistral, the older
//! BitNet GGUFs) against transformers, which rebuilds them as `LlamaTokenizer`
//! (`scripts/golden/make_spm_golden.py`: a SentencePiece BPE model with byte fallback trained on
//! the repository's text, written to a GGUF as llama.cpp writes one, without merges).

mod common;

use bitnet_formats::gguf::GgufFile;
use bitnet_formats::tokenizer::{DecodeStream, TextTokenizer};
use serde_json::Value;

fn golden() -> Value {
    let p = common::repo_root().join("testdata/golden/spm/tokenizer_golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tokenizer() -> TextTokenizer {
    let p = common::repo_root().join("testdata/models/tiny-llama-spm/tiny-llama-spm.gguf");
    let f = GgufFile::open(p).unwrap();
    TextTokenizer::from_gguf(&f.header).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn merges_recovered_from_the_scores_are_transformers() {
    let g = golden();
    let tok = tokenizer();
    let ours: Value = serde_json::from_str(&tok.inner().to_string(false).unwrap()).unwrap();
    let want = &g["backend_tokenizer_json"]["model"]["merges"];
    assert_eq!(want.as_array().unwrap().len(), 305);
    assert_eq!(&ours["model"]["merges"], want);
    assert_eq!(
        ours["pre_tokenizer"],
        g["backend_tokenizer_json"]["pre_tokenizer"]
    );
    assert_eq!(ours["decoder"], g["backend_tokenizer_json"]["decoder"]);
}

#[test]
fn encodes_and_decodes_as_transformers() {
    let g = golden();
    let tok = tokenizer();
    assert_eq!(tok.vocab_size() as u64, g["vocab_size"].as_u64().unwrap());
    let sp = &g["special_tokens"];
    assert_eq!(tok.bos_id.map(u64::from), sp["bos"]["id"].as_u64());
    assert_eq!(tok.eos_id.map(u64::from), sp["eos"]["id"].as_u64());
    assert_eq!(tok.unk_id.map(u64::from), sp["unk"]["id"].as_u64());
    assert_eq!(tok.add_bos, g["add_bos_token"].as_bool().unwrap());
    assert_eq!(tok.add_eos, g["add_eos_token"].as_bool().unwrap());
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
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
        for (skip, key) in [(false, "decode"), (true, "decode_skip_special")] {
            let want = c[key].as_str().unwrap();
            assert_eq!(
                tok.decode(&ids(&c["ids"]), skip).unwrap(),
                want,
                "{key} {text:?}"
            );
            // Streamed a token at a time, the final text is the same.
            let mut s = DecodeStream::new(skip);
            for &id in &ids(&c["ids"]) {
                s.push(&tok, id).unwrap();
                assert!(want.starts_with(s.text()), "{:?} vs {want:?}", s.text());
            }
            assert_eq!(s.finish(&tok).unwrap(), want, "streamed {key} {text:?}");
        }
    }
    // Byte tokens alone: what transformers' decoder makes of them.
    for c in g["decode_only"].as_array().unwrap() {
        assert_eq!(
            tok.decode(&ids(&c["ids"]), false).unwrap(),
            c["decode"].as_str().unwrap(),
            "{c}"
        );
    }
}
