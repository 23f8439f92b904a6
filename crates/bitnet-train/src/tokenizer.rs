//! Tokenizers for training: an existing `tokenizer.json`, and the special tokens an export
//! names in its config.

/// The beginning- and end-of-text tokens of a `tokenizer.json` (content, id), from its added
/// tokens: the end-of-text token (`<|endoftext|>`, `</s>`, `<eos>`, `<|im_end|>`) serves as
/// both when there is no separate beginning token, as GPT-2-style vocabularies use it.
pub fn special_tokens(tokenizer_json: &[u8]) -> Option<((String, u64), (String, u64))> {
    let v: serde_json::Value = serde_json::from_slice(tokenizer_json).ok()?;
    let added = v.get("added_tokens")?.as_array()?;
    let find = |names: &[&str]| {
        added.iter().find_map(|t| {
            let c = t.get("content")?.as_str()?;
            names
                .contains(&c)
                .then(|| Some((c.to_string(), t.get("id")?.as_u64()?)))
                .flatten()
        })
    };
    let eos = find(&["<|endoftext|>", "</s>", "<eos>", "<|im_end|>"])?;
    let bos = find(&["<|endoftext|>", "<s>", "<bos>"]).unwrap_or_else(|| eos.clone());
    Some((bos, eos))
}

use crate::config::TrainConfig;
use crate::data::TokenRows;
use crate::error::{Result, TrainError};
use crate::model::Rng;
use std::path::{Path, PathBuf};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The end-of-text token a trained tokenizer reserves (id 0); it separates documents.
pub const EOT: &str = "<|endoftext|>";

fn tok_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Data {
        path: path.into(),
        message: format!("tokenizer: {e}"),
    }
}

/// The vocabulary size of a `tokenizer.json` (added tokens included).
pub fn vocab_size(path: &Path) -> Result<usize> {
    let t = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
    Ok(t.get_vocab_size(true))
}

/// Files named by `patterns`: plain paths, or a `*` wildcard in the last component.
pub fn expand(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in patterns {
        let path = Path::new(p);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains('*') {
            out.push(path.to_path_buf());
            continue;
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let (pre, post) = name.split_once('*').expect("has a star");
        if post.contains('*') {
            return Err(TrainError::Data {
                path: path.into(),
                message: "only one * is supported in a file pattern".into(),
            });
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(crate::error::io_err(dir))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.len() >= pre.len() + post.len() && n.starts_with(pre) && n.ends_with(post)
            })
            .map(|e| e.path())
            .collect();
        if found.is_empty() {
            return Err(TrainError::Data {
                path: path.into(),
                message: "no file matches this pattern".into(),
            });
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// Read UTF-8 documents, without a leading byte-order mark and with CRLF line ends made LF
/// (Project Gutenberg texts have both); a file that is not UTF-8 or a corpus with no text is an
/// error.
pub fn read_corpus(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(crate::error::io_err(f))?;
        let text = String::from_utf8(bytes).map_err(|e| TrainError::Data {
            path: f.clone(),
            message: format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        })?;
        let text = text
            .strip_prefix('\u{feff}')
            .unwrap_or(&text)
            .replace("\r\n", "\n");
        if !text.trim().is_empty() {
            docs.push(text);
        }
    }
    if docs.is_empty() {
        return Err(TrainError::Data {
            path: files.first().cloned().unwrap_or_default(),
            message: "the corpus holds no text".into(),
        });
    }
    Ok(docs)
}

/// Train a byte-level BPE (GPT-2's pre-tokenization, `<|endoftext|>` as id 0) on `docs`.
pub fn train_bpe(docs: &[String], vocab: usize, out: &Path) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, docs.iter())
        .map_err(|e| tok_err(out, e))?;
    let json = tok.to_string(false).map_err(|e| tok_err(out, e))?;
    bitnet_formats::atomic::write_atomic_bytes(out, json.as_bytes())?;
    Ok(tok)
}

/// Training rows, held-out rows, and the tokenizer (its path and vocabulary size).
pub type TextData = (TokenRows, Option<TokenRows>, Option<(PathBuf, usize)>);

/// Text data: tokenize every document (a trained or given tokenizer), join them with the
/// end-of-text token, pack into rows of `seq_len + 1` tokens, hold out a spread-out share of
/// the rows and shuffle the rest with the run's seed.
pub fn load_text(cfg: &TrainConfig, out: &Path) -> Result<TextData> {
    let files = expand(&cfg.data.text)?;
    let docs = read_corpus(&files)?;
    let (tok, tok_path) = match &cfg.data.tokenizer {
        Some(p) => (
            Tokenizer::from_file(p).map_err(|e| tok_err(p, e))?,
            p.clone(),
        ),
        None => {
            std::fs::create_dir_all(out).map_err(crate::error::io_err(out))?;
            let p = out.join("tokenizer.json");
            (train_bpe(&docs, cfg.data.tokenizer_vocab, &p)?, p)
        }
    };
    let eot = tok.token_to_id(EOT);
    let mut ids: Vec<u32> = Vec::new();
    for d in &docs {
        let e = tok
            .encode(d.as_str(), false)
            .map_err(|e| tok_err(&tok_path, e))?;
        ids.extend_from_slice(e.get_ids());
        ids.extend(eot);
    }
    let seq = cfg
        .data
        .seq_len
        .unwrap_or(256.min(cfg.model.max_position_embeddings));
    let width = seq + 1;
    let n = ids.len() / width;
    if n < 2 {
        return Err(TrainError::Data {
            path: files[0].clone(),
            message: format!(
                "the corpus gives {} tokens, fewer than two rows of {width}",
                ids.len()
            ),
        });
    }
    ids.truncate(n * width);
    let f = cfg.data.heldout_fraction;
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, row) in ids.chunks(width).enumerate() {
        let is_held = f > 0.0 && ((i + 1) as f64 * f).floor() > (i as f64 * f).floor();
        if is_held { &mut held } else { &mut train }.push(row);
    }
    let mut rng = Rng::new(cfg.train.seed ^ 0x5EED_DA7A);
    for i in (1..train.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        train.swap(i, j);
    }
    let flat = |rows: Vec<&[u32]>| TokenRows::new(width, rows.concat());
    let vocab = tok.get_vocab_size(true);
    let held = (!held.is_empty()).then(|| flat(held));
    Ok((flat(train), held, Some((tok_path, vocab))))
}
