//! Splitting a kernel's work across libtorch's own intra-op threads.
//!
//! Where one core cannot read memory as fast as the machine can (the Zen 3 VM: 10 GB/s for one
//! thread, 16 GB/s for two), a decode step's weight stream must be split across cores. A second
//! thread pool would fight libtorch's: its OpenMP workers spin for a while after every op, on
//! the very cores another pool's threads would wake on, and each hand-off would pay a futex
//! wake-up. So the parts run on libtorch's OpenMP team itself, through libgomp's entry point
//! for `#pragma omp parallel` (`GOMP_parallel`), found with `dlsym` in the libgomp that
//! libtorch_cpu loads. The team is as large as libtorch's intra-op thread count (the
//! launcher's per-shard thread budget). Without libgomp (another OpenMP runtime, another platform) the
//! work runs on the calling thread.

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::ops::Range;
use std::sync::OnceLock;

type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type Query = unsafe extern "C" fn() -> c_int;

pub(super) struct Gomp {
    pub(super) parallel: Parallel,
    thread_num: Query,
    num_threads: Query,
}

impl Gomp {
    /// This thread's index in the current region's team and the team's size.
    ///
    /// # Safety
    /// Must be called inside a parallel region, as OpenMP requires.
    pub(super) unsafe fn me(&self) -> (usize, usize) {
        (
            (self.thread_num)() as usize,
            ((self.num_threads)() as usize).max(1),
        )
    }
}

pub(super) fn gomp() -> Option<&'static Gomp> {
    static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();
    GOMP.get_or_init(|| {
        let find = |name: &CStr| {
            // SAFETY: dlsym on the global namespace only looks a symbol up.
            let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!symbol.is_null()).then_some(symbol)
        };
        let parallel = find(c"GOMP_parallel")?;
        let thread_num = find(c"omp_get_thread_num")?;
        let num_threads = find(c"omp_get_num_threads")?;
        // SAFETY: these are libgomp's exported functions, whose C signatures the types spell.
        unsafe {
            Some(Gomp {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
                thread_num: std::mem::transmute::<*mut c_void, Query>(thread_num),
                num_threads: std::mem::transmute::<*mut c_void, Query>(num_threads),
            })
        }
    })
    .as_ref()
}

/// What each team member needs: the work, its size, and how to find its own index.
struct Team<'a> {
    run: &'a (dyn Fn(Range<usize>) + Sync),
    n: usize,
    align: usize,
    gomp: &'static Gomp,
}

extern "C" fn member(data: *mut c_void) {
    // SAFETY: `data` is the `Team` that `split` keeps alive until GOMP_parallel returns.
    let team = unsafe { &*(data as *const Team) };
    // SAFETY: called inside the parallel region, as OpenMP requires.
    let (me, size) = unsafe { team.gomp.me() };
    let part = part(team.n, size, team.align, me);
    if !part.is_empty() {
        (team.run)(part);
    }
}

/// Member `me`'s share of `0..n` in `parts` contiguous pieces whose bounds are multiples of
/// `align` (so that no two threads write one cache line of output).
pub(super) fn part(n: usize, parts: usize, align: usize, me: usize) -> Range<usize> {
    let per = n.div_ceil(parts).next_multiple_of(align.max(1));
    (me * per).min(n)..((me + 1) * per).min(n)
}

/// libtorch's intra-op thread count, which also sets this thread's OpenMP count on its first
/// use here (OpenMP keeps one per thread, and a new thread would otherwise get the default).
pub(super) fn team_size() -> usize {
    usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
}

/// Runs `run` over `0..n` in one contiguous part per intra-op thread, or whole on this thread
/// when `split` is false, there is one thread, or no libgomp.
pub fn split(n: usize, align: usize, split: bool, run: &(dyn Fn(Range<usize>) + Sync)) {
    let Some(gomp) = gomp().filter(|_| split) else {
        return run(0..n);
    };
    let threads = team_size();
    if threads == 1 || n < 2 * align.max(1) {
        return run(0..n);
    }
    let team = Team {
        run,
        n,
        align,
        gomp,
    };
    // SAFETY: `member` only reads `team`, which outlives the region. (A region nested in
    // another, should a caller already be on the team, gets one thread: still correct.)
    unsafe {
        (gomp.parallel)(
            member,
            &team as *const Team as *mut c_void,
            threads as c_uint,
            0,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn parts_cover_everything_once() {
        for (n, parts, align) in [(10, 3, 1), (100, 2, 16), (5, 4, 16), (49152, 2, 16)] {
            let mut seen = vec![0u8; n];
            for me in 0..parts {
                for i in part(n, parts, align, me) {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{n} in {parts}");
        }
    }

    #[test]
    fn split_runs_every_index_once_on_the_team() {
        let _ = tch::get_num_threads(); // libtorch (and its libgomp) loaded
        let hits: Vec<AtomicUsize> = (0..10_000).map(|_| AtomicUsize::new(0)).collect();
        split(hits.len(), 16, true, &|r: Range<usize>| {
            for i in r {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}
