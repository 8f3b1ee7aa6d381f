//! Benchmarks live in `benches/` and `examples/`; see docs/benchmarks.md. This library holds
//! what several of them share.

/// The device a shard benchmark runs on: `TESSERA_BENCH_DEVICE` (any name `--device` takes),
/// CPU when unset. A name that cannot be served stops the run with the shard's own message.
pub fn device() -> tch::Device {
    let name = std::env::var("TESSERA_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    match tessera_shard::device::parse_device(Some(&name)) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("TESSERA_BENCH_DEVICE={name}: {e}");
            std::process::exit(2);
        }
    }
}

/// The middle value of `xs` (the upper of the two middle ones for an even count), or NaN
/// for none.
pub fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A buffer for the read probes: on a CPU 1 GiB of f32 ones (far beyond any cache) on 2 MiB
/// pages, as the shard's weights are (on 4 KiB pages the same passes read 12-19% less:
/// medians on two and one threads, docs/benchmarks.md); on a GPU 1 GiB of device memory.
pub fn probe_buffer(device: tch::Device) -> tch::Tensor {
    if device.is_cuda() {
        return tch::Tensor::ones([1 << 28], (tch::Kind::Float, device));
    }
    let mut t = tessera_shard::allocator::empty_in_huge_pages(1 << 30).view_dtype(tch::Kind::Float);
    let _ = t.fill_(1.0);
    t
}

/// Peak read bandwidth in bytes/s: the best of several `read_pass`es over `probe`, with one
/// and with all of libtorch's threads.
pub fn peak_read_bandwidth(probe: &tch::Tensor) -> f64 {
    let threads = tch::get_num_threads();
    let mut best = 0f64;
    for n in [1, threads] {
        tch::set_num_threads(n);
        let _ = read_pass(probe);
        for _ in 0..3 {
            best = best.max(read_pass(probe));
        }
    }
    tch::set_num_threads(threads);
    best
}

/// The read bandwidth of one pass over `probe`, in bytes/s. On a CPU with AVX-512 it reads the
/// buffer twice on all of libtorch's threads (the team the shard's kernels run on), once with
/// each of `read`'s two loops, and keeps the faster; elsewhere it times libtorch's sum.
///
/// Which loop reads faster depends on the machine. On the AMX Xeon VM (eleventh session,
/// docs/benchmarks.md), over 1 GiB on two threads, libtorch's sum (the probe before) read
/// 26.6-30.6 GB/s, four independent vectors of adds 30.2-31.8, and one chain of adds with
/// eight `nop`s a cache line 34.2-35.4: the fewer loads a core has waiting, the faster it
/// read (our reading: the hardware's own prefetching keeps up better). A roofline must be
/// the best the machine streams.
pub fn read_pass(probe: &tch::Tensor) -> f64 {
    let bytes = probe.numel() * probe.kind().elt_size_in_bytes();
    if probe.device() != tch::Device::Cpu || !probe.is_contiguous() || !read::wide() {
        let start = std::time::Instant::now();
        let _ = f64::try_from(probe.sum(tch::Kind::Float)).unwrap_or(0.0);
        return bytes as f64 / start.elapsed().as_secs_f64();
    }
    let lines = bytes / 64;
    let base = probe.data_ptr() as usize;
    [false, true]
        .into_iter()
        .map(|paced| {
            let run = |part: std::ops::Range<usize>| {
                // SAFETY: `probe` is a contiguous CPU tensor of `bytes` bytes, alive until
                // `split` returns, parts lie within its whole 64-byte lines, and `wide` found
                // AVX-512.
                let sum =
                    unsafe { read::fold((base + part.start * 64) as *const u8, part.len(), paced) };
                std::hint::black_box(sum);
            };
            let start = std::time::Instant::now();
            // Parts of whole 4 KiB pages.
            tessera_shard::kernels::threads::split(lines, 64, true, &run);
            bytes as f64 / start.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

mod read {
    /// Whether `fold` can run here.
    pub fn wide() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Reads `lines` cache lines from `p`: four independent vectors of adds (as a plain loop
    /// the compiler kept this scalar, and it read 25.1-25.9 GB/s where libtorch's sum read
    /// 29.6-29.8), or, when
    /// `paced`, one chain of adds with eight `nop`s after each line's, so that fewer loads
    /// wait at once (written in assembly: the compiler would drop or move the `nop`s).
    ///
    /// # Safety
    /// `p` must be valid for `lines × 64` bytes, and the CPU must have AVX-512F (`wide`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fold(p: *const u8, lines: usize, paced: bool) -> u64 {
        use std::arch::x86_64::*;
        if paced {
            let mut acc = _mm512_setzero_si512();
            for line in 0..lines {
                std::arch::asm!(
                    "vpaddq {acc}, {acc}, [{at}]",
                    "nop", "nop", "nop", "nop", "nop", "nop", "nop", "nop",
                    acc = inout(zmm_reg) acc,
                    at = in(reg) p.add(line * 64),
                    options(nostack, readonly, preserves_flags),
                );
            }
            return _mm512_reduce_add_epi64(acc) as u64;
        }
        let mut acc = [_mm512_setzero_si512(); 4];
        let whole = lines / 4 * 4;
        for line in (0..whole).step_by(4) {
            for (v, a) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(p.add((line + v) * 64) as *const _);
                *a = _mm512_add_epi64(*a, x);
            }
        }
        for line in whole..lines {
            acc[0] = _mm512_add_epi64(acc[0], _mm512_loadu_si512(p.add(line * 64) as *const _));
        }
        let sum = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        _mm512_reduce_add_epi64(sum) as u64
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn fold(_: *const u8, _: usize, _: bool) -> u64 {
        0
    }
}
