//! How the process's C allocator treats the large, short-lived buffers libtorch asks it for.
//!
//! libtorch takes every CPU tensor from `malloc`. glibc serves a block over its mmap threshold
//! (128 KiB at first) with a fresh `mmap` and returns it with `munmap` when freed, and it gives
//! the top of its heap back to the kernel once more than the trim threshold lies free there. A
//! forward pass allocates and frees megabytes per op (a 32 × 128-token bf16 prefill: 25 MB for
//! the gate/up product of every layer), so both rules hand memory back only to fault it in
//! again, zeroed, at the next op: 876 thousand page faults in a run of two such prefills, and
//! 12% of a prefill's samples in the kernel (docs/benchmarks.md). Raising both thresholds keeps
//! freed blocks in the heap for the next op. The heap then holds its high-water mark, as a GPU
//! caching allocator does: the mark of warmup's prefill at `max_prefill_tokens`, after which
//! warmup measures the memory left for the KV pool, so the pool no longer counts as free the
//! memory that the largest prefill will take back.
//!
//! Blocks over 32 MiB (glibc's ceiling for the mmap threshold) still come from `mmap`.

use std::sync::Once;

/// glibc's largest accepted mmap threshold on 64-bit targets (`HEAP_MAX_SIZE / 2`).
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Keeps freed blocks up to 32 MiB, and the heap's free top, for reuse. Once per process;
/// a no-op off glibc.
pub(crate) fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's tuning parameters; both values are in range.
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            if mmap != 1 || trim != 1 {
                tracing::warn!(
                    "glibc refused the allocator thresholds: large buffers stay unpooled"
                );
            }
        }
    });
}
