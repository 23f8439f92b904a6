//! Tokenizers from `tokenizer.json` (Hugging Face `tokenizers`, pure Rust) or rebuilt from GGUF
//! tokenizer metadata the way transformers rebuilds them (`integrations/gguf/
//! gguf_tokenizer_mapping.py`), so both give the same ids as transformers does.

use crate::error::{FormatError, Result};
use crate::gguf::{GgufHeader, MetaValue};
use crate::names::key;
use serde_json::{Value, json};
use std::path::Path;

/// A text tokenizer with the special tokens and chat template the model ships.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner.get_vocab_size(true)`, which rebuilds the whole vocabulary map on every call:
    /// counted once (decoding checks ids against it per call).
    vocab: usize,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    pub add_eos: bool,
    /// The Jinja chat template, as the checkpoint ships it.
    pub chat_template: Option<String>,
    /// Where the tokenizer came from, for reports (`tokenizer.json`, `gguf:gpt2`, ...).
    pub source: String,
    /// How token strings spell bytes (for [`TextTokenizer::token_bytes`]).
    spelling: Spelling,
}

/// How a vocabulary spells the bytes a token stands for.
#[derive(Debug, Clone, Default)]
struct Spelling {
    /// GPT-2's byte-to-character map (a `ByteLevel` decoder).
    byte_level: bool,
    /// `<0x41>` tokens stand for one byte (a `ByteFallback` decoder).
    byte_fallback: bool,
    /// `▁` stands for a space (a `Metaspace` or `Replace` decoder).
    metaspace: bool,
    /// Added tokens: their text as it is.
    added: std::collections::HashSet<u32>,
}

impl Spelling {
    fn of(t: &tokenizers::Tokenizer) -> Self {
        let decoder = serde_json::to_value(t.get_decoder()).unwrap_or(Value::Null);
        let mut types = Vec::new();
        collect_types(&decoder, &mut types);
        let has = |name: &str| types.iter().any(|t| t == name);
        Self {
            byte_level: has("ByteLevel"),
            byte_fallback: has("ByteFallback"),
            metaspace: has("Metaspace") || has("Replace"),
            added: t.get_added_tokens_decoder().keys().copied().collect(),
        }
    }
}

/// Every `"type"` in a (possibly nested `Sequence`) decoder description.
fn collect_types(v: &Value, out: &mut Vec<String>) {
    if let Some(t) = v.get("type").and_then(Value::as_str) {
        out.push(t.to_string());
    }
    if let Some(ds) = v.get("decoders").and_then(Value::as_array) {
        for d in ds {
            collect_types(d, out);
        }
    }
}

fn tok_err(e: impl std::fmt::Display) -> FormatError {
    FormatError::Tokenizer(e.to_string())
}

/// GPT-2's reversible byte-to-character map (`bytes_to_unicode`): printable Latin-1 bytes map
/// to themselves, the rest to U+0100 onwards in byte order.
pub fn byte_level_alphabet() -> [char; 256] {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            next += 1;
            next - 1
        };
        map[b as usize] = char::from_u32(c).expect("valid code point");
    }
    map
}

/// Pre-tokenizer split patterns transformers applies per `tokenizer.ggml.pre` (its
/// `GGUF_PRE_TOKENIZER_SPLITS`); other values keep GPT-2's own ByteLevel regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json`, with `tokenizer_config.json` beside it when present (chat template,
    /// special tokens, BOS/EOS flags).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| FormatError::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut t = Self {
            vocab: inner.get_vocab_size(true),
            inner,
            bos_id: None,
            eos_id: None,
            pad_id: None,
            unk_id: None,
            add_bos: false,
            add_eos: false,
            chat_template: None,
            source: path.display().to_string(),
            spelling: Spelling::default(),
        };
        t.spelling = Spelling::of(&t.inner);
        let cfg_path = path.with_file_name("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: Value = serde_json::from_str(&text).map_err(|source| FormatError::Json {
                path: cfg_path.clone(),
                source,
            })?;
            let token_id = |key: &str| -> Option<u32> {
                let v = cfg.get(key)?;
                let s = v
                    .as_str()
                    .or_else(|| v.get("content").and_then(Value::as_str))?;
                t.inner.token_to_id(s)
            };
            let (bos, eos, pad, unk) = (
                token_id("bos_token"),
                token_id("eos_token"),
                token_id("pad_token"),
                token_id("unk_token"),
            );
            t.bos_id = bos;
            t.eos_id = eos;
            t.pad_id = pad;
            t.unk_id = unk;
            t.add_bos = cfg
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            t.add_eos = cfg
                .get("add_eos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            t.chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(items)) => items
                    .iter()
                    .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|i| i.get("template").and_then(Value::as_str))
                    .map(str::to_string),
                _ => None,
            };
        }
        if t.chat_template.is_none()
            && let Ok(s) = std::fs::read_to_string(path.with_file_name("chat_template.jinja"))
        {
            t.chat_template = Some(s);
        }
        Ok(t)
    }

    /// Rebuild the tokenizer a GGUF file describes in its `tokenizer.*` metadata.
    pub fn from_gguf(h: &GgufHeader) -> Result<Self> {
        let model = h.get_str(key::TOKENIZER_MODEL).ok_or_else(|| {
            tok_err("the GGUF file has no tokenizer.ggml.model: it carries no tokenizer")
        })?;
        let strings = |key: &str| -> Result<Vec<&str>> {
            let arr = h
                .get(key)
                .and_then(MetaValue::as_array)
                .ok_or_else(|| tok_err(format!("{key} is missing or not an array")))?;
            arr.iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| tok_err(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings(key::TOKENS)?;
        let types: Vec<i64> = h
            .get(key::TOKEN_TYPE)
            .and_then(MetaValue::as_array)
            .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let id = |key: &str| {
            h.get_u64(key)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        let inner = match model {
            "gpt2" => {
                let merges = strings(key::MERGES)?;
                byte_level_bpe(
                    &tokens,
                    &merges,
                    &types,
                    h.get_str(key::TOKENIZER_PRE).unwrap_or("default"),
                )?
            }
            "llama" => {
                let scores: Vec<f32> = h
                    .get(key::SCORES)
                    .and_then(MetaValue::as_array)
                    .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect())
                    .unwrap_or_default();
                let merges = match h.get(key::MERGES) {
                    Some(_) => Some(strings(key::MERGES)?),
                    None => None,
                };
                let specials = [key::BOS_ID, key::EOS_ID, key::UNK_ID, key::PAD_ID].map(&id);
                sentencepiece_bpe(&tokens, &scores, &types, merges.as_deref(), &specials)?
            }
            other => {
                return Err(tok_err(format!(
                    "GGUF tokenizer model {other:?} is not supported yet (supported: \"gpt2\" byte-level BPE, \
                     \"llama\" SentencePiece BPE); use the model's tokenizer.json instead"
                )));
            }
        };
        let flag = |key: &str| h.get(key).and_then(MetaValue::as_bool);
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise, and
        // transformers follows it (`get_gguf_tokenizer`).
        let bos_default = model == "llama";
        Ok(Self {
            vocab: inner.get_vocab_size(true),
            spelling: Spelling::of(&inner),
            inner,
            bos_id: id(key::BOS_ID),
            eos_id: id(key::EOS_ID),
            pad_id: id(key::PAD_ID),
            unk_id: id(key::UNK_ID),
            add_bos: flag(key::ADD_BOS).unwrap_or(bos_default),
            add_eos: flag(key::ADD_EOS).unwrap_or(false),
            chat_template: h.get_str(key::CHAT_TEMPLATE).map(str::to_string),
            source: format!("gguf:{model}"),
        })
    }

    /// Token ids of `text`; with `add_special`, BOS/EOS as the tokenizer is configured to add.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if add_special
            && self.add_bos
            && let Some(b) = self.bos_id
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        if add_special
            && self.add_eos
            && let Some(e) = self.eos_id
        {
            ids.push(e);
        }
        Ok(ids)
    }

    /// Text of `ids`; ids outside the vocabulary are an error, not a panic.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let n = self.vocab_size() as u32;
        if let Some(bad) = ids.iter().find(|&&i| i >= n) {
            return Err(tok_err(format!(
                "token id {bad} is outside the vocabulary of {n}"
            )));
        }
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The bytes token `id` stands for (what it adds to a decoded text, before any UTF-8
    /// assembly): a byte-level token's characters mapped back to bytes, a `<0x41>` byte token's
    /// byte, `▁` as a space; an added token's text. Empty for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let sp = &self.spelling;
        if sp.added.contains(&id) {
            return tok.into_bytes();
        }
        if sp.byte_fallback
            && let Some(hex) = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
            && hex.len() == 2
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            return vec![b];
        }
        if sp.byte_level {
            let alphabet = byte_level_alphabet();
            let bytes: Option<Vec<u8>> = tok
                .chars()
                .map(|c| alphabet.iter().position(|&a| a == c).map(|b| b as u8))
                .collect();
            if let Some(b) = bytes {
                return b;
            }
        }
        if sp.metaspace {
            return tok.replace('\u{2581}', " ").into_bytes();
        }
        tok.into_bytes()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenization for streaming: each new id decodes only a short window of the
/// latest tokens (the last final piece as context, then what is new), as
/// text-generation-inference does, so a long generation costs the same per token at its end as
/// at its start instead of decoding everything so far every time. Text becomes final, and is
/// appended to [`text`](Self::text), once it no longer ends in an incomplete UTF-8 sequence.
#[derive(Debug, Clone, Default)]
pub struct DecodeStream {
    ids: Vec<u32>,
    text: String,
    /// The window decoded per step starts here (context for decoders that look back).
    prefix: usize,
    /// Tokens before this one are in `text`.
    read: usize,
    skip_special: bool,
}

impl DecodeStream {
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            ..Self::default()
        }
    }

    /// The final text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Add `id`; returns how many bytes of text it made final (appended to `text()`).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<usize> {
        self.ids.push(id);
        let (before, now) = self.window(tok)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(0);
        }
        let start = self.text.len();
        match now.strip_prefix(before.as_str()) {
            Some(new) => self.text.push_str(new),
            None => {
                // The decoder rewrote the context (rare): take the difference against the whole
                // sequence's text instead.
                let all = tok.decode(&self.ids, self.skip_special)?;
                match all.strip_prefix(self.text.as_str()) {
                    Some(new) if !new.ends_with('\u{FFFD}') => self.text.push_str(new),
                    _ => return Ok(0),
                }
            }
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(self.text.len() - start)
    }

    /// The text of the window's final part, and of the whole window.
    fn window(&self, tok: &TextTokenizer) -> Result<(String, String)> {
        Ok((
            tok.decode(&self.ids[self.prefix..self.read], self.skip_special)?,
            tok.decode(&self.ids[self.prefix..], self.skip_special)?,
        ))
    }

    /// `text()` followed by what is not final yet (an incomplete character shows as U+FFFD):
    /// the whole text of the ids pushed, once the sequence has ended.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<&str> {
        if self.read < self.ids.len() {
            let (before, now) = self.window(tok)?;
            match now.strip_prefix(before.as_str()) {
                Some(rest) => self.text.push_str(rest),
                None => {
                    let all = tok.decode(&self.ids, self.skip_special)?;
                    let rest = all.get(self.text.len()..).unwrap_or_default();
                    self.text.push_str(rest);
                }
            }
        }
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(&self.text)
    }
}

/// transformers' `byte_level_tokenizer` + `add_gguf_special_tokens` + `set_split_regex`, as a
/// `tokenizer.json` document handed to the `tokenizers` crate.
fn byte_level_bpe(
    tokens: &[&str],
    merges: &[&str],
    types: &[i64],
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let alphabet = byte_level_alphabet();
    let in_alphabet = |s: &str| s.chars().all(|c| alphabet.contains(&c));
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // Tokens spelled outside the byte alphabet are respelled byte by byte, as transformers does.
        let key = if in_alphabet(t) {
            (*t).to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(i));
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            let mut parts = m.splitn(2, ' ');
            let a = parts.next().unwrap_or_default();
            let b = parts.next().unwrap_or_default();
            json!([a, b])
        })
        .collect();
    let mut added = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        // 3 = CONTROL (special), 4 = USER_DEFINED (matched whole, not special). Control tokens
        // spelled outside the byte alphabet are llama.cpp mislabels and are skipped.
        let special = match ty {
            3 if in_alphabet(t) => true,
            4 => false,
            _ => continue,
        };
        added.push(added_token(i, t, special));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match split_regex(pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        None => byte_level.clone(),
    };
    build(
        added,
        pre_tokenizer,
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}),
    )
}

/// One entry of a tokenizer's `added_tokens`: matched whole, never normalized.
fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special})
}

/// A `tokenizers` pipeline from its parts (no normalizer, truncation or padding).
fn build(
    added: Vec<Value>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: Value,
) -> Result<tokenizers::Tokenizer> {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    })
    .to_string()
    .parse::<tokenizers::Tokenizer>()
    .map_err(tok_err)
}

/// The merges a SentencePiece BPE vocabulary implies when the file lists none, as transformers
/// recovers them (`generate_merges` in `tokenization_utils_base.py` / `convert_slow_tokenizer.py`):
/// every split of a token into two tokens of the vocabulary is a merge with the token's score;
/// within a token, splits in vocabulary order of their halves; then all of them best score first,
/// longer left and right halves first on equal scores, the order so far kept on full ties.
pub fn sentencepiece_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    // Python dicts: a repeated token keeps its first position and its last index / score.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        if index.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, scores.get(i).copied().unwrap_or(0.0));
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for &piece in &order {
        let mut local: Vec<(&str, &str, f32)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| (&piece[..at], &piece[at..]))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, score[piece]))
            .collect();
        local.sort_by_key(|&(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    let len = |s: &str| s.chars().count();
    // Descending, stable: Python's `sorted(..., reverse=True)` keeps equal keys in order.
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(len(b.0).cmp(&len(a.0)))
            .then(len(b.1).cmp(&len(a.1)))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// A SentencePiece BPE tokenizer (`tokenizer.ggml.model = llama`: LLaMA 1/2, Mistral, the older
/// BitNet GGUFs) as transformers' `LlamaTokenizer` rebuilds it from a GGUF: BPE over the file's
/// tokens with byte fallback (`<0x41>` tokens) and merges from the file or recovered from the
/// scores, `Metaspace` (`▁`, prefixed to the first word), and the decoder that turns `▁` back
/// into spaces, joins byte tokens and drops the one leading space the prefix added.
fn sentencepiece_bpe(
    tokens: &[&str],
    scores: &[f32],
    types: &[i64],
    merges: Option<&[&str]>,
    specials: &[Option<u32>],
) -> Result<tokenizers::Tokenizer> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(i));
    }
    let merges: Vec<Value> = match merges {
        Some(m) => m
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                json!([a, b])
            })
            .collect(),
        None => sentencepiece_merges(tokens, scores)
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect(),
    };
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // The named special tokens and CONTROL (3) tokens whole and special, USER_DEFINED (4)
        // tokens whole and not special (`add_gguf_special_tokens`).
        let ty = types.get(i).copied().unwrap_or(1);
        let special = match ty {
            _ if specials.contains(&Some(i as u32)) => true,
            3 => true,
            4 => false,
            _ => continue,
        };
        added.push(added_token(i, t, special));
    }
    build(
        added,
        json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
        Value::Null,
        json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}),
    )
}

impl TextTokenizer {
    /// GGUF `tokenizer.*` metadata describing this tokenizer the way llama.cpp writes it, so a
    /// converted file carries its tokenizer. Supported: byte-level BPE (GPT-2 style) models.
    pub fn to_gguf_metadata(&self) -> Result<Vec<(String, crate::gguf::MetaValue)>> {
        use crate::gguf::{MetaValue, ValueType, array};
        let doc: Value = serde_json::from_str(&self.inner.to_string(false).map_err(tok_err)?)
            .map_err(tok_err)?;
        let model = &doc["model"];
        if model["type"] != "BPE" {
            return Err(tok_err(format!(
                "only BPE tokenizers can be written to GGUF (this one is {})",
                model["type"]
            )));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| tok_err("BPE model without a vocabulary"))?;
        let n = self.vocab_size();
        let mut tokens = vec![String::new(); n];
        let mut types = vec![1i32; n];
        for (t, id) in vocab {
            if let Some(i) = id.as_u64().map(|i| i as usize).filter(|&i| i < n) {
                tokens[i] = t.clone();
            }
        }
        for a in doc["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(i), Some(c)) =
                (a["id"].as_u64().map(|i| i as usize), a["content"].as_str())
                && i < n
            {
                tokens[i] = c.to_string();
                types[i] = if a["special"] == true { 3 } else { 4 };
            }
        }
        let merges: Vec<String> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Value::String(s) => s.clone(),
                Value::Array(p) => format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                ),
                _ => String::new(),
            })
            .collect();
        let mut out: Vec<(String, MetaValue)> = vec![
            (key::TOKENIZER_MODEL.into(), "gpt2".into()),
            (key::TOKENIZER_PRE.into(), "default".into()),
            (key::TOKENS.into(), array(ValueType::String, tokens)),
            (key::TOKEN_TYPE.into(), array(ValueType::I32, types)),
            (key::MERGES.into(), array(ValueType::String, merges)),
            (key::ADD_BOS.into(), self.add_bos.into()),
            (key::ADD_EOS.into(), self.add_eos.into()),
        ];
        for (k, id) in [
            (key::BOS_ID, self.bos_id),
            (key::EOS_ID, self.eos_id),
            (key::PAD_ID, self.pad_id),
            (key::UNK_ID, self.unk_id),
        ] {
            if let Some(i) = id {
                out.push((k.into(), i.into()));
            }
        }
        if let Some(t) = &self.chat_template {
            out.push((key::CHAT_TEMPLATE.into(), t.as_str().into()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_gpt2s() {
        let a = byte_level_alphabet();
        assert_eq!(a[b'!' as usize], '!');
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        let mut sorted = a.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }
}
