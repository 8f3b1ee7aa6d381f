//! Matrix-vector products for decode steps (1 to 8 rows against a weight matrix).
//!
//! A decode step at small batch is a stream over every weight: it can only be as fast as
//! memory. libtorch's CPU kernels reach about half of the machine's read bandwidth on these
//! shapes (11-17 GB/s against 32 GB/s on the development VM, docs/benchmarks.md), while one
//! core streaming rows with AVX-512 reaches close to all of it. So rows of `x` are multiplied
//! here, with AVX-512 (and AVX-512 BF16 for bf16 weights) where the CPU has it and AVX2 + FMA
//! otherwise, the output columns split across libtorch's threads for the CPUs where one core
//! cannot read as fast as the memory; without either, everything goes to libtorch. Each weight
//! row is read once for all rows of `x`, with enough accumulators per row to hide FMA latency;
//! the counts are const generics so the accumulators stay in registers. Past 8 rows the work
//! is compute-bound and a register-blocked GEMM is the better tool (`gemm`).

use std::ops::Range;

use tch::{Kind, Tensor};

#[cfg(test)]
use super::Now;
use super::{isa, Isa, Sink};

/// The most rows of `x` the kernels take (their accumulators live in registers).
pub const MAX_ROWS: usize = 8;

/// The least weight bytes of a piece of a planned product that a thread takes at a time
/// (`Sink::share`): a thread's part of SmolLM2's smallest product (330 KB in bf16 on two
/// threads) is ten of them, and taking one (an atomic update, a call) costs little against
/// streaming it.
const PIECE: usize = 32 << 10;

/// `x @ w.T` for `x` `[m, k]` and `w` `[n, k]` (both CPU, same dtype, `m <= MAX_ROWS`), or
/// `None` when no kernel applies and the caller should use libtorch.
#[cfg(test)]
pub fn matvec(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    matvec_in(x, w, &mut Now)
}

/// `matvec`, its work into `sink`.
pub(super) fn matvec_in<'a>(x: &Tensor, w: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    matvec_on(isa(w.kind())?, x, w, sink)
}

/// `matvec` with a chosen instruction set, which the caller has checked the CPU has.
fn matvec_on<'a>(isa: Isa, x: &Tensor, w: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    let kind = w.kind();
    let (m, n, k) = super::product_shape(x, w)?;
    if !(1..=MAX_ROWS).contains(&m) {
        return None;
    }
    let y = Tensor::empty([m as i64, n as i64], (kind, tch::Device::Cpu));
    #[cfg(target_arch = "x86_64")]
    {
        let bf16 = kind == Kind::BFloat16;
        let prepared = match isa {
            // The AVX2 kernels read `x` as f32: at most 8 rows, widened once here rather than
            // for every weight row.
            Isa::Avx2 => x.to_kind(Kind::Float).contiguous(),
            Isa::Avx512 => x.contiguous(),
        };
        if !sink.unchanged(x, &prepared) {
            return None;
        }
        let x = prepared;
        for t in [w, &x, &y] {
            sink.keep(t);
        }
        // Addresses, so that the parts can run on other threads.
        let (wp, xp, yp) = (
            w.data_ptr() as usize,
            x.data_ptr() as usize,
            y.data_ptr() as usize,
        );
        let run = move |part: Range<usize>| {
            let (w, x, y) = (wp as *const u8, xp as *const u8, yp as *mut u8);
            // SAFETY: `w`, `x` and `y` are contiguous CPU tensors of the shapes checked above,
            // alive until the work has run (the sink keeps them), of the element types each kernel
            // reads; parts are disjoint ranges of output columns; the caller checked the CPU
            // features.
            unsafe {
                match isa {
                    Isa::Avx2 => avx2::matvec(bf16, w, x as *const f32, y, (m, n, k), part),
                    Isa::Avx512 => avx512::matvec(bf16, w, x, y, (m, n, k), part),
                }
            }
        };
        // Small matrices stay on this thread: the 64K-weight cut is a guess at where a
        // hand-off (a few microseconds) stops paying, not a measured crossover. Every output
        // column is one row's dot products whatever range it runs in, so the parts may be
        // shared out in pieces of at least `PIECE` bytes of weights.
        let row = k * kind.elt_size_in_bytes();
        sink.share(n, 16, PIECE.div_ceil(row.max(1)), n * k >= 1 << 16, run);
        // A thread waiting before the product asks for its first weight rows into L2.
        sink.warm(move |rows: Range<usize>| {
            // SAFETY: a prefetch hint cannot fault.
            unsafe {
                super::prefetch(
                    (wp as *const u8).wrapping_add(rows.start * row),
                    rows.len() * row,
                )
            }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, m, n, k);
        return None;
    }
    Some(y)
}

/// The products with AVX-512 (16 lanes, 32 vector registers) and AVX-512 BF16's dot products.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::put;

    /// How far ahead of the loads the weights are prefetched, in bytes. The hardware's
    /// streamer stops at every 4 KiB page and restarts slowly, and one core keeps too few
    /// misses in flight to fill the memory's latency; asking for the lines a few pages ahead
    /// does. Batch-1 decode step of SmolLM2 on the AMX Xeon VM (`step_profile bfloat16 1 100`,
    /// interleaved runs): 31.5-34.7 ms without, 23.7-28.0 ms at 6 KiB, and in a faster hour
    /// of the VM 23.5-26.4 against 20.5-22.3 ms over four pairs; f32 35.5-54.2 against
    /// 35.0-42.9 ms. Distances of 2 to 12 KiB were within the noise of each other then; on
    /// the same VM class a later session found 3 KiB best (our reading: far enough to keep
    /// the lines in time, and fewer in flight leave the hardware's own prefetching more room,
    /// as a read loop with fewer loads waiting read faster there): bf16 batch-1 forward
    /// passes 10.44-10.63 ms against 11.16-11.41 at 6 KiB (four interleaved rounds),
    /// 10.57-10.83 at 3.5 KiB, 11.14-11.26 at 2 KiB, 15.5 with no prefetch; f32 batch 1
    /// 19.95 / 20.88 against 20.59 / 21.56 ms; batch 8 level in both dtypes. The lines go to
    /// L2 (`prefetcht1`): on the Xeon that was no better than L1, on the Zen 4 VM it was
    /// faster in seven interleaved pairs of batch-1 steps of each dtype (f32 22.0-25.9 →
    /// 20.5-22.4 ms, bf16 12.1-14.1 → 11.5-12.2 ms) and in four of batch 8.
    ///
    /// One row of `x` on AMD CPUs used to ask for its lines as non-temporal (`prefetchnta`),
    /// 3-8% faster in bf16 batch-1 steps on the Zen 4 VM when each kernel ran in a region of
    /// its own; on an Intel Xeon with AMX that hint made them 2.4 times slower. Later on the
    /// Zen 4 VM, L2 was ahead, with the hint switched every step (`step_profile`, the mean of
    /// each hint's steps in turns of 60, ms). Planned steps (`Plan`, four runs): bf16 batch 1
    /// 6.04-8.15 against 6.45-8.56 in a fast phase of the VM, 8.61-10.60 against 8.80-11.13
    /// in a slow one (phases told apart by the step times; no read pass was taken); f32 batch
    /// 1 11.61-12.85 against 12.07-13.28. Non-temporal 1.5, 6 or 12 KiB ahead, L2 6 KiB ahead
    /// and no prefetch were behind L2 at 3 KiB or level with it. SmolLM2 run op by op
    /// (`TESSERA_NO_PLAN=1`, as the families the plan does not cover run): bf16 batch 1
    /// 6.41-10.36 against 6.90-10.64, ahead in all eight turns; f32 16.76-18.02 against
    /// 17.36-18.18, ahead in four of five, level in one.
    const AHEAD: usize = 3 << 10;

    /// Asks for the two cache lines `AHEAD` bytes past `p`, the 128 bytes one iteration of
    /// either loop reads, into L2. Past the last row this names lines beyond the matrix:
    /// prefetches never fault.
    #[inline(always)]
    unsafe fn ahead(p: *const u8) {
        let p = p.wrapping_add(AHEAD) as *const i8;
        _mm_prefetch::<_MM_HINT_T1>(p);
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64));
    }

    /// `y[m, n] = x[m, k] @ w[n, k].T` for the output columns `part`; all three f32, or all
    /// bf16 (`bf16`).
    ///
    /// # Safety
    /// The pointers must cover those shapes, `m` must be 1 to 8, `part` must lie in `0..n`,
    /// and the CPU must have AVX-512 F and BW (and BF16 for `bf16`).
    pub unsafe fn matvec(
        bf16: bool,
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        macro_rules! run {
            ($($rows:literal)*) => {
                match (bf16, m) {
                    $((false, $rows) => matvec_f32::<$rows>(w as *const f32, x as *const f32, y, n, k, part),)*
                    $((true, $rows) => matvec_bf16::<$rows>(w as *const u16, x as *const u16, y, n, k, part),)*
                    _ => unreachable!("1 to 8 rows"),
                }
            };
        }
        run!(1 2 3 4 5 6 7 8);
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn matvec_f32<const M: usize>(
        w: *const f32,
        x: *const f32,
        y: *mut u8,
        n: usize,
        k: usize,
        part: Range<usize>,
    ) {
        let full = k / 32 * 32;
        let rest = k - full;
        for row in part {
            let wr = w.add(row * k);
            let mut acc0 = [_mm512_setzero_ps(); M];
            let mut acc1 = [_mm512_setzero_ps(); M];
            let mut i = 0;
            while i < full {
                ahead(wr.add(i) as *const u8);
                let w0 = _mm512_loadu_ps(wr.add(i));
                let w1 = _mm512_loadu_ps(wr.add(i + 16));
                for j in 0..M {
                    let xr = x.add(j * k + i);
                    acc0[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[j]);
                    acc1[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(16)), acc1[j]);
                }
                i += 32;
            }
            let mut tail = rest;
            while tail > 0 {
                let take = tail.min(16);
                let mask: __mmask16 = if take == 16 {
                    0xffff
                } else {
                    (1u16 << take) - 1
                };
                let wv = _mm512_maskz_loadu_ps(mask, wr.add(i));
                for j in 0..M {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(j * k + i));
                    acc0[j] = _mm512_fmadd_ps(wv, xv, acc0[j]);
                }
                i += take;
                tail -= take;
            }
            for j in 0..M {
                put::<false>(
                    y,
                    j * n + row,
                    _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j])),
                );
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn matvec_bf16<const M: usize>(
        w: *const u16,
        x: *const u16,
        y: *mut u8,
        n: usize,
        k: usize,
        part: Range<usize>,
    ) {
        // `vdpbf16ps` multiplies 32 bf16 pairs and adds each adjacent pair's products into 16
        // f32 lanes, so 64 weights per iteration with two accumulators.
        let load =
            |p: *const u16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p as *const _)) };
        let full = k / 64 * 64;
        for row in part {
            let wr = w.add(row * k);
            let mut acc0 = [_mm512_setzero_ps(); M];
            let mut acc1 = [_mm512_setzero_ps(); M];
            let mut i = 0;
            while i < full {
                ahead(wr.add(i) as *const u8);
                let w0 = load(wr.add(i));
                let w1 = load(wr.add(i + 32));
                for j in 0..M {
                    let xr = x.add(j * k + i);
                    acc0[j] = _mm512_dpbf16_ps(acc0[j], w0, load(xr));
                    acc1[j] = _mm512_dpbf16_ps(acc1[j], w1, load(xr.add(32)));
                }
                i += 64;
            }
            while i < k {
                let take = (k - i).min(32);
                let mask: __mmask32 = if take == 32 {
                    u32::MAX
                } else {
                    (1u32 << take) - 1
                };
                let wv: __m512bh =
                    std::mem::transmute(_mm512_maskz_loadu_epi16(mask, wr.add(i) as *const i16));
                for j in 0..M {
                    let xv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                        mask,
                        x.add(j * k + i) as *const i16,
                    ));
                    acc0[j] = _mm512_dpbf16_ps(acc0[j], wv, xv);
                }
                i += take;
            }
            for j in 0..M {
                put::<true>(
                    y,
                    j * n + row,
                    _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j])),
                );
            }
        }
    }
}

/// The same products with AVX2 and FMA (8 lanes, 16 vector registers).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::put;

    /// `y[m, n] = x[m, k] @ w[n, k].T` for the output columns `part`; `x` f32, `w` and `y`
    /// f32 or bf16 (`bf16`).
    ///
    /// # Safety
    /// The pointers must cover those shapes, `m` must be 1 to 8, `part` must lie in `0..n`,
    /// and the CPU must have AVX2 and FMA.
    pub unsafe fn matvec(
        bf16: bool,
        w: *const u8,
        x: *const f32,
        y: *mut u8,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        // Accumulators per row: with FMA's 4-cycle latency and two FMA ports, 8 independent
        // chains keep both busy; 16 registers hold them next to the weight vectors.
        macro_rules! run {
            ($(($rows:literal, $acc:literal))*) => {
                match (bf16, m) {
                    $((false, $rows) => rows::<$rows, $acc, false>(w, x, y, n, k, part),)*
                    $((true, $rows) => rows::<$rows, $acc, true>(w, x, y, n, k, part),)*
                    _ => unreachable!("1 to 8 rows"),
                }
            };
        }
        run!((1, 4)(2, 4)(3, 2)(4, 2)(5, 1)(6, 1)(7, 1)(8, 1));
    }

    /// 8 weights as f32 lanes: f32 as is, or bf16 (the top half of an f32) widened by a shift.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::kernels) unsafe fn load8<const BF16: bool>(w: *const u8, i: usize) -> __m256 {
        if BF16 {
            let half = _mm_loadu_si128((w as *const u16).add(i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16))
        } else {
            _mm256_loadu_ps((w as *const f32).add(i))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::kernels) unsafe fn weight<const BF16: bool>(w: *const u8, i: usize) -> f32 {
        if BF16 {
            f32::from_bits((*(w as *const u16).add(i) as u32) << 16)
        } else {
            *(w as *const f32).add(i)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::kernels) unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    // Indexes keep the register arrays' roles (weight vector `a`, input row `j`) readable.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const M: usize, const A: usize, const BF16: bool>(
        w: *const u8,
        x: *const f32,
        y: *mut u8,
        n: usize,
        k: usize,
        part: Range<usize>,
    ) {
        let step = 8 * A;
        let full = k / step * step;
        for row in part {
            let base = row * k;
            let mut acc = [[_mm256_setzero_ps(); A]; M];
            let mut i = 0;
            while i < full {
                for a in 0..A {
                    let wv = load8::<BF16>(w, base + i + 8 * a);
                    for j in 0..M {
                        let xv = _mm256_loadu_ps(x.add(j * k + i + 8 * a));
                        acc[j][a] = _mm256_fmadd_ps(wv, xv, acc[j][a]);
                    }
                }
                i += step;
            }
            while i + 8 <= k {
                let wv = load8::<BF16>(w, base + i);
                for j in 0..M {
                    acc[j][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(j * k + i)), acc[j][0]);
                }
                i += 8;
            }
            for j in 0..M {
                let mut v = acc[j][0];
                for part in &acc[j][1..] {
                    v = _mm256_add_ps(v, *part);
                }
                let mut total = sum8(v);
                for r in i..k {
                    total += weight::<BF16>(w, base + r) * *x.add(j * k + r);
                }
                put::<BF16>(y, j * n + row, total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_product, wave};
    use super::*;

    /// A row's product has the same bits in any batch of up to 8 rows: a seeded request must
    /// sample the same text alone and in a batch of 8 (issue #3), in either dtype, so the
    /// decode products of 1 to 8 rows must not depend on the rows beside it.
    #[test]
    fn a_row_gets_the_same_bits_in_any_batch_up_to_8() {
        for kind in [Kind::Float, Kind::BFloat16] {
            if isa(kind).is_none() {
                continue;
            }
            let (n, k) = (96i64, 576i64);
            let x = wave(8 * k, 0.37).view([8, k]).to_kind(kind);
            let w = wave(n * k, 0.11).view([n, k]).to_kind(kind);
            let whole = super::super::decode_product(&x, &w).expect("kernel");
            for rows in 1..8 {
                let part = super::super::decode_product(&x.narrow(0, 0, rows), &w).expect("kernel");
                assert!(
                    part.equal(&whole.narrow(0, 0, rows)),
                    "{kind:?}: {rows} rows differ from the same rows in a batch of 8"
                );
            }
        }
    }

    #[test]
    fn matches_libtorch_for_every_row_count_and_odd_widths() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let Some(best) = isa(kind) else {
                eprintln!("skipping {kind:?}: no kernel for this CPU");
                continue;
            };
            // The best kernel, and the AVX2 one too where AVX-512 is the best (so that the
            // AVX2 path is tested on the AVX-512 machines as well).
            for isa in [best, Isa::Avx2] {
                for shape in [
                    (1, 7, 576),
                    (2, 33, 100),
                    (3, 5, 17),
                    (4, 64, 1536),
                    (1, 3, 1),
                    (8, 9, 200),
                    (6, 2, 64),
                ] {
                    check_product(kind, shape, &format!("{isa:?}"), |x, w| {
                        matvec_on(isa, x, w, &mut Now)
                    });
                }
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let x = wave(72, 0.3).view([9, 8]);
        let w = wave(24, 0.2).view([3, 8]);
        assert!(matvec(&x, &w).is_none(), "too many rows");
        let x = wave(8, 0.5).view([1, 8]).to_kind(Kind::Double);
        assert!(matvec(&x, &w.to_kind(Kind::Double)).is_none(), "f64");
    }
}
