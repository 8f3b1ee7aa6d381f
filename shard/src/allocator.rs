//! How the process's memory is laid out for the CPU forward pass: the C allocator's treatment
//! of the large, short-lived buffers libtorch asks it for, and 2 MiB pages under the weights.
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

/// The page size `MADV_HUGEPAGE` asks for on x86-64 (and on arm64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Moves `tensors` (CPU) into one block of memory the kernel is asked to back with 2 MiB pages,
/// each contiguous and 64-byte aligned, with the same values. Tensors that are the same data
/// (a tied embedding and LM head: one pointer, shape and dtype) get one place, so they stay
/// shared. Then returns the memory the old copies leave free in the heap to the kernel, which
/// `keep_freed_memory` would otherwise keep.
///
/// A decode step reads every weight once: with 4 KiB pages that is a TLB miss every 4 KiB of
/// the stream, and under a hypervisor each miss is a two-level page walk. The checkpoint's own pages (a file mapping) and libtorch's buffers
/// get 2 MiB pages only when asked, where the kernel's THP mode is `madvise`, as on the
/// development VM. A bf16 batch-1 step of SmolLM2 went from 8.9-10.3 to 7.1-9.3 ms over eight
/// interleaved pairs (docs/benchmarks.md). `TESSERA_NO_HUGE_PAGES=1` leaves the weights where
/// they are, for comparison.
pub(crate) fn pack_in_huge_pages(tensors: Vec<&mut tch::Tensor>) {
    use tch::Tensor;
    if std::env::var_os("TESSERA_NO_HUGE_PAGES").is_some() {
        return;
    }
    const ALIGN: usize = 64;
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    // Two views of one storage that start at one address but differ in shape are two tensors.
    let key = |t: &Tensor| (t.data_ptr() as usize, t.size(), t.kind());
    let mut places = Vec::new();
    let mut total = 0;
    for t in &tensors {
        if !places.iter().any(|(k, _)| *k == key(t)) {
            places.push((key(t), total));
            total += bytes(t).next_multiple_of(ALIGN);
        }
    }
    if total == 0 {
        return;
    }
    let block = empty_in_huge_pages(total);
    for t in tensors {
        let k = key(t);
        let offset = places.iter().find(|(q, _)| *q == k).map_or(0, |&(_, o)| o);
        let mut new = block
            .narrow(0, offset as i64, bytes(t) as i64)
            .view_dtype(t.kind())
            .view(t.size().as_slice());
        // The second of a tied pair copies the same values to the same place again: one extra
        // copy at load, instead of a list of what has moved.
        new.copy_(t);
        *t = new;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free heap pages back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    report_huge_pages(block.data_ptr() as usize, total);
}

/// Logs how much of the weights the kernel put on 2 MiB pages, and warns when it is under
/// half: a decode step then reads them through 4 KiB pages, which cost a bf16 batch-1 step
/// 10-20% on the development VMs (docs/benchmarks.md), and nothing else would show it (a
/// host with THP off, or memory too fragmented to compact).
fn report_huge_pages(start: usize, bytes: usize) {
    let Some(huge) = huge_page_bytes(start) else {
        return;
    };
    let mib = |b: usize| b >> 20;
    // Only whole 2 MiB pages can be huge: tiny models have none to judge.
    if huge * 2 >= bytes / HUGE_PAGE * HUGE_PAGE {
        tracing::info!(
            weights_mib = mib(bytes),
            huge_mib = mib(huge),
            "weights packed on 2 MiB pages"
        );
    } else {
        tracing::warn!(
            weights_mib = mib(bytes),
            huge_mib = mib(huge),
            transparent_hugepage = transparent_hugepage_mode(),
            "the kernel put less than half of the weights on 2 MiB pages: decode will be slower"
        );
    }
}

/// The host's transparent huge page mode, as the kernel prints it (`always [madvise] never`),
/// or empty where it cannot be read.
fn transparent_hugepage_mode() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|m| m.trim().to_string())
        .unwrap_or_default()
}

/// Bytes on 2 MiB pages (`AnonHugePages`) in the mapping that holds `addr`, from
/// `/proc/self/smaps`; `None` where that cannot be read (not Linux, no procfs).
fn huge_page_bytes(addr: usize) -> Option<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        // A mapping's header starts with its range; its fields start with "Name:".
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((from, to)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let parse = |h: &str| usize::from_str_radix(h, 16).ok();
            inside =
                matches!((parse(from), parse(to)), (Some(a), Some(b)) if (a..b).contains(&addr));
        } else if let Some(kib) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
            let kib: usize = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
            return Some(kib << 10);
        }
    }
    None
}

/// `bytes` of uninitialised CPU memory as a `Uint8` tensor that starts on a 2 MiB boundary,
/// whose pages the kernel is asked to back with 2 MiB pages when they are first touched (the
/// weights here; the benchmarks' bandwidth probes, so that they stream as the weights do).
///
/// The block is not always fresh from `mmap`: with `keep_freed_memory`, a free chunk of the
/// heap large enough for it is reused, and its pages were already faulted in as 4 KiB pages,
/// which the hint does not change. So the range's pages are also dropped (`MADV_DONTNEED`: the
/// contents are undefined anyway), and the first write faults them in afresh. Without that,
/// bf16 weights loaded after an f32 model had run a batch-32 prefill in the same process got
/// 20 MB of their 269 MB on 2 MiB pages, and batch-1 decode ran at 0.60-0.72 of the bandwidth
/// roofline; with the pages dropped first, 256 MiB and 0.74 (docs/benchmarks.md, ninth
/// session).
pub fn empty_in_huge_pages(bytes: usize) -> tch::Tensor {
    use tch::{Device, Kind, Tensor};
    let block = Tensor::empty([(bytes + HUGE_PAGE) as i64], (Kind::Uint8, Device::Cpu));
    let base = block.data_ptr() as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    #[cfg(target_os = "linux")]
    // SAFETY: the range lies inside `block`, which this function owns and nothing has read or
    // written since `empty`; madvise records a hint on it, and dropping its pages only makes
    // them read as zeros until written, so no one's data is lost.
    unsafe {
        let range = start as *mut libc::c_void;
        libc::madvise(range, bytes, libc::MADV_HUGEPAGE);
        libc::madvise(range, bytes, libc::MADV_DONTNEED);
    }
    block.narrow(0, (start - base) as i64, bytes as i64)
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    #[test]
    fn packed_tensors_keep_their_values_and_sharing() {
        let a = Tensor::arange(3 * 64, (Kind::Float, Device::Cpu)).view([3, 64]);
        let b = (Tensor::arange(7, (Kind::Float, Device::Cpu)) * 0.5).to_kind(Kind::BFloat16);
        let (want_a, want_b) = (a.copy(), b.copy());
        let (mut a, mut b) = (a, b);
        let mut tied = a.shallow_clone();
        // Starts where `a` does, with a smaller shape, and comes first: were places keyed by
        // the address alone, `a` would get `head`'s room and overwrite `b`.
        let mut head = a.narrow(0, 0, 1);
        super::pack_in_huge_pages(vec![&mut head, &mut b, &mut a, &mut tied]);
        assert!(
            head.equal(&want_a.narrow(0, 0, 1)),
            "a view keeps its own shape"
        );
        assert!(
            a.equal(&want_a) && b.equal(&want_b),
            "values moved unchanged"
        );
        assert_eq!(a.size(), [3, 64]);
        assert_eq!(b.kind(), Kind::BFloat16);
        assert!(a.is_contiguous() && b.is_contiguous());
        assert_eq!(
            a.data_ptr(),
            tied.data_ptr(),
            "a tied pair stays one tensor"
        );
        assert_eq!(
            head.data_ptr() as usize % super::HUGE_PAGE,
            0,
            "the block starts on a page"
        );
        assert_eq!(b.data_ptr() as usize % 64, 0);
    }

    #[test]
    fn a_block_the_heap_reuses_still_gets_huge_pages() {
        let thp = super::transparent_hugepage_mode();
        if !(thp.contains("[always]") || thp.contains("[madvise]")) {
            eprintln!("skipped: this kernel gives no transparent huge pages ({thp:?})");
            return;
        }
        super::keep_freed_memory();
        // Below glibc's mmap threshold once raised, so both come from this thread's heap: the
        // block reuses the freed buffer's pages, which were faulted in as 4 KiB pages.
        let bytes = 16 << 20;
        drop(Tensor::ones([24 << 20], (Kind::Uint8, Device::Cpu)));
        let mut block = super::empty_in_huge_pages(bytes);
        let _ = block.fill_(1);
        let huge = super::huge_page_bytes(block.data_ptr() as usize).expect("the block's mapping");
        assert!(
            huge >= bytes / 2,
            "{huge} bytes of a {bytes}-byte block on 2 MiB pages"
        );
    }
}
