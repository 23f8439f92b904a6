//! `bitnet inspect` on the real SmolLM2 GGUF and on broken inputs.

mod cli;
#[path = "../../bitnet-formats/tests/common/mod.rs"]
mod common;

use cli::{bitnet, succeeds};

use common::repo_root as root;
use common::smollm2;

use serde_json::Value;

#[test]
fn lists_every_tensor_and_the_tokenizer() {
    let Some(path) = smollm2() else { return };
    let out = succeeds(bitnet().args(["inspect", "--json"]).arg(&path));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/golden/smollm2/tensors.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = golden["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    // Every tensor, listed in block order (blk.2 before blk.10; the file has them in name
    // order), the embedding first and the final norm last.
    let (mut a, mut b) = (names.clone(), want.clone());
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
    let block =
        |n: &str| -> Option<usize> { n.strip_prefix("blk.")?.split('.').next()?.parse().ok() };
    let blocks: Vec<usize> = names.iter().filter_map(|n| block(n)).collect();
    assert!(blocks.windows(2).all(|w| w[0] <= w[1]), "{names:?}");
    assert_eq!(names[0], "token_embd.weight");
    assert_eq!(*names.last().unwrap(), "output_norm.weight");
    let by_name: std::collections::HashMap<&str, &Value> = golden["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["name"].as_str().unwrap(), g))
        .collect();
    for t in r["tensors"].as_array().unwrap() {
        let g = by_name[t["name"].as_str().unwrap()];
        assert_eq!(t["dtype"], g["type"]);
        assert_eq!(t["bytes"], g["nbytes"]);
        let mut shape: Vec<Value> = g["shape"].as_array().unwrap().clone();
        shape.reverse();
        assert_eq!(t["shape"], Value::Array(shape));
    }
    assert_eq!(r["architecture"], "llama");
    assert_eq!(r["tokenizer"]["vocab_size"], 49152);
    assert_eq!(r["tokenizer"]["source"], "gguf:gpt2");
    assert_eq!(r["tokenizer"]["eos"]["token"], "<|im_end|>");
    assert_eq!(r["summary"]["n_tensors"], 272);
    // 134.5M parameters; Q4_1 linear layers are 5 bits per weight (20 bytes per 32).
    assert_eq!(
        r["summary"]["n_params"],
        golden["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["n_elements"].as_u64().unwrap())
            .sum::<u64>()
    );
    assert_eq!(r["summary"]["linear_bits_per_weight"], 5.0);

    let text = bitnet().arg("inspect").arg(&path).output().unwrap();
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    for name in &want {
        assert!(text.contains(name), "text output lacks {name}");
    }
    assert!(text.contains("gguf:gpt2"));
}

#[test]
fn clear_errors_on_bad_paths() {
    let out = bitnet()
        .args(["inspect", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No such file"), "{err}");
    assert!(!err.contains("panicked"));

    let dir = tempfile::tempdir().unwrap();
    let out = bitnet().arg("inspect").arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no config.json"),
        "{err}"
    );

    let junk = dir.path().join("junk.gguf");
    std::fs::write(
        &junk,
        b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff\0\0\0\0\0\0\0\0",
    )
    .unwrap();
    let out = bitnet().arg("inspect").arg(&junk).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("tensor count"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}
