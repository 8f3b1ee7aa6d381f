//! A decode step's kernels planned first and run afterwards, all of them in one parallel region.
//!
//! Run one at a time, each kernel is a libtorch allocation, a few metadata calls and an OpenMP
//! region, on the main thread while the other threads wait; between two weight streams (which
//! evict libtorch's code and data from the caches) that came to about 2 ms of a 10.3 ms bf16
//! batch-1 step of SmolLM2 on the AMX Xeon VM, where the products alone streamed the same
//! weights in 7.9 ms. Planned, the kernels make their checks and outputs back to back (warm),
//! and their work becomes a list of jobs; `Plan::run` then enters one region, in which every
//! thread takes its part of each job in turn, with a barrier between jobs (each job reads what
//! the one before wrote). Each output of a job is computed as it would be run alone, so a
//! planned step computes exactly what the kernels compute one by one, though the parts may
//! differ: a job a kernel would keep on one thread to save a hand-off splits (`Sink::planned`),
//! and a product's parts are shared out in pieces (`Sink::share`), a thread done early taking
//! the others' last ones. A thread waiting at a barrier asks for what its part of the next
//! job reads first (`Sink::warm`: a product's weights, an attention's K and V).
//!
//! Kernels take the place their work goes as a `Sink`: `Now` runs it at once (every caller but
//! the planned decode step), a `Plan` records it. Planning runs no work, so a kernel must not
//! read its inputs' values while it plans: where it would copy an input (a conversion, or
//! `contiguous` on a strided view), it declines to plan (`Sink::unchanged`), and the caller
//! runs the step the usual way.
//!
//! A plan can run again: its jobs read their inputs' memory when they run, so a caller that
//! refills the inputs in place (tensors at fixed addresses, the rows' slots in `Contexts`) runs
//! the next step without planning it (`model::decode_plan`).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tch::Tensor;

use super::threads::{self, gomp, Gomp};

/// Where a kernel's work goes.
pub trait Sink<'a> {
    /// `run` over `0..n` split across the threads as `threads::split` splits it.
    fn split(
        &mut self,
        n: usize,
        align: usize,
        split: bool,
        run: impl Fn(Range<usize>) + Send + Sync + 'a,
    );

    /// As `split`, for work whose every index computes the same whatever range it runs in: a
    /// plan cuts each thread's part into pieces of `piece` indices (rounded up to `align`),
    /// and a thread done with its own part takes the others' last pieces. Run now, `split`.
    fn share(
        &mut self,
        n: usize,
        align: usize,
        piece: usize,
        split: bool,
        run: impl Fn(Range<usize>) + Send + Sync + 'a,
    ) {
        let _ = piece;
        self.split(n, align, split, run)
    }

    /// For the work just given: `warm(range)` asks for what the work on `range` will read
    /// first (prefetches only). In a plan, a thread waiting for the others before the job
    /// warms the start of its part meanwhile. Run now, nothing.
    fn warm(&mut self, warm: impl Fn(Range<usize>) + Send + Sync + 'a) {
        let _ = warm;
    }

    /// Keeps `t` alive until the work has run (a planned job points into it).
    fn keep(&mut self, t: &Tensor);

    /// Whether `prepared` (an input after `contiguous` or a conversion) is usable: always when
    /// the work runs now; when planned, only if it is `input` itself rather than a copy, which
    /// would have been taken of values not yet computed.
    fn unchanged(&self, input: &Tensor, prepared: &Tensor) -> bool;

    /// Whether the work is planned: then the other threads wait at the job's barrier whether
    /// it splits or not, so a kernel that keeps small work on one thread to save a hand-off
    /// need not.
    fn planned(&self) -> bool;
}

/// Runs each kernel's work at once.
pub struct Now;

impl<'a> Sink<'a> for Now {
    fn split(
        &mut self,
        n: usize,
        align: usize,
        split: bool,
        run: impl Fn(Range<usize>) + Send + Sync + 'a,
    ) {
        threads::split(n, align, split, &run)
    }

    fn keep(&mut self, _: &Tensor) {}

    fn unchanged(&self, _: &Tensor, _: &Tensor) -> bool {
        true
    }

    fn planned(&self) -> bool {
        false
    }
}

/// One kernel's recorded work.
struct Job<'a> {
    n: usize,
    align: usize,
    split: bool,
    /// Pieces of a shared job (`Sink::share`); 0 for one that keeps its parts.
    piece: usize,
    run: Box<dyn Fn(Range<usize>) + Send + Sync + 'a>,
    warm: Option<Box<dyn Fn(Range<usize>) + Send + Sync + 'a>>,
}

/// Kernels' work recorded in order, to run in one parallel region (`run`), as many times as
/// the caller likes: each run computes from what its inputs hold then. Dropped unrun, it runs
/// nothing: a caller whose plan a kernel declined can still take another path.
#[derive(Default)]
pub struct Plan<'a> {
    jobs: Vec<Job<'a>>,
    kept: Vec<Tensor>,
}

impl<'a> Sink<'a> for Plan<'a> {
    fn split(
        &mut self,
        n: usize,
        align: usize,
        split: bool,
        run: impl Fn(Range<usize>) + Send + Sync + 'a,
    ) {
        self.share(n, align, 0, split, run)
    }

    fn share(
        &mut self,
        n: usize,
        align: usize,
        piece: usize,
        split: bool,
        run: impl Fn(Range<usize>) + Send + Sync + 'a,
    ) {
        self.jobs.push(Job {
            n,
            align,
            split,
            // 0 keeps the parts whole (`split`).
            piece: if piece == 0 {
                0
            } else {
                piece.next_multiple_of(align.max(1))
            },
            run: Box::new(run),
            warm: None,
        });
    }

    fn warm(&mut self, warm: impl Fn(Range<usize>) + Send + Sync + 'a) {
        if let Some(job) = self.jobs.last_mut() {
            job.warm = Some(Box::new(warm));
        }
    }

    fn keep(&mut self, t: &Tensor) {
        self.kept.push(t.shallow_clone());
    }

    fn unchanged(&self, input: &Tensor, prepared: &Tensor) -> bool {
        input.data_ptr() == prepared.data_ptr()
    }

    fn planned(&self) -> bool {
        true
    }
}

impl Plan<'_> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs every job in order: in one region on libtorch's OpenMP team, or on this thread
    /// where there is no team.
    pub fn run(&self) {
        let threads = threads::team_size();
        let Some(gomp) = gomp().filter(|_| threads > 1) else {
            for job in &self.jobs {
                if job.n > 0 {
                    (job.run)(0..job.n);
                }
            }
            return;
        };
        let team = Team {
            jobs: &self.jobs,
            barrier: Barrier::default(),
            claims: (0..threads).map(|_| Claim::default()).collect(),
            asked: threads,
            gomp,
        };
        // Dealt for the team asked for: a region given fewer threads runs the first job in
        // whole parts instead (`member`); later jobs are dealt inside the region.
        if let Some(first) = self.jobs.first() {
            team.deal(first, threads);
        }
        // SAFETY: `member` only reads `team`, which outlives the region.
        unsafe {
            (gomp.parallel)(
                member,
                &team as *const Team as *mut std::ffi::c_void,
                threads as std::ffi::c_uint,
                0,
            )
        };
    }
}

/// What every team member reads.
struct Team<'p, 'a> {
    jobs: &'p [Job<'a>],
    barrier: Barrier,
    /// Each thread's pieces of the shared job under way.
    claims: Vec<Claim>,
    /// The threads asked for, which the first job's claims were dealt for.
    asked: usize,
    gomp: &'static Gomp,
}

extern "C" fn member(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is the `Team` that `Plan::run` keeps alive until the region ends.
    let team = unsafe { &*(data as *const Team) };
    // SAFETY: called inside the parallel region.
    let (me, size) = unsafe { team.gomp.me() };
    for (at, job) in team.jobs.iter().enumerate() {
        let dealt = at > 0 || size == team.asked;
        if job.piece > 0 && job.splits(size) && dealt {
            team.share(job, me, size);
        } else {
            let part = job.part(me, size);
            if !part.is_empty() {
                (job.run)(part);
            }
        }
        let next = team.jobs.get(at + 1);
        let mut warming = next.and_then(|next| Warming::of(next, me, size));
        team.barrier.wait(
            size,
            || warming.as_mut().is_some_and(Warming::step),
            || next.map_or((), |next| team.deal(next, size)),
        );
    }
}

impl Job<'_> {
    /// Whether the job goes to several threads, as `threads::split` would send it.
    fn splits(&self, size: usize) -> bool {
        self.split && size > 1 && self.n >= 2 * self.align.max(1)
    }

    /// The part thread `me` of `size` runs (a shared job's, the part it starts with): what
    /// `threads::split` would give it, or the whole job on the first thread when that would
    /// not split it.
    fn part(&self, me: usize, size: usize) -> Range<usize> {
        if self.splits(size) {
            threads::part(self.n, size, self.align, me)
        } else if me == 0 {
            0..self.n
        } else {
            0..0
        }
    }
}

/// A thread's warming of the start of its part of the next job (`Sink::warm`: a product's
/// weights, an attention's K and V) while it waits at the barrier before it, a piece at a
/// time, so that it sees the barrier open soon after.
///
/// At batch 1 the second thread waits while the first runs each one-row job (a norm, the
/// rotation, the activation) and the second of its attention's KV heads: 0.36 ms of a bf16
/// SmolLM2 step on the Zen 4 VM, with the memory idle meanwhile. Warming the next product's
/// first weights then, with `Team::share` (so that the thread ahead takes over the other's
/// last pieces), made planned batch-1 steps of either dtype faster in 32 of 36 turns of 60
/// steps of each, alternated step by step on the Zen 4 VM: mostly by 1-2.5%, by up to 7%,
/// and the other four were within 0.7%. Sharing alone was ahead in 31 of 44 turns, mostly by
/// 0.5-2%. Warming 4 or 16 pieces was level with 8.
struct Warming<'j, 'a> {
    warm: &'j (dyn Fn(Range<usize>) + Send + Sync + 'a),
    at: usize,
    end: usize,
    piece: usize,
}

impl<'j, 'a> Warming<'j, 'a> {
    /// The most pieces warmed: 256-384 KiB of SmolLM2's weights, a quarter to a third of the
    /// Zen 4's L2.
    const PIECES: usize = 8;

    fn of(job: &'j Job<'a>, me: usize, size: usize) -> Option<Self> {
        let warm = job.warm.as_deref()?;
        let part = job.part(me, size);
        let piece = job.piece.max(job.align.max(1));
        Some(Self {
            warm,
            at: part.start,
            end: part.end.min(part.start + Self::PIECES * piece),
            piece,
        })
    }

    /// Warms the next piece; false when none is left.
    fn step(&mut self) -> bool {
        if self.at >= self.end {
            return false;
        }
        let to = (self.at + self.piece).min(self.end);
        (self.warm)(self.at..to);
        self.at = to;
        true
    }
}

impl Team<'_, '_> {
    /// Hands every thread its pieces of `job` if it is shared: before any thread starts it
    /// (by the last thread at the barrier before it, which opens it afterwards), so that a
    /// thread done early finds every other part's pieces there to take.
    fn deal(&self, job: &Job, size: usize) {
        if job.piece == 0 || !job.splits(size) {
            return;
        }
        for (me, claim) in self.claims.iter().enumerate().take(size) {
            let part = threads::part(job.n, size, job.align, me);
            claim.0.store(
                Claim::pack(0, part.len().div_ceil(job.piece)),
                Ordering::Relaxed,
            );
        }
    }

    /// A shared job: this thread's own part piece by piece from its start, then the other
    /// threads' last pieces, one at a time, until none is left.
    ///
    /// A thread's own pieces are contiguous, so its stream (and its prefetches past each
    /// piece's end) goes on as if the part were run whole. The products of a batch-1 step
    /// split evenly left a thread waiting at their barriers for 7-16% of the time it worked
    /// (each product's sum over 200 steps on the Zen 4 VM; each thread waited for the other,
    /// so neither is simply the slower), time that a thread done early now spends on the tail
    /// of the other's part, or one that warmed its start (`Warming`) gains.
    fn share(&self, job: &Job, me: usize, size: usize) {
        let piece = |owner: usize, i: usize| {
            let part = threads::part(job.n, size, job.align, owner);
            (part.start + i * job.piece).min(part.end)
                ..(part.start + (i + 1) * job.piece).min(part.end)
        };
        let own = &self.claims[me];
        while let Some(i) = own.take(true) {
            (job.run)(piece(me, i));
        }
        for other in (1..size).map(|d| (me + d) % size) {
            while let Some(i) = self.claims[other].take(false) {
                (job.run)(piece(other, i));
            }
        }
    }
}

/// The pieces of a thread's part not yet taken, `next..end` packed in one word, so that the
/// owner taking from the front and thieves taking from the back never take the same piece.
/// On a line of its own: the owner updates it at every piece.
#[derive(Default)]
#[repr(align(128))]
struct Claim(AtomicU64);

impl Claim {
    fn pack(next: usize, end: usize) -> u64 {
        ((next as u64) << 32) | end as u64
    }

    /// Takes the first piece left (the owner) or the last (a thief), if any.
    fn take(&self, first: bool) -> Option<usize> {
        let mut now = self.0.load(Ordering::Acquire);
        loop {
            let (next, end) = ((now >> 32) as usize, (now & u32::MAX as u64) as usize);
            if next >= end {
                return None;
            }
            let (taken, left) = if first {
                (next, Self::pack(next + 1, end))
            } else {
                (end - 1, Self::pack(next, end - 1))
            };
            match self
                .0
                .compare_exchange_weak(now, left, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(taken),
                Err(seen) => now = seen,
            }
        }
    }
}

/// A spinning barrier for the region's team. Most waits between jobs are a few microseconds
/// (a one-row norm on the other thread), of the order of a futex wake-up, which a sleeping
/// barrier would add to each of a step's few hundred jobs.
#[derive(Default)]
struct Barrier {
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl Barrier {
    /// Waits for the others, calling `idle` while it waits until it returns false; the last
    /// to arrive runs `last` before it lets the others go.
    fn wait(&self, size: usize, mut idle: impl FnMut() -> bool, last: impl FnOnce()) {
        if size <= 1 {
            return last();
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == size {
            last();
            self.arrived.store(0, Ordering::Relaxed);
            // Publishes every thread's writes (their `fetch_add`s) to the waiting ones.
            self.generation.store(generation + 1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        let mut busy = true;
        while self.generation.load(Ordering::Acquire) == generation {
            if busy {
                busy = idle();
                continue;
            }
            // A thread the hypervisor took away would hold the others up anyway; yielding
            // after a long wait lets a co-scheduled thread run meanwhile.
            if spins < 1 << 16 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_each_index_once() {
        let _ = tch::get_num_threads(); // libtorch (and its libgomp) loaded
        let n = 10_000;
        let first: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let second: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let whole = AtomicUsize::new(0);
        let mut plan = Plan::new();
        plan.split(n, 16, true, |r: Range<usize>| {
            for i in r {
                first[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        // The second job reads what the first wrote at the mirrored index, which another
        // thread's part wrote: the barrier between them must have published it.
        plan.split(n, 1, true, |r: Range<usize>| {
            for i in r {
                let before = first[n - 1 - i].load(Ordering::Relaxed);
                second[i].fetch_add(before, Ordering::Relaxed);
            }
        });
        // Not split: the whole job on one thread.
        plan.split(n, 1, false, |r: Range<usize>| {
            whole.fetch_add(r.len(), Ordering::Relaxed);
        });
        plan.run();
        assert!(first.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert!(second.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert_eq!(whole.load(Ordering::Relaxed), n);
        // Run again, it reads what its inputs hold now: the second job adds the first's 2s.
        plan.run();
        assert!(first.iter().all(|h| h.load(Ordering::Relaxed) == 2));
        assert!(second.iter().all(|h| h.load(Ordering::Relaxed) == 3));
        assert_eq!(whole.load(Ordering::Relaxed), 2 * n);
    }

    #[test]
    fn shared_pieces_run_once_and_a_free_thread_takes_the_others() {
        let _ = tch::get_num_threads();
        let Some(gomp) = gomp().filter(|_| threads::team_size() >= 2) else {
            eprintln!("skipping: one thread");
            return;
        };
        let (n, size) = (1000, threads::team_size());
        // Per index, the team members that ran it.
        let ran_by: Vec<std::sync::Mutex<Vec<usize>>> =
            (0..n).map(|_| Default::default()).collect();
        let first = threads::part(n, size, 16, 0);
        let taken = || {
            first
                .clone()
                .any(|i| ran_by[i].lock().is_ok_and(|by| by.iter().any(|&m| m != 0)))
        };
        // libgomp may give a region fewer threads than asked for while other tests load the
        // machine: then no other thread could take a piece.
        let team = AtomicUsize::new(0);
        let held = std::sync::atomic::AtomicBool::new(false);
        let mut plan = Plan::new();
        plan.share(n, 16, 20, true, |r: Range<usize>| {
            // SAFETY: called inside the plan's parallel region.
            let (me, actual) = unsafe { gomp.me() };
            team.store(actual, Ordering::Relaxed);
            if me == 0 && actual == size && !held.swap(true, Ordering::Relaxed) {
                // The first thread's first piece holds it until another thread has taken a
                // piece of its part (the deadline turns a failure into an assertion rather
                // than a hang).
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while !taken() && std::time::Instant::now() < deadline {
                    std::hint::spin_loop();
                }
            }
            for i in r {
                if let Ok(mut by) = ran_by[i].lock() {
                    by.push(me);
                }
            }
        });
        plan.run();
        assert!(
            ran_by
                .iter()
                .all(|by| by.lock().is_ok_and(|by| by.len() == 1)),
            "every index once"
        );
        if team.load(Ordering::Relaxed) != size {
            eprintln!("not checked: the region had fewer threads than {size}");
            return;
        }
        assert!(
            taken(),
            "another thread took pieces of the first thread's part"
        );
    }
}
