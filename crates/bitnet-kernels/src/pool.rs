//! A persistent thread pool for per-token work: workers stay alive between matrix products and
//! wait by spinning briefly, then sleeping, so handing out a product costs microseconds rather
//! than a thread spawn (fork/join per matmul would cost more than the matmul).
//!
//! A job is cut into shares that threads claim from a shared counter, so no share waits for a
//! particular thread: when a worker is descheduled (more runnable threads than cores, as with
//! several servers or an HTTP runtime on the same machine), the threads that are running take
//! its shares instead of spinning until it comes back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// The job being handed out: generation (high 32 bits), share count (next 16) and the next
    /// unclaimed share (low 16). One word, so a claim names its generation and share at once and
    /// a late worker can never claim a share of a job that has been replaced.
    ticket: AtomicU64,
    /// Shares of the current generation finished.
    done: AtomicUsize,
    shutdown: AtomicBool,
    /// The current job, lifetime-erased; valid while a share of it is unfinished (see `run`).
    job: Mutex<Option<*const Job>>,
    /// The first panic of the current job's shares, re-raised in the caller once every share
    /// has finished (as rayon does): a panicking share still counts as done, so neither the
    /// caller nor the other threads wait forever, and the borrowed job outlives every call.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: the raw job pointer is only dereferenced between `run` publishing it and `run`
// observing every share done, during which the pointee (borrowed by `run`) is alive; the pointee
// is `Sync`, so calling it from several threads is allowed.
#[allow(unsafe_code)]
unsafe impl Send for Shared {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Shared {}

/// A fixed set of worker threads; the calling thread works too.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    run_lock: Mutex<()>,
    threads: usize,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadPool({} threads)", self.threads)
    }
}

/// How long an idle worker spins before it sleeps on the condvar. Measured in time, not in
/// iterations: `pause` takes ~140 cycles on Sapphire Rapids but a few on Zen 4, and a worker
/// that falls asleep between two products of one token costs a futex wake-up per product (up
/// to a millisecond on a VM), which once cut 2-thread decode fourfold.
const SPIN_TIME: std::time::Duration = std::time::Duration::from_millis(5);
/// Spins between clock reads.
const SPIN_CHECK: u32 = 64;
/// How long `run` spins for its workers before yielding the CPU between checks.
const WAIT_SPINS: u32 = 20_000;
/// The most shares one job may be cut into (the width of the share fields of `ticket`).
pub const MAX_SHARES: usize = 1 << 15;

const SHARE_BITS: u32 = 16;
const GEN_SHIFT: u32 = 32;

fn ticket_parts(t: u64) -> (u64, usize, usize) {
    (
        t >> GEN_SHIFT,
        ((t >> SHARE_BITS) & 0xffff) as usize,
        (t & 0xffff) as usize,
    )
}

impl ThreadPool {
    /// A pool running jobs on `threads` threads in all (the caller plus `threads - 1` workers).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: Mutex::new(None),
            panic: Mutex::new(None),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|idx| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("bitnet-{idx}"))
                    .spawn(move || worker(&s))
                    .expect("spawn worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            run_lock: Mutex::new(()),
            threads,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f(i, n)` for every share `i` of `n = threads()` and wait for all: each thread of
    /// the pool usually takes one, but a thread that is not running leaves its share to the
    /// others.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        self.run_shares(self.threads, f);
    }

    /// Run `f(i, shares)` for `i` in `0..shares` on the pool's threads, each share exactly once,
    /// and wait for all. More shares than threads balance uneven progress between threads.
    ///
    /// A share that panics does not stop the others: every share still runs, and once all have
    /// finished the first panic is resumed on the calling thread. The pool stays usable.
    pub fn run_shares(&self, shares: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        assert!(
            shares <= MAX_SHARES,
            "{shares} shares: at most {MAX_SHARES}"
        );
        if self.threads == 1 || shares <= 1 {
            for i in 0..shares {
                f(i, shares);
            }
            return;
        }
        let turn = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.shared;
        #[allow(unsafe_code)]
        // SAFETY: erasing the lifetime is sound because this function does not return until
        // every share has been run (`done == shares` below) and then clears the job.
        let erased: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), &'static Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(erased);
        s.done.store(0, Ordering::Release);
        let generation = (s.ticket.load(Ordering::Acquire) >> GEN_SHIFT).wrapping_add(1);
        {
            let _g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            // Publishing the ticket (release) makes the job and `done` visible to any claim.
            s.ticket.store(
                (generation << GEN_SHIFT) | ((shares as u64) << SHARE_BITS),
                Ordering::Release,
            );
            s.wake.notify_all();
        }
        // The caller's own shares are caught like the workers' (inside `take_shares`): it must
        // not unwind out of here while a worker still runs the borrowed job.
        take_shares(s);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) != shares {
            spins += 1;
            if spins < WAIT_SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panic {
            drop(turn);
            std::panic::resume_unwind(payload);
        }
    }
}

/// Claim and run shares of the current job until none is left.
fn take_shares(s: &Shared) {
    loop {
        let (_, shares, i) = ticket_parts(s.ticket.fetch_add(1, Ordering::AcqRel));
        if i >= shares {
            return;
        }
        // The claim is valid, so the job it belongs to cannot finish before this share does:
        // the pointer read now is that job's.
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            #[allow(unsafe_code)]
            // SAFETY: `run_shares` keeps the job alive until every share is done, which happens
            // only after this call returns.
            let f = unsafe { &*job };
            // `AssertUnwindSafe`: after a panic the caller never sees the job's state again
            // except through the panic it re-raises, as a panic in a plain call would leave it.
            if let Err(payload) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i, shares)))
            {
                s.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(payload);
            }
        }
        s.done.fetch_add(1, Ordering::AcqRel);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let idle_since = std::time::Instant::now();
        let generation = || s.ticket.load(Ordering::Acquire) >> GEN_SHIFT;
        while generation() == seen && !s.shutdown.load(Ordering::Acquire) {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(SPIN_CHECK) || idle_since.elapsed() < SPIN_TIME {
                std::hint::spin_loop();
            } else {
                let g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                let _g = s
                    .wake
                    .wait_while(g, |_| {
                        generation() == seen && !s.shutdown.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(|e| e.into_inner());
                break;
            }
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = generation();
        take_shares(s);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _g = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

static CURRENT: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);

/// Threads the pool uses unless told otherwise: `BITNET_THREADS`, else every CPU the process may
/// run on.
pub fn default_threads() -> usize {
    std::env::var("BITNET_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Use a pool of `threads` threads for the kernels from now on (`--threads`). Products already
/// running finish on the pool they started with.
pub fn set_threads(threads: usize) {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if cur.as_ref().is_none_or(|p| p.threads() != threads.max(1)) {
        *cur = Some(Arc::new(ThreadPool::new(threads)));
    }
}

/// A pool of one thread (the caller): for work too small to hand out.
pub fn serial() -> Arc<ThreadPool> {
    static ONE: std::sync::OnceLock<Arc<ThreadPool>> = std::sync::OnceLock::new();
    Arc::clone(ONE.get_or_init(|| Arc::new(ThreadPool::new(1))))
}

/// The pool the kernels run on (created with [`default_threads`] on first use).
pub fn current() -> Arc<ThreadPool> {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(cur.get_or_insert_with(|| Arc::new(ThreadPool::new(default_threads()))))
}

/// The contiguous share `[start, end)` of `n` items that thread `i` of `t` handles.
pub fn share(n: usize, i: usize, t: usize) -> std::ops::Range<usize> {
    (n * i / t)..(n * (i + 1) / t)
}

/// Disjoint writes into an `[n_tokens, stride]` output from several threads: each thread gets a
/// writer limited to its own column range, so no two threads touch the same element.
#[derive(Debug)]
pub struct ColumnWriter<'a, T> {
    ptr: *mut T,
    len: usize,
    stride: usize,
    cols: std::ops::Range<usize>,
    _life: std::marker::PhantomData<&'a mut [T]>,
}

impl<T: Copy> ColumnWriter<'_, T> {
    /// Write `values` to columns `c..c + values.len()` of token `t` (all in this writer's range).
    #[inline]
    pub fn set_run(&self, t: usize, c: usize, values: &[T]) {
        let end = c + values.len();
        assert!(
            self.cols.start <= c && end <= self.cols.end,
            "columns {c}..{end} outside this writer's {:?}",
            self.cols
        );
        let i = t * self.stride + c;
        assert!(
            i + values.len() <= self.len,
            "run past the output of {}",
            self.len
        );
        #[allow(unsafe_code)]
        // SAFETY: the run is in bounds (checked above) and its columns belong to this writer
        // alone, so no other thread writes these elements; `values` cannot alias the output
        // (the output is only reachable through writers).
        unsafe {
            // Fixed-size chunk writes, not a loop LLVM would turn back into a `memcpy` call:
            // runs are short (4 to 16 values) and a libc call per run costs more than the copy.
            let dst = self.ptr.add(i);
            let mut chunks = values.chunks_exact(4);
            let mut k = 0;
            for c in &mut chunks {
                dst.add(k)
                    .cast::<[T; 4]>()
                    .write_unaligned([c[0], c[1], c[2], c[3]]);
                k += 4;
            }
            for &v in chunks.remainder() {
                dst.add(k).write(v);
                k += 1;
            }
        }
    }

    /// Write element `(t, c)`; `c` must lie in this writer's columns.
    #[inline]
    pub fn set(&self, t: usize, c: usize, v: T) {
        assert!(
            self.cols.contains(&c),
            "column {c} outside this writer's {:?}",
            self.cols
        );
        let i = t * self.stride + c;
        assert!(i < self.len, "element {i} past the output of {}", self.len);
        #[allow(unsafe_code)]
        // SAFETY: `i` is in bounds (checked above) and column `c` belongs to this writer alone
        // (`par_columns` hands out disjoint ranges), so no other thread writes this element.
        unsafe {
            *self.ptr.add(i) = v;
        }
    }
}

/// Shares per thread that [`par_columns`] cuts a product into.
const SHARES_PER_THREAD: usize = 4;
/// Shares per thread, at most, that [`par_chunks_mut`] hands its chunks out in.
const CHUNK_SHARES_PER_THREAD: usize = 16;

/// Split columns `0..cols` of `out` (`[n, stride]`) into disjoint ranges aligned to `align`,
/// and run `f(columns, writer)` for each on the pool.
pub fn par_columns<T: Copy + Send>(
    pool: &ThreadPool,
    out: &mut [T],
    stride: usize,
    cols: usize,
    align: usize,
    f: &(dyn Fn(std::ops::Range<usize>, &ColumnWriter<'_, T>) + Sync),
) {
    let units = cols.div_ceil(align.max(1));
    // A few shares per thread, claimed as threads come free: a thread that is held up (another
    // process, the HTTP runtime) costs the product its shares, not a whole thread's part.
    let shares = if pool.threads() > 1 {
        (pool.threads() * SHARES_PER_THREAD).min(units).max(1)
    } else {
        1
    };
    let ptr = SendPtr(out.as_mut_ptr());
    let len = out.len();
    pool.run_shares(shares, &|i, _| {
        let u = share(units, i, shares);
        let c = (u.start * align).min(cols)..(u.end * align).min(cols);
        if c.is_empty() {
            return;
        }
        let w = ColumnWriter {
            ptr: ptr.get(),
            len,
            stride,
            cols: c.clone(),
            _life: std::marker::PhantomData,
        };
        f(c, &w);
    });
}

/// Run `f(index, chunk)` for every `chunk_len`-long chunk of `out` (the last may be shorter) on
/// the pool's threads. The chunks are disjoint, so each call gets its own mutably.
pub fn par_chunks_mut<T: Send>(
    pool: &ThreadPool,
    out: &mut [T],
    chunk_len: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    assert!(chunk_len > 0, "chunks of length 0");
    let chunks = out.len().div_ceil(chunk_len);
    // Chunks are small units (a token's row, a head group): many shares balance them; a pool of
    // one thread runs its shares in turn.
    let shares = chunks.min(pool.threads() * CHUNK_SHARES_PER_THREAD);
    let ptr = SendPtr(out.as_mut_ptr());
    let len = out.len();
    pool.run_shares(shares, &|i, n| {
        for c in share(chunks, i, n) {
            let start = c * chunk_len;
            let end = (start + chunk_len).min(len);
            #[allow(unsafe_code)]
            // SAFETY: `start..end` lies inside `out`, which this function borrows mutably for
            // its whole run; chunk `c` belongs to share `i` alone and every share runs exactly
            // once, so no two calls see overlapping elements.
            let chunk =
                unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), end - start) };
            f(c, chunk);
        }
    });
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: the pointer is only used through `ColumnWriter`, whose writes are disjoint per thread.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn runs_on_every_thread_many_times() {
        let pool = ThreadPool::new(3);
        for round in 0..2000 {
            let hits = AtomicUsize::new(0);
            let mask = AtomicUsize::new(0);
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits.fetch_add(1, Ordering::Relaxed);
                mask.fetch_or(1 << i, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 3, "round {round}");
            assert_eq!(mask.load(Ordering::Relaxed), 0b111);
        }
    }

    #[test]
    fn every_share_runs_once_whatever_the_count() {
        let pool = ThreadPool::new(3);
        for shares in [0, 1, 2, 3, 7, 64, 1000] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..shares).map(|_| AtomicUsize::new(0)).collect();
                pool.run_shares(shares, &|i, n| {
                    assert_eq!(n, shares);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_stalled_thread_does_not_hold_up_the_others() {
        // Share 0 waits until the seven others have run. That only ends if the thread not stuck
        // in it claims all of them; with a fixed part per thread, the stuck thread's part would
        // never run and the wait would end by its timeout instead.
        let pool = ThreadPool::new(2);
        let others = AtomicUsize::new(0);
        let saw_all = AtomicBool::new(false);
        pool.run_shares(8, &|i, _| {
            if i == 0 {
                let t = std::time::Instant::now();
                while others.load(Ordering::Acquire) < 7
                    && t.elapsed() < std::time::Duration::from_secs(20)
                {
                    std::thread::yield_now();
                }
                saw_all.store(others.load(Ordering::Acquire) == 7, Ordering::Release);
            } else {
                others.fetch_add(1, Ordering::AcqRel);
            }
        });
        assert!(
            saw_all.load(Ordering::Acquire),
            "the other shares waited for the stalled one"
        );
    }

    fn panics_in(pool: &ThreadPool, bad: usize, shares: usize) -> (usize, String) {
        let ran = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run_shares(shares, &|i, _| {
                // Every share is slow enough that the workers are still running when the bad
                // one panics: an early return from `run_shares` would free what they borrow.
                std::thread::sleep(std::time::Duration::from_millis(2));
                if i == bad {
                    panic!("share {i} fails");
                }
                ran.fetch_add(1, Ordering::AcqRel);
            });
        }));
        let message = match result {
            Ok(()) => String::new(),
            Err(p) => p
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "non-string panic".into()),
        };
        (ran.load(Ordering::Acquire), message)
    }

    #[test]
    fn a_panicking_share_is_raised_in_the_caller_after_the_others_finish() {
        let pool = ThreadPool::new(3);
        // Share 0 is usually the caller's, the last ones the workers': both sides panic.
        for bad in [0, 5, 11] {
            let (ran, message) = panics_in(&pool, bad, 12);
            assert_eq!(message, format!("share {bad} fails"));
            assert_eq!(ran, 11, "every other share ran before the panic was raised");
        }
        // The pool is not wedged: later jobs run every share.
        let hits = AtomicUsize::new(0);
        pool.run_shares(64, &|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn a_panic_on_a_single_thread_pool_is_a_plain_panic() {
        let pool = ThreadPool::new(1);
        let (ran, message) = panics_in(&pool, 1, 3);
        assert_eq!(message, "share 1 fails");
        assert_eq!(ran, 1, "share 0 ran, share 2 never started");
    }

    #[test]
    fn chunks_are_handed_out_once_each() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (len, chunk) in [(0, 3), (1, 1), (10, 3), (1000, 7), (64, 64)] {
                let mut out = vec![0usize; len];
                par_chunks_mut(&pool, &mut out, chunk, &|c, s| {
                    assert!(s.len() == chunk || (c + 1) * chunk >= len);
                    for (j, v) in s.iter_mut().enumerate() {
                        *v += c * chunk + j + 1;
                    }
                });
                assert!(
                    out.iter().enumerate().all(|(i, &v)| v == i + 1),
                    "{threads} {len} {chunk}"
                );
            }
        }
    }

    #[test]
    fn columns_are_written_once() {
        let pool = ThreadPool::new(2);
        let (n, stride, cols) = (3, 10, 9);
        let mut out = vec![0u32; n * stride];
        par_columns(&pool, &mut out, stride, cols, 4, &|c, w| {
            for t in 0..n {
                for col in c.clone() {
                    w.set(t, col, (t * 100 + col) as u32 + 1);
                }
            }
        });
        for t in 0..n {
            for col in 0..stride {
                assert_eq!(
                    out[t * stride + col],
                    if col < cols {
                        (t * 100 + col) as u32 + 1
                    } else {
                        0
                    }
                );
            }
        }
    }
}
