//! The inference engine of one model: a scheduler thread that runs continuous batching.
//!
//! Requests wait in a bounded queue. At every step the scheduler admits waiting requests while
//! the batch has room, runs one forward pass over every running sequence (the next token of each
//! decoding sequence plus the prompts of newly admitted ones, in fixed-size prompt chunks), samples
//! each sequence's next token with its own seeded sampler and streams the text that can no longer
//! change. Sequences leave the batch as soon as they finish, time out or lose their client (the
//! receiving end of their event channel is dropped), so a step never waits for the slowest.
//!
//! A sequence's numbers do not depend on its batch: every kernel computes each token's row with
//! the same sums whatever else is in the pass, so a request gives the same tokens alone or among
//! fifteen others, and however its prompt was cut into passes. That is also what lets a new
//! prompt reuse the keys and values of a finished sequence that began the same way (the prefix
//! cache): they are bitwise what its own prefill would compute.

use crate::metrics::{Metrics, ModelMetrics};
use bitnet_formats::tokenizer::TextTokenizer;
use bitnet_kernels::pool;
use bitnet_model::generate::{FinishReason, GenerateOptions, Sequence};
use bitnet_model::kv::KvCache;
use bitnet_model::model::{Model, Step};
use bitnet_model::sampling::Choice;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Scheduling limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused with 429.
    pub queue: usize,
    /// Prompt tokens a sequence feeds per step at most (longer prompts are fed in chunks).
    pub prefill_chunk: usize,
    /// Tokens one step feeds in all (chunked prefill, as vLLM's `max_num_batched_tokens`): every
    /// decoding sequence's next token first, then prompt chunks in the room left, so a long
    /// prompt is spread over several steps and the running sequences keep decoding between them.
    pub max_step_tokens: usize,
    /// Bytes of finished sequences' KV caches kept for prompts that start the same way
    /// (0 disables the prefix cache).
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            queue: 64,
            prefill_chunk: 512,
            max_step_tokens: 256,
            prefix_cache_bytes: 1 << 30,
        }
    }
}

/// One sequence to generate.
#[derive(Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Length, sampling and stops.
    pub options: GenerateOptions,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Give up (finish reason `timeout`) at this instant.
    pub deadline: Instant,
    /// When the HTTP request arrived (time to first token is measured from here).
    pub received: Instant,
    pub events: UnboundedSender<Event>,
}

/// A generated token, for logprobs.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: u32,
    /// The token's own text ([`token_text`]).
    pub text: String,
    /// The bytes the token stands for (a piece of a character included).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely tokens at this position, best first, one entry per token id.
    pub top: Vec<TopToken>,
}

/// One alternative at a position.
#[derive(Debug, Clone)]
pub struct TopToken {
    pub id: u32,
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A token's text as OpenAI reports it: its bytes as UTF-8 when they are whole characters, else
/// `bytes:` and the bytes escaped (`bytes:\xe6\x97`), so a piece of a character is neither
/// shown as U+FFFD nor confused with another piece.
pub fn token_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut out = String::from("bytes:");
            for b in bytes {
                out.push_str(&format!("\\x{b:02x}"));
            }
            out
        }
    }
}

/// What a request's channel receives.
#[derive(Debug)]
pub enum Event {
    /// Text that can no longer change, the tokens sampled since the last event (with
    /// logprobs, when asked) and how many tokens the sequence has sampled in all.
    Delta {
        text: String,
        tokens: Vec<TokenInfo>,
        sampled: usize,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        /// Of `prompt_tokens`, how many came from the prefix cache.
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Failed(Failure),
}

/// Why a sequence ended without finishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    ShuttingDown,
    Internal(String),
}

impl From<Failure> for crate::error::ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::ShuttingDown => Self::ShuttingDown,
            Failure::Internal(m) => Self::Internal(m),
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    Stopped,
}

/// Handle to a model's scheduler thread. Dropping every handle lets the thread finish its
/// running sequences and exit.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: SyncSender<Command>,
    metrics: ModelMetrics,
}

#[derive(Debug)]
enum Command {
    Generate(Box<GenRequest>),
    /// Finish every running and waiting sequence now (shutdown deadline passed).
    CancelAll,
}

/// Every engine's forward passes take turns: they share the kernel thread pool.
static FORWARD: Mutex<()> = Mutex::new(());

impl Engine {
    pub fn start(
        name: String,
        model: Arc<Model>,
        tokenizer: Arc<TextTokenizer>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(config.queue);
        let metrics = metrics.model(&name);
        let m = metrics.clone();
        let thread_name = name.clone();
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                Scheduler {
                    name: thread_name,
                    prefixes: PrefixCache::new(config.prefix_cache_bytes),
                    model,
                    tokenizer,
                    config,
                    metrics: m,
                    seqs: Vec::new(),
                    caches: Vec::new(),
                }
                .run(rx)
            })?;
        Ok(Self { tx, metrics })
    }

    /// Queue a request, or refuse it at once when the queue is full.
    pub fn submit(&self, r: GenRequest) -> Result<(), SubmitError> {
        self.metrics.queue_depth.inc();
        match self.tx.try_send(Command::Generate(Box::new(r))) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.dec();
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Ask the scheduler to end every sequence now (best effort: skipped when the queue is full,
    /// in which case the next submit would be refused anyway).
    pub fn cancel_all(&self) {
        let _ = self.tx.try_send(Command::CancelAll);
    }
}

struct Seq {
    req: GenRequest,
    seq: Sequence,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    /// Tokens sampled but not yet sent with a text delta.
    unsent: Vec<TokenInfo>,
    last_token_at: Option<Instant>,
    done: bool,
}

/// One sequence's token draw of a step, run on the kernel threads.
struct Draw<'a> {
    seq: usize,
    logprob: bool,
    state: &'a mut Sequence,
    logits: &'a [f32],
    /// `None` after a panic in the draw.
    choice: Option<Choice>,
}

/// Shortest prefix worth keeping or reusing: below this a prefill costs next to nothing.
const MIN_PREFIX: usize = 16;

/// Finished sequences' KV caches, kept (least recently stored dropped first, within a byte
/// budget) for new prompts that start with the same tokens: a chat's next turn, or a shared
/// system prompt, skips the prefill of what it has in common. The keys and values of a position
/// depend only on the tokens up to it, and every kernel gives a token the same numbers whatever
/// else is in its pass, so a reused prefix is bitwise what a fresh prefill would compute.
struct PrefixCache {
    entries: std::collections::VecDeque<(Vec<u32>, KvCache)>,
    bytes: usize,
    budget: usize,
}

impl PrefixCache {
    fn new(budget: usize) -> Self {
        Self {
            entries: std::collections::VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    /// Keep `cache`, which holds the keys and values of `tokens`.
    fn insert(&mut self, tokens: Vec<u32>, cache: KvCache) {
        let size = cache.bytes();
        if tokens.len() < MIN_PREFIX || tokens.len() != cache.len() || size > self.budget {
            return;
        }
        // An entry whose tokens begin the new one's adds nothing any more.
        let mut freed = 0;
        self.entries.retain(|(t, c)| {
            let keep = !tokens.starts_with(t);
            if !keep {
                freed += c.bytes();
            }
            keep
        });
        self.bytes -= freed;
        self.bytes += size;
        self.entries.push_back((tokens, cache));
        while self.bytes > self.budget {
            let Some((_, c)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= c.bytes();
        }
    }

    /// Take the entry sharing the longest prefix with `prompt`, cut to the part it shares; at
    /// least one prompt token is left to feed (its logits start the generation).
    fn take(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let common = |t: &[u32]| t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let (i, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (i, common(t)))
            .max_by_key(|&(i, n)| (n, i))?;
        let reuse = shared.min(prompt.len().saturating_sub(1));
        if reuse < MIN_PREFIX {
            return None;
        }
        let (_, mut cache) = self.entries.remove(i)?;
        self.bytes -= cache.bytes();
        cache.truncate(reuse);
        Some((reuse, cache))
    }
}

struct Scheduler {
    name: String,
    prefixes: PrefixCache,
    model: Arc<Model>,
    tokenizer: Arc<TextTokenizer>,
    config: EngineConfig,
    metrics: ModelMetrics,
    seqs: Vec<Seq>,
    caches: Vec<KvCache>,
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Scheduler {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            // Wait for work when idle; otherwise take what is waiting, up to the batch size.
            if self.seqs.is_empty() {
                match rx.recv() {
                    Ok(c) => self.command(c, &rx),
                    Err(_) => return,
                }
            }
            while self.seqs.len() < self.config.max_batch {
                match rx.try_recv() {
                    Ok(c) => self.command(c, &rx),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.retire_abandoned();
            if !self.seqs.is_empty() {
                self.step();
            }
            self.metrics.running.set(self.seqs.len() as i64);
            self.metrics
                .kv_bytes
                .set(self.caches.iter().map(KvCache::bytes).sum::<usize>() as i64);
            self.metrics
                .prefix_cache_bytes
                .set(self.prefixes.bytes as i64);
        }
    }

    fn command(&mut self, c: Command, rx: &Receiver<Command>) {
        match c {
            Command::Generate(r) => {
                self.metrics.queue_depth.dec();
                self.admit(*r);
            }
            Command::CancelAll => {
                while let Ok(c) = rx.try_recv() {
                    if let Command::Generate(r) = c {
                        self.metrics.queue_depth.dec();
                        let _ = r.events.send(Event::Failed(Failure::ShuttingDown));
                    }
                }
                for s in &mut self.seqs {
                    let _ = s.req.events.send(Event::Failed(Failure::ShuttingDown));
                    s.done = true;
                }
                self.remove_done();
            }
        }
    }

    fn admit(&mut self, req: GenRequest) {
        if req.events.is_closed() {
            return;
        }
        let (cached, cache) = match self.prefixes.take(&req.prompt) {
            Some((n, cache)) => (n, cache),
            None => (0, self.model.new_cache()),
        };
        let seq = match Sequence::new(req.prompt.clone(), req.options.clone(), cached) {
            Ok(s) => s,
            Err(e) => {
                let _ = req.events.send(Event::Failed(Failure::Internal(format!(
                    "cannot start the sequence: {e}"
                ))));
                return;
            }
        };
        self.metrics.prompt_tokens_cached.inc_by(cached as u64);
        self.seqs.push(Seq {
            req,
            seq,
            cached,
            unsent: Vec::new(),
            last_token_at: None,
            done: false,
        });
        self.caches.push(cache);
    }

    /// Drop sequences whose client left or whose deadline passed.
    fn retire_abandoned(&mut self) {
        let now = Instant::now();
        for i in 0..self.seqs.len() {
            let s = &mut self.seqs[i];
            if s.req.events.is_closed() {
                s.done = true;
            } else if now >= s.req.deadline {
                let text = s.seq.stop(Some(&self.tokenizer), FinishReason::Timeout);
                Self::send_delta(s, text);
                Self::finish_seq(s);
            }
        }
        self.remove_done();
    }

    fn remove_done(&mut self) {
        let mut i = 0;
        while i < self.seqs.len() {
            if self.seqs[i].done {
                let mut fed = self.seqs.swap_remove(i).seq.into_history();
                let cache = self.caches.swap_remove(i);
                // What it fed (its prompt, then the tokens it generated but the last) may start
                // a later prompt.
                fed.truncate(cache.len());
                self.prefixes.insert(fed, cache);
            } else {
                i += 1;
            }
        }
    }

    /// End sequence `i` with an internal error (500 to its client). Its cache may hold part of
    /// a pass, so it is not kept for reuse.
    fn fail(&mut self, i: usize, why: String) {
        tracing::error!(model = %self.model_name(), "{why}");
        let s = &mut self.seqs[i];
        let _ = s.req.events.send(Event::Failed(Failure::Internal(why)));
        s.done = true;
        self.caches[i].clear();
    }

    fn model_name(&self) -> &str {
        &self.name
    }

    /// One forward pass over `steps` with the caches, a panic caught (the caches may then hold
    /// part of the pass).
    fn forward(
        model: &Model,
        steps: &[Step],
        caches: &mut [KvCache],
    ) -> Result<Vec<Vec<f32>>, String> {
        let _turn = FORWARD.lock().unwrap_or_else(|p| p.into_inner());
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward(steps, caches)
        })) {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(e)) => Err(format!("inference failed: {e}")),
            Err(p) => Err(format!("inference panicked: {}", panic_message(&*p))),
        }
    }

    /// The pass of `steps` failed: run each sequence's own steps alone (their numbers are the
    /// same alone or batched), so only the sequences whose work fails are failed. Returns the
    /// logits in step order, as the batched pass would have.
    fn isolate(&mut self, steps: &[Step], lens: &[usize]) -> Vec<Vec<f32>> {
        for (c, &n) in self.caches.iter_mut().zip(lens) {
            c.truncate(n);
        }
        let mut logits = Vec::new();
        for i in 0..self.seqs.len() {
            let own: Vec<Step> = steps
                .iter()
                .filter(|s| s.seq == i)
                .map(|s| Step { seq: 0, ..*s })
                .collect();
            if own.is_empty() {
                continue;
            }
            let cache = std::slice::from_mut(&mut self.caches[i]);
            match Self::forward(&self.model, &own, cache) {
                Ok(l) => logits.extend(l),
                Err(why) => self.fail(i, why),
            }
        }
        logits
    }

    fn step(&mut self) {
        let chunk = self.config.prefill_chunk.max(1);
        // The step's token budget: decode tokens first, then prompt tokens in the room left
        // (at least one when nothing decodes, so prompts advance). Each prompt being fed gets
        // an even share of the room first, then what is left goes to the shortest remainders
        // first: a short request that arrives during a long prefill is fed at once instead of
        // waiting for the long one to finish.
        let decoding = self.seqs.iter().filter(|s| !s.seq.prefilling()).count();
        let mut room = self.config.max_step_tokens.saturating_sub(decoding);
        if decoding == 0 {
            room = room.max(1);
        }
        let mut prefilling: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].seq.prefilling())
            .collect();
        let want = |i: usize| self.seqs[i].seq.prompt_left().min(chunk);
        let mut grant = vec![0usize; self.seqs.len()];
        if !prefilling.is_empty() {
            let share = (room / prefilling.len()).max(1);
            for &i in &prefilling {
                grant[i] = want(i).min(share).min(room);
                room -= grant[i];
            }
            prefilling.sort_by_key(|&i| self.seqs[i].seq.prompt_left());
            for &i in &prefilling {
                let extra = (want(i) - grant[i]).min(room);
                grant[i] += extra;
                room -= extra;
            }
        }
        let mut steps = Vec::new();
        let mut prefill = 0;
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if !s.seq.prefilling() {
                s.seq.push_steps(i, 1, &mut steps);
            } else if grant[i] > 0 {
                prefill += s.seq.push_steps(i, grant[i], &mut steps);
            }
        }
        let lens: Vec<usize> = self.caches.iter().map(KvCache::len).collect();
        self.metrics.prompt_tokens.inc_by(prefill as u64);
        let logits = match Self::forward(&self.model, &steps, &mut self.caches) {
            Ok(l) => l,
            Err(why) => {
                tracing::warn!(model = %self.model_name(), "{why}; running each sequence alone");
                self.isolate(&steps, &lens)
            }
        };
        // Logits come back in step order: one per sequence that asked (in sequence order),
        // failed sequences left out.
        let askers: Vec<usize> = {
            let mut v: Vec<usize> = steps
                .iter()
                .filter(|s| s.logits && !self.seqs[s.seq].done)
                .map(|s| s.seq)
                .collect();
            v.dedup();
            v
        };
        // Every asking sequence draws its token at once, on the kernel threads: each has its
        // own sampler, so the draws are independent (and a sequence's draw does not depend on
        // the others in the batch).
        let mut draws: Vec<Draw<'_>> = Vec::with_capacity(askers.len());
        let mut next_asker = askers.iter().peekable();
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if next_asker.next_if_eq(&&i).is_some() {
                let Some(l) = logits.get(draws.len()) else {
                    break;
                };
                draws.push(Draw {
                    seq: i,
                    logprob: s.req.logprobs.is_some(),
                    state: &mut s.seq,
                    logits: l,
                    choice: None,
                });
            }
        }
        pool::par_chunks_mut(&pool::current(), &mut draws, 1, &|_, d| {
            let d = &mut d[0];
            d.choice = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                d.state.draw(d.logits, d.logprob)
            }))
            .ok();
        });
        let picked: Vec<(usize, Option<Choice>)> =
            draws.into_iter().map(|d| (d.seq, d.choice)).collect();
        for ((i, choice), l) in picked.into_iter().zip(&logits) {
            let Some(choice) = choice else {
                self.fail(i, "sampling panicked".into());
                continue;
            };
            let full = self.caches[i].len() >= self.model.spec.context;
            let took = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.take(i, choice, l, full)
            }));
            match took {
                Ok(Ok(())) => {}
                Ok(Err(why)) => self.fail(i, why),
                Err(p) => self.fail(
                    i,
                    format!("taking a token panicked: {}", panic_message(&*p)),
                ),
            }
        }
        self.remove_done();
    }

    /// Take sequence `i`'s drawn token: stream what text became final, or end it.
    fn take(
        &mut self,
        i: usize,
        choice: Choice,
        logits: &[f32],
        context_full: bool,
    ) -> Result<(), String> {
        let (tok, metrics) = (&self.tokenizer, &self.metrics);
        let s = &mut self.seqs[i];
        metrics.generation_tokens.inc();
        let now = Instant::now();
        match s.last_token_at {
            None => metrics
                .ttft
                .observe(now.duration_since(s.req.received).as_secs_f64()),
            Some(t) => metrics.itl.observe(now.duration_since(t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        let step = s
            .seq
            .accept(choice.token, Some(tok), context_full)
            .map_err(|e| format!("detokenization failed: {e}"))?;
        if let (true, Some(k)) = (step.kept, s.req.logprobs) {
            let bytes = tok.token_bytes(choice.token);
            s.unsent.push(TokenInfo {
                id: choice.token,
                text: token_text(&bytes),
                bytes,
                logprob: choice.logprob,
                top: top_logprobs(logits, k)
                    .into_iter()
                    .map(|(id, logprob)| {
                        let bytes = tok.token_bytes(id);
                        TopToken {
                            id,
                            text: token_text(&bytes),
                            bytes,
                            logprob,
                        }
                    })
                    .collect(),
            });
        }
        Self::send_delta(s, step.text);
        if step.finish.is_some() {
            Self::finish_seq(s);
        }
        Ok(())
    }

    fn send_delta(s: &mut Seq, text: String) {
        if text.is_empty() && s.unsent.is_empty() {
            return;
        }
        let tokens = std::mem::take(&mut s.unsent);
        let sampled = s.seq.sampled();
        if s.req
            .events
            .send(Event::Delta {
                text,
                tokens,
                sampled,
            })
            .is_err()
        {
            s.done = true;
        }
    }

    fn finish_seq(s: &mut Seq) {
        let _ = s.req.events.send(Event::Done {
            finish: s.seq.finish().unwrap_or(FinishReason::Stop),
            prompt_tokens: s.req.prompt.len(),
            cached_tokens: s.cached,
            completion_tokens: s.seq.sampled(),
        });
        s.done = true;
    }
}

/// The `k` most likely tokens and their log-probabilities under `logits` (softmax), best first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 || logits.is_empty() {
        return Vec::new();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(max)
        + logits
            .iter()
            .map(|&v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i as u32, (f64::from(logits[i]) - lse) as f32))
        .collect()
}
