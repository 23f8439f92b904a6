//! Knowledge distillation: a float teacher that the inference engine runs scores every training
//! position, and the student learns from the teacher's whole next-token distribution as well as
//! from the data's next token.
//!
//! The objective of a batch is `alpha * T² * KL(p_T || q_T) + (1 - alpha) * CE`, where `p_T` and
//! `q_T` are the teacher's and the student's softmax at temperature `T`, the KL divergence is
//! summed over the vocabulary and averaged over positions (`torch.nn.functional.kl_div(...,
//! reduction="batchmean", log_target=True)` over `[positions, vocab]`), and `CE` is the usual mean
//! next-token cross-entropy (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015:
//! the `T²` keeps the soft term's gradient on the scale of the hard one's).
//!
//! The teacher runs on the CPU in its own thread. For a student on a GPU it scores one
//! micro-batch ahead, so that its next batch is computed while the student trains on this one;
//! a student on the CPU waits for it instead of competing for the same cores.

use crate::error::{Result, TrainError};
use bitnet_formats::tokenizer::TextTokenizer;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

/// Scores token sequences: the soft targets of distillation.
pub trait Teacher: Send + Sync {
    /// The size of the teacher's vocabulary (and of each row of logits).
    fn vocab(&self) -> usize;
    /// Logits `[rows * seq, vocab]`, row-major, of every position of `rows` sequences of `seq`
    /// tokens each (`ids.len() == rows * seq`), each sequence run from an empty context.
    fn logits(&self, ids: &[u32], rows: usize, seq: usize) -> Result<Vec<f32>>;
    /// What the teacher is, for the run's log.
    fn describe(&self) -> String;
}

impl std::fmt::Debug for dyn Teacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A model our inference engine loads (a GGUF file or a Hugging Face directory), run in f32
/// activations with its weights as stored.
pub struct EngineTeacher {
    model: bitnet_model::Model,
    path: PathBuf,
    description: String,
}

/// Tokens per engine call: whole sequences, batched up to about this many positions (the
/// engine's batched forward gains little past it, and the logits of a call are held at once).
const TOKENS_PER_CALL: usize = 1024;

impl std::fmt::Debug for EngineTeacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EngineTeacher({})", self.describe())
    }
}

impl EngineTeacher {
    /// Load a teacher, with its tokenizer when the checkpoint ships one.
    pub fn load(path: &Path) -> Result<(Self, Option<TextTokenizer>)> {
        let loaded = bitnet_model::load(path).map_err(|e| TrainError::Config {
            path: path.into(),
            message: format!("cannot load the teacher: {e}"),
        })?;
        let teacher = Self {
            model: loaded.model,
            path: path.into(),
            description: loaded.description,
        };
        Ok((teacher, loaded.tokenizer))
    }
}

impl Teacher for EngineTeacher {
    fn vocab(&self) -> usize {
        self.model.spec.vocab
    }

    fn logits(&self, ids: &[u32], rows: usize, seq: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(ids.len(), rows * seq);
        let vocab = self.vocab();
        let mut out = Vec::with_capacity(rows * seq * vocab);
        let per_call = (TOKENS_PER_CALL / seq.max(1)).max(1);
        for first in (0..rows).step_by(per_call) {
            let n = per_call.min(rows - first);
            let steps: Vec<bitnet_model::model::Step> = (0..n)
                .flat_map(|r| {
                    ids[(first + r) * seq..(first + r + 1) * seq]
                        .iter()
                        .map(move |&token| bitnet_model::model::Step {
                            seq: r,
                            token,
                            logits: true,
                        })
                })
                .collect();
            let mut caches: Vec<_> = (0..n).map(|_| self.model.new_cache()).collect();
            for row in self.model.forward(&steps, &mut caches)? {
                out.extend_from_slice(&row);
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        if self.description.contains(&*self.path.to_string_lossy()) {
            self.description.clone()
        } else {
            format!("{} ({})", self.path.display(), self.description)
        }
    }
}

/// A batch for the teacher: the student's input tokens of `rows` rows of `seq` tokens.
type Job = (Vec<u32>, usize, usize);

/// The teacher's answers, in the order of the jobs still waiting for them.
type Outstanding = (Receiver<Result<Vec<f32>>>, VecDeque<Job>);

/// The teacher's thread: batches go in in training order and their logits come out in the
/// same order, so the next batch is scored while the student trains on the current one.
pub struct TeacherFeed {
    teacher: Arc<dyn Teacher>,
    jobs: Sender<Job>,
    results: Mutex<Outstanding>,
}

impl std::fmt::Debug for TeacherFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TeacherFeed({})", self.teacher.describe())
    }
}

impl TeacherFeed {
    pub fn new(teacher: Arc<dyn Teacher>) -> Result<Self> {
        let (jobs, inbox) = channel::<Job>();
        let (outbox, results) = channel();
        let t = teacher.clone();
        std::thread::Builder::new()
            .name("bitnet-teacher".into())
            .spawn(move || {
                for (ids, rows, seq) in inbox {
                    if outbox.send(t.logits(&ids, rows, seq)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| TrainError::Config {
                path: "teacher".into(),
                message: format!("cannot start the teacher's thread: {e}"),
            })?;
        Ok(Self {
            teacher,
            jobs,
            results: Mutex::new((results, VecDeque::new())),
        })
    }

    pub fn teacher(&self) -> &dyn Teacher {
        &*self.teacher
    }

    /// The logits of `job`, and `next` handed to the teacher before waiting, so that it is
    /// being scored while the caller trains on these. A job already handed over (the `next` of
    /// the previous call) is not scored twice; one that is not the oldest outstanding (a run
    /// that skipped ahead) discards what came before it.
    pub fn logits(&self, job: Job, next: Option<Job>) -> Result<Vec<f32>> {
        let mut guard = self.results.lock().unwrap_or_else(|p| p.into_inner());
        let (results, pending) = &mut *guard;
        let dead = || TrainError::Config {
            path: "teacher".into(),
            message: "the teacher's thread stopped".into(),
        };
        if !pending.contains(&job) {
            // Drop whatever was asked for before; it will never be consumed.
            while pending.pop_front().is_some() {
                results.recv().map_err(|_| dead())??;
            }
            self.jobs.send(job.clone()).map_err(|_| dead())?;
            pending.push_back(job.clone());
        }
        if let Some(n) = next
            && !pending.contains(&n)
        {
            self.jobs.send(n.clone()).map_err(|_| dead())?;
            pending.push_back(n);
        }
        while let Some(front) = pending.pop_front() {
            let out = results.recv().map_err(|_| dead())?;
            if front == job {
                return out;
            }
            out?;
        }
        Err(dead())
    }
}
