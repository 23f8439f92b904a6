//! The configs the repository ships parse and validate, and what a config gets wrong is named.

use bitnet_train::TrainConfig;
use std::path::Path;

#[test]
fn the_demo_models_configs_are_valid() {
    for name in [
        "shakespeare.toml",
        "shakespeare-27m.toml",
        "shakespeare-distill.toml",
    ] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts/train")
            .join(name);
        let c = TrainConfig::from_file(&p).unwrap();
        c.validate(&p).unwrap();
        c.check_export(&p).unwrap();
        assert_eq!(c.export.gguf_type, "TQ2_0");
        // Relative corpus paths are taken from the config's own directory.
        assert!(
            c.data.text[0].contains("scripts/train/../../target/corpus"),
            "{:?}",
            c.data.text
        );
    }
}

#[test]
fn mistakes_are_named() {
    let p = Path::new("x.toml");
    let err = |text: &str| {
        let c = TrainConfig::from_toml(text, p);
        match c {
            Err(e) => e.to_string(),
            Ok(c) => c
                .validate(p)
                .and_then(|_| c.check_export(p))
                .unwrap_err()
                .to_string(),
        }
    };
    assert!(err("[model]\nhiden_size = 3\n").contains("hiden_size"));
    assert!(err("[train]\nlr = \"fast\"\n").contains("lr"));
    assert!(err("[data]\nnpy = \"a.npy\"\ntext = [\"b.txt\"]\n").contains("exactly one"));
    assert!(err("[data]\nnpy = \"a.npy\"\n[train]\nbetas = [0.9, 1.5]\n").contains("betas"));
    assert!(
        err("[data]\nnpy = \"a.npy\"\n[model]\nnum_key_value_heads = 3\n")
            .contains("num_key_value_heads")
    );
    assert!(
        err("[data]\nnpy = \"a.npy\"\n[model]\nhidden_size = 128\nintermediate_size = 256\n")
            .contains("multiple of 256")
    );
    assert!(
        err("[data]\nnpy = \"a.npy\"\n[export]\ngguf_type = \"Q4_0\"\n")
            .contains("not a ternary type")
    );
    assert!(err("[data]\nnpy = \"a.npy\"\nseq_len = 9999\n").contains("max_position_embeddings"));
    assert!(err("[distill]\ntemprature = 2.0\n").contains("temprature"));
    assert!(
        err("[data]\nnpy = \"a.npy\"\n[distill]\ntemperature = 0.0\n")
            .contains("distill.temperature")
    );
}
