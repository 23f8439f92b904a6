//! Entry points shared by the `cargo fuzz` targets (`fuzz/fuzz_targets/`) and the regression
//! test that replays their corpora (`tests/fuzz_regressions.rs`). Each takes untrusted bytes and
//! must return, never panic, whatever they hold.

use crate::config::ModelConfig;
use crate::gguf::{GgufHeader, can_dequantize, dequantize};
use crate::safetensors_dir::parse_header;
use crate::tokenizer::TextTokenizer;
use std::path::Path;

/// Largest tensor the GGUF target dequantizes (keeps a run's memory small).
const MAX_DEQUANT_ELEMENTS: u64 = 1 << 20;

/// Parse a GGUF file and dequantize every small tensor it describes.
pub fn gguf(data: &[u8]) {
    if let Ok(h) = GgufHeader::parse(data) {
        for t in &h.tensors {
            if can_dequantize(t.ty) && t.n_elements() <= MAX_DEQUANT_ELEMENTS {
                let _ = dequantize(
                    &t.name,
                    t.ty,
                    &data[h.tensor_range(t)],
                    t.n_elements() as usize,
                );
            }
        }
        let _ = h.architecture();
    }
}

/// Parse a GGUF file and rebuild its tokenizer, then round-trip a string through it.
pub fn gguf_tokenizer(data: &[u8]) {
    if let Ok(h) = GgufHeader::parse(data)
        && let Ok(t) = TextTokenizer::from_gguf(&h)
        && let Ok(ids) = t.encode("Hello, world! 12345 ünïcode", true)
    {
        let _ = t.decode(&ids, false);
        let _ = t.decode(&[u32::MAX, 0], true);
    }
}

/// Parse a safetensors header.
pub fn safetensors(data: &[u8]) {
    let _ = parse_header(data, Path::new("fuzz.safetensors"), 0);
}

/// Parse and validate a `config.json`.
pub fn config_json(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(c) = ModelConfig::from_json(text, Path::new("config.json"))
    {
        let _ = (c.rope_theta(), c.head_dim(), c.num_kv_heads());
    }
}

/// Unpack arbitrary bytes as each ternary layout.
pub fn packed(data: &[u8]) {
    use bitnet_core::packed::{hf, i2s, tq1, tq2};
    let _ = tq2::unpack(data);
    let _ = tq1::unpack(data);
    let n = data.len().saturating_sub(32) * 4;
    let _ = i2s::unpack(data, n);
    if let Some(&cols) = data.first() {
        let cols = usize::from(cols).max(1);
        let _ = hf::unpack(&data[1..], (data.len() - 1) / cols, cols);
    }
}
