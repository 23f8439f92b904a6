//! Text generation. [`Sequence`] is one sequence's state between forward passes: the prompt
//! still to feed, its sampler, the tokens drawn, the text that became final, and why it ended.
//! [`generate`] drives one sequence to the end (the CLI); the server's scheduler drives many at
//! once, one forward pass for all of them per step, through the same type, so stop tokens, stop
//! strings, held-back text and finish reasons mean the same everywhere.

use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::model::{Model, Step};
use crate::sampling::{Choice, Sampler, SamplingParams};
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
    /// The deadline passed (a server's request timeout).
    Timeout,
    /// Stopped by the user (Ctrl-C in a chat).
    Cancelled,
}

impl FinishReason {
    /// The name OpenAI's API gives it (`finish_reason`): a full context is `length` there, as
    /// in llama.cpp's server; `timeout` is ours.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Timeout => "timeout",
            FinishReason::Cancelled => "cancelled",
        }
    }
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

/// What taking a drawn token changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Accepted {
    /// The token joined the output (false for a stop token, which ends it unseen).
    pub kept: bool,
    /// Text that became final with this token (it can no longer change).
    pub text: String,
    /// Set when the sequence ended with this token.
    pub finish: Option<FinishReason>,
}

/// One sequence being generated: fed to [`Model::forward`] through [`Sequence::push_steps`],
/// its drawn tokens taken by [`Sequence::accept`].
#[derive(Debug)]
pub struct Sequence {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    sampler: Sampler,
    /// Prompt tokens in the cache so far.
    fed: usize,
    /// The token to feed next (once the prompt is in).
    next: Option<u32>,
    /// The prompt and every token kept after it (what the penalties look at).
    history: Vec<u32>,
    /// Tokens drawn, the stop token included (what a server bills as completion tokens).
    sampled: usize,
    /// The kept tokens' text, decoded incrementally.
    text: DecodeStream,
    /// Bytes of `text` handed out as final.
    shown: usize,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// A sequence for `prompt` whose first `cached` tokens are already in its cache (a reused
    /// prefix; at least one prompt token must be left to feed, its logits start the draws).
    pub fn new(prompt: Vec<u32>, opts: GenerateOptions, cached: usize) -> Result<Self> {
        if prompt.is_empty() {
            return Err(ModelError::Invalid(
                "the prompt is empty: give at least one token".into(),
            ));
        }
        if cached >= prompt.len() {
            return Err(ModelError::Invalid(format!(
                "{cached} cached tokens of a {}-token prompt: one must be left to feed",
                prompt.len()
            )));
        }
        opts.sampling.validate().map_err(ModelError::Invalid)?;
        Ok(Self {
            sampler: Sampler::new(opts.sampling.clone()),
            history: prompt.clone(),
            prompt,
            opts,
            fed: cached,
            next: None,
            sampled: 0,
            text: DecodeStream::new(true),
            shown: 0,
            finish: None,
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// The prompt and the tokens kept after it.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Take the history (prompt and kept tokens), ending the sequence's use.
    pub fn into_history(self) -> Vec<u32> {
        self.history
    }

    /// Tokens drawn so far, a final stop token included.
    pub fn sampled(&self) -> usize {
        self.sampled
    }

    /// The tokens kept after the prompt.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt.len()..]
    }

    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Whether the prompt is still being fed.
    pub fn prefilling(&self) -> bool {
        self.next.is_none()
    }

    /// Prompt tokens not fed yet.
    pub fn prompt_left(&self) -> usize {
        self.prompt.len() - self.fed
    }

    /// Append this sequence's next steps (as sequence `seq` of the pass): its next token, or up
    /// to `chunk` more prompt tokens, the last of the prompt asking for logits. Returns how many
    /// prompt tokens were added.
    pub fn push_steps(&mut self, seq: usize, chunk: usize, steps: &mut Vec<Step>) -> usize {
        if self.finish.is_some() {
            return 0;
        }
        if let Some(token) = self.next {
            steps.push(Step {
                seq,
                token,
                logits: true,
            });
            return 0;
        }
        let end = (self.fed + chunk.max(1)).min(self.prompt.len());
        let n = self.prompt.len();
        steps.extend(
            self.prompt[self.fed..end]
                .iter()
                .enumerate()
                .map(|(j, &token)| Step {
                    seq,
                    token,
                    logits: self.fed + j + 1 == n,
                }),
        );
        let added = end - self.fed;
        self.fed = end;
        added
    }

    /// Draw the next token from `logits` (with its log-probability when `logprob` is set; the
    /// draw is the same either way).
    pub fn draw(&mut self, logits: &[f32], logprob: bool) -> Choice {
        if logprob {
            self.sampler.sample(logits, &self.history)
        } else {
            Choice {
                token: self.sampler.draw(logits, &self.history),
                logprob: f32::NAN,
            }
        }
    }

    /// Take a drawn token. `context_full`: the cache cannot take another position. The text
    /// returned is final: an incomplete character and anything that may still begin a stop
    /// string wait, until the end, when everything left is handed out (cut at a stop string).
    pub fn accept(
        &mut self,
        token: u32,
        tokenizer: Option<&TextTokenizer>,
        context_full: bool,
    ) -> Result<Accepted> {
        if self.finish.is_some() {
            return Err(ModelError::Invalid("the sequence has ended".into()));
        }
        self.sampled += 1;
        if self.opts.stop_tokens.contains(&token) {
            return self.end(tokenizer, FinishReason::Stop, false);
        }
        self.history.push(token);
        if let Some(tok) = tokenizer {
            self.text.push(tok, token)?;
            let text = self.text.text();
            if let Some(at) = self
                .opts
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                let delta = text.get(self.shown..at).unwrap_or_default().to_string();
                self.shown = at;
                self.finish = Some(FinishReason::Stop);
                return Ok(Accepted {
                    kept: true,
                    text: delta,
                    finish: self.finish,
                });
            }
        }
        if self.sampled >= self.opts.max_new_tokens {
            return self.end(tokenizer, FinishReason::Length, true);
        }
        if context_full {
            return self.end(tokenizer, FinishReason::ContextFull, true);
        }
        self.next = Some(token);
        let text = self.text.text();
        let upto = text.len() - held_back(text, &self.opts.stop_strings);
        let mut delta = String::new();
        if upto > self.shown && text.is_char_boundary(upto) {
            delta = text[self.shown..upto].to_string();
            self.shown = upto;
        }
        Ok(Accepted {
            kept: true,
            text: delta,
            finish: None,
        })
    }

    /// End the sequence from outside (a deadline): the text not handed out yet comes back.
    pub fn stop(&mut self, tokenizer: Option<&TextTokenizer>, why: FinishReason) -> String {
        if self.finish.is_some() {
            return String::new();
        }
        self.end(tokenizer, why, false)
            .map(|a| a.text)
            .unwrap_or_default()
    }

    fn end(
        &mut self,
        tokenizer: Option<&TextTokenizer>,
        why: FinishReason,
        kept: bool,
    ) -> Result<Accepted> {
        self.finish = Some(why);
        // At the end every decoded byte is final, an incomplete character included.
        let text = match tokenizer {
            Some(tok) => self.text.finish(tok)?,
            None => "",
        };
        let delta = text.get(self.shown..).unwrap_or_default().to_string();
        self.shown = text.len();
        Ok(Accepted {
            kept,
            text: delta,
            finish: Some(why),
        })
    }

    /// The final text (everything handed out), once the sequence has ended.
    pub fn text(&self) -> &str {
        &self.text.text()[..self.shown]
    }
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
    generate_until(model, tokenizer, prompt, opts, cache, on_text, &|| false)
}

/// [`generate`], checking `cancelled` before each step: when it says so the generation ends
/// there ([`FinishReason::Cancelled`]), with the text so far handed out and kept.
pub fn generate_until(
    model: &Model,
    tokenizer: Option<&TextTokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    cache: &mut KvCache,
    on_text: &mut dyn FnMut(&str),
    cancelled: &dyn Fn() -> bool,
) -> Result<Generation> {
    let mut seq = Sequence::new(prompt.to_vec(), opts.clone(), 0)?;
    let ctx = model.spec.context;
    if cache.len() + prompt.len() > ctx {
        return Err(ModelError::ContextFull {
            needed: cache.len() + prompt.len(),
            ctx,
        });
    }
    let t0 = Instant::now();
    let mut steps = Vec::with_capacity(prompt.len());
    seq.push_steps(0, prompt.len(), &mut steps);
    let mut logits = model.forward(&steps, std::slice::from_mut(cache))?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut logprobs = Vec::new();
    let finish = loop {
        if opts.max_new_tokens == 0 {
            break FinishReason::Length;
        }
        let Some(row) = logits.pop() else {
            return Err(ModelError::Invalid(
                "the forward pass gave no logits".into(),
            ));
        };
        let choice = seq.draw(&row, true);
        let step = seq.accept(choice.token, tokenizer, cache.len() >= ctx)?;
        if step.kept {
            logprobs.push(choice.logprob);
        }
        if !step.text.is_empty() {
            on_text(&step.text);
        }
        if let Some(finish) = step.finish {
            break finish;
        }
        if cancelled() {
            let rest = seq.stop(tokenizer, FinishReason::Cancelled);
            if !rest.is_empty() {
                on_text(&rest);
            }
            break FinishReason::Cancelled;
        }
        steps.clear();
        seq.push_steps(0, 1, &mut steps);
        logits = model.forward(&steps, std::slice::from_mut(cache))?;
    };
    Ok(Generation {
        tokens: seq.generated().to_vec(),
        text: seq.text().to_string(),
        logprobs,
        finish,
        prompt_tokens: prompt.len(),
        prompt_secs,
        gen_secs: t1.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["</end>".to_string(), "\n\n".to_string()];
        assert_eq!(held_back("hello </e", &stops), 3);
        assert_eq!(held_back("hello\n", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
    }

    fn seq(max: usize, stop_tokens: Vec<u32>) -> Sequence {
        let opts = GenerateOptions {
            max_new_tokens: max,
            stop_tokens,
            ..GenerateOptions::default()
        };
        Sequence::new(vec![1, 2, 3], opts, 0).unwrap()
    }

    #[test]
    fn prompt_is_fed_in_chunks_then_one_token_a_step() {
        let mut s = seq(4, vec![]);
        let mut steps = Vec::new();
        assert_eq!(s.push_steps(7, 2, &mut steps), 2);
        assert_eq!(s.push_steps(7, 2, &mut steps), 1);
        let asks: Vec<bool> = steps.iter().map(|s| s.logits).collect();
        assert_eq!(asks, [false, false, true]);
        assert!(steps.iter().all(|s| s.seq == 7));
        let a = s.accept(9, None, false).unwrap();
        assert!(a.kept && a.finish.is_none());
        steps.clear();
        assert_eq!(s.push_steps(0, 2, &mut steps), 0);
        assert_eq!((steps[0].token, steps[0].logits), (9, true));
    }

    #[test]
    fn finish_reasons_agree_on_length_stop_and_a_full_context() {
        let mut s = seq(2, vec![5]);
        assert_eq!(s.accept(4, None, false).unwrap().finish, None);
        assert_eq!(
            s.accept(4, None, false).unwrap().finish,
            Some(FinishReason::Length)
        );
        assert_eq!(s.generated(), [4, 4]);
        assert!(
            s.accept(4, None, false).is_err(),
            "an ended sequence takes nothing"
        );

        let mut s = seq(8, vec![5]);
        let a = s.accept(5, None, false).unwrap();
        assert_eq!((a.kept, a.finish), (false, Some(FinishReason::Stop)));
        assert_eq!((s.sampled(), s.generated().len()), (1, 0));

        let mut s = seq(8, vec![5]);
        let a = s.accept(4, None, true).unwrap();
        assert_eq!(a.finish, Some(FinishReason::ContextFull));
        assert_eq!(FinishReason::ContextFull.as_str(), "length");
        // The length limit wins over a full context on the same token, in every driver.
        let mut s = seq(1, vec![]);
        assert_eq!(
            s.accept(4, None, true).unwrap().finish,
            Some(FinishReason::Length)
        );
    }

    #[test]
    fn a_prompt_must_leave_a_token_to_feed() {
        let o = GenerateOptions::default();
        assert!(Sequence::new(vec![], o.clone(), 0).is_err());
        assert!(Sequence::new(vec![1, 2], o.clone(), 2).is_err());
        assert!(Sequence::new(vec![1, 2], o, 1).is_ok());
    }
}
