//! Text generation for one sequence: prefill in one batched pass, then incremental decode with
//! the KV cache, streaming text as it becomes final, stopping on tokens, strings or length.

use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::model::{Model, Step};
use crate::sampling::{Sampler, SamplingParams};
use bitnet_formats::tokenizer::{DecodeStream, TextTokenizer};
use std::time::Instant;

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation (not included in the output).
    pub stop_tokens: Vec<u32>,
    /// Strings that end the generation (cut from the output).
    pub stop_strings: Vec<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// A stop token or stop string.
    Stop,
    /// The model's context is full.
    ContextFull,
}

/// The result of a generation, with timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub gen_secs: f64,
}

impl Generation {
    pub fn prompt_tok_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }

    /// Decode speed, counting the tokens after the first (the first comes from the prefill).
    pub fn gen_tok_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.gen_secs.max(1e-9)
    }
}

/// Longest suffix of `text` that is a proper prefix of some stop string: text that may still
/// turn into a stop string and must not be shown yet.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// Generate from `prompt`, appending to `cache` (which may already hold earlier turns: the
/// prompt continues it). `on_text` receives text as soon as it can no longer change.
pub fn generate(
    model: &Model,
    tokenizer: Option<&TextTokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    cache: &mut KvCache,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    opts.sampling.validate().map_err(ModelError::Invalid)?;
    let ctx = model.spec.context;
    if cache.len() + prompt.len() > ctx {
        return Err(ModelError::ContextFull {
            needed: cache.len() + prompt.len(),
            ctx,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut history: Vec<u32> = prompt.to_vec();
    let t0 = Instant::now();
    let steps: Vec<Step> = prompt
        .iter()
        .enumerate()
        .map(|(i, &token)| Step {
            seq: 0,
            token,
            logits: i + 1 == prompt.len(),
        })
        .collect();
    let mut logits = model
        .forward(&steps, std::slice::from_mut(cache))?
        .pop()
        .expect("last step asks for logits");
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    let (mut stream, mut shown) = (DecodeStream::new(true), 0usize);
    let mut cut = None;
    let mut finish = FinishReason::Length;
    while tokens.len() < opts.max_new_tokens {
        let choice = sampler.sample(&logits, &history);
        if opts.stop_tokens.contains(&choice.token) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(choice.token);
        logprobs.push(choice.logprob);
        history.push(choice.token);
        if let Some(tok) = tokenizer {
            // Only final text is in the stream (an incomplete UTF-8 sequence waits).
            stream.push(tok, choice.token)?;
            let text = stream.text();
            if let Some(at) = opts
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                cut = Some(at);
                finish = FinishReason::Stop;
                break;
            }
            // Hold back anything that may begin a stop string.
            let upto = text.len() - held_back(text, &opts.stop_strings);
            if upto > shown && text.is_char_boundary(upto) {
                on_text(&text[shown..upto]);
                shown = upto;
            }
        }
        if tokens.len() == opts.max_new_tokens {
            break;
        }
        if cache.len() >= ctx {
            finish = FinishReason::ContextFull;
            break;
        }
        let step = [Step {
            seq: 0,
            token: choice.token,
            logits: true,
        }];
        logits = model
            .forward(&step, std::slice::from_mut(cache))?
            .pop()
            .expect("one step");
    }
    let text = match (tokenizer, cut) {
        (Some(_), Some(at)) => stream.text()[..at].to_string(),
        (Some(tok), None) => stream.finish(tok)?.to_string(),
        (None, _) => String::new(),
    };
    if shown < text.len() {
        on_text(&text[shown..]);
    }
    Ok(Generation {
        tokens,
        text,
        logprobs,
        finish,
        prompt_tokens: prompt.len(),
        prompt_secs,
        gen_secs: t1.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["</end>".to_string(), "\n\n".to_string()];
        assert_eq!(held_back("hello </e", &stops), 3);
        assert_eq!(held_back("hello\n", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
