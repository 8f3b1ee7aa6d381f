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

/// One read of every byte of `probe`, in bytes/s: on a CPU with AVX-512, a summation of its
/// 64-bit words four vectors at a time on all of libtorch's threads (the team the shard's
/// kernels run on); elsewhere libtorch's sum. On the AMX Xeon VM the loop read 30.3-31.8 GB/s
/// where libtorch's sum, the probe before, read 26.6-30.6 in the same processes; a C loop
/// built by gcc read 10-14% more than either (docs/benchmarks.md, eleventh session).
pub fn read_pass(probe: &tch::Tensor) -> f64 {
    let bytes = probe.numel() * probe.kind().elt_size_in_bytes();
    let start = std::time::Instant::now();
    if probe.device() == tch::Device::Cpu && probe.is_contiguous() && read::wide() {
        let words = bytes / 8;
        let base = probe.data_ptr() as usize;
        let run = |part: std::ops::Range<usize>| {
            // SAFETY: `probe` is a contiguous CPU tensor of `bytes` bytes, alive until `split`
            // returns, parts lie within its whole 8-byte words, and `wide` found AVX-512.
            let sum = unsafe {
                read::fold(std::slice::from_raw_parts(
                    (base as *const u64).add(part.start),
                    part.len(),
                ))
            };
            std::hint::black_box(sum);
        };
        // Parts of whole 4 KiB pages.
        tessera_shard::kernels::threads::split(words, 512, true, &run);
    } else {
        let _ = f64::try_from(probe.sum(tch::Kind::Float)).unwrap_or(0.0);
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

mod read {
    /// Whether `fold` can run here.
    pub fn wide() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The wrapping sum of `words`, four vectors of lanes at a time (as a plain loop the
    /// compiler kept it scalar, and it read a sixth less than libtorch's sum).
    ///
    /// # Safety
    /// The CPU must have AVX-512F (`wide`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fold(words: &[u64]) -> u64 {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_si512(); 4];
        let chunks = words.chunks_exact(32);
        let tail = chunks
            .remainder()
            .iter()
            .fold(0u64, |a, &w| a.wrapping_add(w));
        for c in chunks {
            for (v, a) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(c.as_ptr().add(8 * v) as *const _);
                *a = _mm512_add_epi64(*a, x);
            }
        }
        let sum = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        tail.wrapping_add(_mm512_reduce_add_epi64(sum) as u64)
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn fold(_: &[u64]) -> u64 {
        0
    }
}
