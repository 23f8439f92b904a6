//! Replays every input under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through
//! the same entry point the fuzzer drives: cases the fuzzer found stay fixed.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).unwrap();
            f(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_corpora_replay_without_panics() {
    use bitnet_formats::fuzzing as fz;
    let counts = [
        ("gguf", replay("gguf", fz::gguf)),
        (
            "gguf_tokenizer",
            replay("gguf_tokenizer", fz::gguf_tokenizer),
        ),
        ("safetensors", replay("safetensors", fz::safetensors)),
        ("config_json", replay("config_json", fz::config_json)),
        ("packed", replay("packed", fz::packed)),
    ];
    for (t, n) in counts {
        assert!(
            n > 0,
            "no corpus for fuzz target {t}: the seeds under fuzz/corpus/{t} are missing"
        );
    }
}
