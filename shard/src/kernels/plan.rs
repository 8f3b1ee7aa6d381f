//! A decode step's kernels planned first and run afterwards, all of them in one parallel region.
//!
//! Run one at a time, each kernel is a libtorch allocation, a few metadata calls and an OpenMP
//! region, on the main thread while the other threads wait; between two weight streams (which
//! evict libtorch's code and data from the caches) that came to about 2 ms of a 10.3 ms bf16
//! batch-1 step of SmolLM2 on the AMX Xeon VM, where the products alone streamed the same
//! weights in 7.9 ms. Planned, the kernels make their checks and outputs back to back (warm),
//! and their work becomes a list of jobs; `Plan::run` then enters one region, in which every
//! thread takes its part of each job in turn, with a barrier between jobs (each job reads what
//! the one before wrote). A job's parts are the ones it would get run alone (`threads::part`),
//! so a planned step computes exactly what the kernels compute one by one.
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
use std::sync::atomic::{AtomicUsize, Ordering};

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
    run: Box<dyn Fn(Range<usize>) + Send + Sync + 'a>,
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
        self.jobs.push(Job {
            n,
            align,
            split,
            run: Box::new(run),
        });
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
            gomp,
        };
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
    gomp: &'static Gomp,
}

extern "C" fn member(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is the `Team` that `Plan::run` keeps alive until the region ends.
    let team = unsafe { &*(data as *const Team) };
    // SAFETY: called inside the parallel region.
    let (me, size) = unsafe { team.gomp.me() };
    for job in team.jobs {
        // The parts `threads::split` would give: whole on the first thread when it would not
        // split the job.
        let part = if job.split && size > 1 && job.n >= 2 * job.align.max(1) {
            threads::part(job.n, size, job.align, me)
        } else if me == 0 {
            0..job.n
        } else {
            0..0
        };
        if !part.is_empty() {
            (job.run)(part);
        }
        team.barrier.wait(size);
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
    fn wait(&self, size: usize) {
        if size <= 1 {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == size {
            self.arrived.store(0, Ordering::Relaxed);
            // Publishes every thread's writes (their `fetch_add`s) to the waiting ones.
            self.generation.store(generation + 1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
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
}
