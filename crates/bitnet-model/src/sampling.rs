//! Choosing the next token: penalties, temperature, top-k, top-p, min-p, seeded sampling.
//!
//! The order follows Hugging Face `generate`: repetition penalty, then temperature, then top-k,
//! top-p and min-p; frequency and presence penalties are OpenAI's (subtracted from the logits).

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables; HF semantics (positive logits divided, negative multiplied).
    pub repetition_penalty: f32,
    /// OpenAI semantics: `logit -= frequency_penalty * count`.
    pub frequency_penalty: f32,
    /// `logit -= presence_penalty` for any token already present.
    pub presence_penalty: f32,
    /// The penalties look at the last this many tokens of the sequence (llama.cpp's
    /// `--repeat-last-n`; `Some(0)` turns them off); `None`: the whole sequence (transformers,
    /// OpenAI).
    pub penalty_last_n: Option<usize>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// llama.cpp's defaults (`common/common.h`, `common_params_sampling`): temperature 0.8,
    /// top-k 40, top-p 0.95, min-p 0.05, repeat penalty 1.1 over the last 64 tokens.
    pub fn llama_cpp() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            penalty_last_n: Some(64),
            ..Self::default()
        }
    }

    /// These settings with each field the model sets taken from `d`.
    pub fn with_model_defaults(mut self, d: &SamplingDefaults) -> Self {
        if let Some(v) = d.temperature {
            self.temperature = v;
        }
        if let Some(v) = d.top_k {
            self.top_k = v;
        }
        if let Some(v) = d.top_p {
            self.top_p = v;
        }
        if let Some(v) = d.min_p {
            self.min_p = v;
        }
        if let Some(v) = d.repetition_penalty {
            self.repetition_penalty = v;
        }
        if let Some(v) = d.penalty_last_n {
            self.penalty_last_n = Some(v);
        }
        self
    }
}

/// The sampling settings a model ships, each `None` where it says nothing: a Hugging Face
/// directory's `generation_config.json` (`do_sample: false` means greedy), or a GGUF's
/// `general.sampling.*` keys (gguf-py `Keys.General.SAMPLING_*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub penalty_last_n: Option<usize>,
    /// Where they came from (`generation_config.json`, `GGUF general.sampling`), for reports.
    pub source: Option<String>,
}

impl SamplingDefaults {
    pub fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_k.is_none()
            && self.top_p.is_none()
            && self.min_p.is_none()
            && self.repetition_penalty.is_none()
            && self.penalty_last_n.is_none()
    }

    /// From a `generation_config.json` document.
    pub fn from_generation_config(v: &serde_json::Value) -> Self {
        let f = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .map(|x| x as f32)
        };
        let u = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|x| x as usize)
        };
        let greedy = v.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false);
        let d = Self {
            temperature: if greedy { Some(0.0) } else { f("temperature") },
            top_k: u("top_k"),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            penalty_last_n: None,
            source: Some("generation_config.json".into()),
        };
        if d.is_empty() { Self::default() } else { d }
    }
}

impl SamplingParams {
    /// Reject values that have no meaning, with a message naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if !self.frequency_penalty.is_finite() || !self.presence_penalty.is_finite() {
            return Err("penalties must be finite".into());
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether any repetition, frequency or presence penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.penalty_last_n != Some(0)
            && (self.repetition_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

/// xoshiro256++ (Blackman & Vigna): small, fast, and the same stream on every platform, so a
/// seed reproduces a generation anywhere.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // SplitMix64 expands the seed into the state.
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E3779B97F4A7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A sampler with its RNG state: one per sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// Probabilities of the current draw, kept between draws to spare a vocabulary-sized
    /// allocation per token.
    probs: Vec<f64>,
}

/// The chosen token and its log-probability under the (unwarped) distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: f32,
}

/// Index of the largest value (the first on ties), as `argmax` does.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(x)[i]`.
pub fn log_prob(x: &[f32], i: usize) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
    (f64::from(x[i] - max) - sum.ln()) as f32
}

/// Indices of `l` by descending value (`total_cmp`), lower index first on ties. Sorted as one
/// `u64` key per entry (the value's order-preserving bits, inverted, above the index): the same
/// order as a comparison sort, several times faster on a 128k vocabulary.
fn sorted_desc(l: &[f32]) -> Vec<usize> {
    let mut keys: Vec<u64> = l
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let b = v.to_bits();
            // total_cmp's key: flip the magnitude bits of negatives, then the sign bit.
            let ord = (b ^ ((((b as i32) >> 31) as u32) >> 1)) ^ 0x8000_0000;
            (u64::from(!ord) << 32) | i as u64
        })
        .collect();
    keys.sort_unstable();
    keys.into_iter()
        .map(|k| (k & 0xffff_ffff) as usize)
        .collect()
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            probs: Vec::new(),
        }
    }

    /// Apply the penalties for the tokens seen so far (`history`), in place.
    pub fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if !p.has_penalties() {
            return;
        }
        let recent = match p.penalty_last_n {
            Some(n) => &history[history.len().saturating_sub(n)..],
            None => history,
        };
        let mut counts = std::collections::HashMap::new();
        for &t in recent {
            if (t as usize) < logits.len() {
                *counts.entry(t).or_insert(0u32) += 1;
            }
        }
        for (&t, &c) in &counts {
            let l = &mut logits[t as usize];
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
            *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
        }
    }

    /// Pick the next token from `logits` given the sequence so far, with its log-probability.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Choice {
        let l = self.penalized(logits, history);
        let token = self.pick(&l);
        Choice {
            token: token as u32,
            logprob: log_prob(&l, token),
        }
    }

    /// [`sample`](Self::sample)'s token alone (the same draw, the same RNG stream), without the
    /// pass over the vocabulary that the log-probability costs.
    pub fn draw(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let l = self.penalized(logits, history);
        self.pick(&l) as u32
    }

    fn penalized<'a>(&self, logits: &'a [f32], history: &[u32]) -> std::borrow::Cow<'a, [f32]> {
        if !self.params.has_penalties() {
            return std::borrow::Cow::Borrowed(logits);
        }
        let mut l = logits.to_vec();
        self.apply_penalties(&mut l, history);
        std::borrow::Cow::Owned(l)
    }

    fn pick(&mut self, l: &[f32]) -> usize {
        let p = &self.params;
        if p.is_greedy() {
            return argmax(l);
        }
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Nothing is cut: draw from the whole distribution in vocabulary order, as
            // `torch.multinomial` does, with no sort of the vocabulary.
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) / p.temperature;
            let mut probs = std::mem::take(&mut self.probs);
            probs.clear();
            probs.extend(l.iter().map(|&v| f64::from(v / p.temperature - max).exp()));
            let total: f64 = probs.iter().sum();
            let mut u = self.rng.next_f64() * total;
            let mut pick = None;
            for (i, &pr) in probs.iter().enumerate() {
                if u < pr {
                    pick = Some(i);
                    break;
                }
                u -= pr;
            }
            self.probs = probs;
            // Rounding can leave `u` past the last weight: then the most likely token.
            return pick.unwrap_or_else(|| argmax(l));
        }
        let p = p.clone();
        // Candidates sorted by logit, best first (stable: lower ids first on ties).
        let mut idx = sorted_desc(l);
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = l[idx[0]] / p.temperature;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| f64::from(l[i] / p.temperature - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= total);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (j, &v) in probs.iter().enumerate() {
                cum += v;
                if cum >= f64::from(p.top_p) {
                    keep = j + 1;
                    break;
                }
            }
            idx.truncate(keep);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * f64::from(p.min_p);
            let keep = probs.iter().take_while(|&&v| v >= floor).count().max(1);
            idx.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        let mut pick = idx[idx.len() - 1];
        for (&i, &pr) in idx.iter().zip(&probs) {
            if u < pr {
                pick = i;
                break;
            }
            u -= pr;
        }
        pick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sort_is_the_comparison_sort() {
        let mut x = 7u32;
        let mut l: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                ((x % 200) as f32 - 100.0) * 0.25
            })
            .collect();
        l.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            f32::MAX,
            -f32::MAX,
            1e-40,
            -1e-40,
        ]);
        let mut want: Vec<usize> = (0..l.len()).collect();
        want.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        assert_eq!(sorted_desc(&l), want);
    }

    #[test]
    fn greedy_and_seeded() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[]).token, 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let a: Vec<u32> = (0..20)
            .scan(Sampler::new(params.clone()), |s, _| {
                Some(s.sample(&logits, &[]).token)
            })
            .collect();
        let b: Vec<u32> = (0..20)
            .scan(Sampler::new(params), |s, _| {
                Some(s.sample(&logits, &[]).token)
            })
            .collect();
        assert_eq!(a, b);
        assert!(
            a.contains(&1) && a.contains(&2),
            "temperature 1 should visit both top tokens: {a:?}"
        );
    }

    #[test]
    fn filters() {
        let logits = [5.0, 4.0, 0.0, -5.0];
        let mut top1 = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        });
        assert!((0..50).all(|_| top1.sample(&logits, &[]).token == 0));
        let mut minp = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            ..Default::default()
        });
        assert!(
            (0..50).all(|_| minp.sample(&logits, &[]).token == 0),
            "token 1 has p/p0 = e^-1 < 0.5"
        );
        let mut topp = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        });
        assert!((0..50).all(|_| topp.sample(&logits, &[]).token == 0));
    }

    #[test]
    fn draw_is_samples_token() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 101) as f32 * 0.05)
            .collect();
        for params in [
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.8,
                seed: 3,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                top_k: 50,
                seed: 4,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.2,
                min_p: 0.05,
                repetition_penalty: 1.3,
                seed: 5,
                ..Default::default()
            },
        ] {
            let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
            let history = [1, 2, 3, 3];
            for _ in 0..100 {
                assert_eq!(a.sample(&logits, &history).token, b.draw(&logits, &history));
            }
        }
    }

    #[test]
    fn penalties() {
        let s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            ..Default::default()
        });
        let mut l = [4.0, -4.0, 1.0];
        s.apply_penalties(&mut l, &[0, 0, 1]);
        assert_eq!(l, [4.0 / 2.0 - 1.0, -8.0 - 0.5, 1.0]);
        assert!(
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn penalties_look_only_at_the_window() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            penalty_last_n: Some(2),
            ..SamplingParams::default()
        };
        let s = Sampler::new(p);
        let mut l = vec![1.0f32; 4];
        // Token 0 is outside the last two tokens: not penalised; 1 and 2 are.
        s.apply_penalties(&mut l, &[0, 1, 2]);
        assert_eq!(l, [1.0, 0.5, 0.5, 1.0]);
        let off = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            penalty_last_n: Some(0),
            ..SamplingParams::default()
        });
        let mut l = vec![1.0f32; 4];
        off.apply_penalties(&mut l, &[0, 1, 2]);
        assert_eq!(l, [1.0; 4]);
    }

    #[test]
    fn generation_config_defaults() {
        let d = SamplingDefaults::from_generation_config(&serde_json::json!(
            {"do_sample": true, "temperature": 0.6, "top_k": 20, "repetition_penalty": 1.05}
        ));
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_k, Some(20));
        assert_eq!(d.top_p, None);
        let p = SamplingParams::llama_cpp().with_model_defaults(&d);
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.6, 20, 0.95));
        let greedy = SamplingDefaults::from_generation_config(&serde_json::json!(
            {"do_sample": false, "temperature": 0.6}
        ));
        assert_eq!(greedy.temperature, Some(0.0));
        assert!(SamplingDefaults::from_generation_config(&serde_json::json!({})).is_empty());
    }
}
