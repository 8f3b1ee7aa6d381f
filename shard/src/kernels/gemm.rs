//! Products of a few dozen rows with a weight matrix (decode steps of 9 to 128 sequences), for
//! CPUs whose best vector unit is AVX2.
//!
//! Past 8 rows a decode step is bound by FMAs, not by memory, and libtorch hands these shapes
//! to MKL's GEMM, which reaches 39 GFLOP/s at 32 rows on the 2-core Zen 3 VM against 95 on a
//! large square product (docs/benchmarks.md): it packs the whole weight matrix on every call,
//! and packing costs as much as the few rows' arithmetic saves. Here nothing is packed. Both
//! operands keep the layout they have (`x` `[m, k]`, `w` `[n, k]`, `k` contiguous in both), and
//! a tile of 3 rows of `x` by 4 rows of `w` runs along `k` with its 12 dot products in 12
//! vector accumulators, which with the 3 `x` vectors and one `w` vector fill AVX2's 16
//! registers: 7 loads feed 12 FMAs, so by count the FMA ports are the limit. The 4 weight rows stay in
//! L1 while every group of 3 rows of `x` passes by, so each weight is read from memory once.
//! The output columns are split across libtorch's threads, as for `matvec`.
//!
//! Only where AVX2 is the best vector unit for the weights' dtype: on AVX-512 CPUs libtorch's
//! kernels are twice as wide, and this machine cannot measure (or test) an AVX-512 build.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::{isa, Isa};

/// The rows of `x` this kernel takes: from where it beats the streaming kernels (at 8 rows
/// they are still 5% ahead) to where MKL catches up (1.4x behind this kernel at 128 rows; at
/// 192 MKL wins on some shapes), measured interleaved with the `gemm` example of
/// `tessera-benchmark`.
pub const ROWS: Range<usize> = 9..129;

/// `x @ w.T` for `x` `[m, k]` and `w` `[n, k]` (both CPU, same dtype, `m` in `ROWS`), or `None`
/// when the kernel does not apply and the caller should use libtorch.
pub fn gemm(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    let kind = w.kind();
    if isa(kind)? != Isa::Avx2 {
        return None;
    }
    gemm_avx2(x, w)
}

/// The kernel itself, for CPUs with AVX2 and FMA (checked by the callers).
fn gemm_avx2(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    let kind = w.kind();
    let (m, n, k) = super::product_shape(x, w)?;
    if !ROWS.contains(&m) {
        return None;
    }
    let y = Tensor::empty([m as i64, n as i64], (Kind::Float, tch::Device::Cpu));
    #[cfg(target_arch = "x86_64")]
    {
        let bf16 = kind == Kind::BFloat16;
        // `x` as f32, widened once here rather than in every tile.
        let x = x.to_kind(Kind::Float).contiguous();
        let (wp, xp, yp) = (
            w.data_ptr() as usize,
            x.data_ptr() as usize,
            y.data_ptr() as usize,
        );
        let run = move |part: Range<usize>| {
            // SAFETY: `w`, `x` and `y` are contiguous CPU tensors of the shapes checked above
            // (`x` f32, `w` f32 or bf16 as `bf16` says), alive until `split` returns; parts are
            // disjoint ranges of output columns; the callers checked for AVX2 and FMA.
            unsafe {
                avx2::gemm(
                    bf16,
                    wp as *const u8,
                    xp as *const f32,
                    yp as *mut f32,
                    (m, n, k),
                    part,
                )
            }
        };
        super::threads::split(n, 16, true, &run);
    }
    #[cfg(not(target_arch = "x86_64"))]
    return None;
    Some(super::in_dtype(y, kind))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::matvec::avx2::{load8, sum8, weight};

    /// Rows of `x` and of `w` in one tile.
    const MR: usize = 3;
    const NR: usize = 4;

    /// `y[m, n] = x[m, k] @ w[n, k].T` for the output columns `part`.
    ///
    /// # Safety
    /// `w` (f32, or bf16 when `bf16`), `x` (f32) and `y` (f32) must cover those shapes, `part`
    /// must lie in `0..n`, and the CPU must have AVX2 and FMA.
    pub unsafe fn gemm(
        bf16: bool,
        w: *const u8,
        x: *const f32,
        y: *mut f32,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        if bf16 {
            columns::<true>(w, x, y, (m, n, k), part)
        } else {
            columns::<false>(w, x, y, (m, n, k), part)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns<const BF16: bool>(
        w: *const u8,
        x: *const f32,
        y: *mut f32,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        let shape = (n, k);
        let mut col = part.start;
        while col < part.end {
            let cols = (part.end - col).min(NR);
            let mut row = 0;
            while row < m {
                let rows = (m - row).min(MR);
                let at = (row, col);
                // While the first rows of `x` pass the weights, the next weight rows are
                // fetched, so that the other rows' passes hide the memory latency.
                let next = if row == 0 && col + cols < part.end {
                    Some(w.add((col + cols) * k * if BF16 { 2 } else { 4 }))
                } else {
                    None
                };
                // The edges get smaller tiles of the same code.
                match (rows, cols) {
                    (3, 4) => tile::<3, 4, BF16>(w, x, y, shape, at, next),
                    (2, 4) => tile::<2, 4, BF16>(w, x, y, shape, at, next),
                    (1, 4) => tile::<1, 4, BF16>(w, x, y, shape, at, next),
                    (3, 3) => tile::<3, 3, BF16>(w, x, y, shape, at, next),
                    (2, 3) => tile::<2, 3, BF16>(w, x, y, shape, at, next),
                    (1, 3) => tile::<1, 3, BF16>(w, x, y, shape, at, next),
                    (3, 2) => tile::<3, 2, BF16>(w, x, y, shape, at, next),
                    (2, 2) => tile::<2, 2, BF16>(w, x, y, shape, at, next),
                    (1, 2) => tile::<1, 2, BF16>(w, x, y, shape, at, next),
                    (3, _) => tile::<3, 1, BF16>(w, x, y, shape, at, next),
                    (2, _) => tile::<2, 1, BF16>(w, x, y, shape, at, next),
                    _ => tile::<1, 1, BF16>(w, x, y, shape, at, next),
                }
                row += rows;
            }
            col += cols;
        }
    }

    /// One tile: rows `row..row + R` of `x` against rows `col..col + C` of `w`.
    // Indexes keep the register arrays' roles (input row `j`, weight row `a`) readable.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize, const C: usize, const BF16: bool>(
        w: *const u8,
        x: *const f32,
        y: *mut f32,
        (n, k): (usize, usize),
        (row, col): (usize, usize),
        next: Option<*const u8>,
    ) {
        let full = k / 8 * 8;
        // The next tile's 4 weight rows, a cache line each per 64 bytes of this tile's `x`.
        let line = if BF16 { 32 } else { 16 };
        let bytes = if BF16 { 2 } else { 4 };
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut i = 0;
        while i < full {
            let mut xv = [_mm256_setzero_ps(); R];
            for j in 0..R {
                xv[j] = _mm256_loadu_ps(x.add((row + j) * k + i));
            }
            if let Some(next) = next {
                if i % line == 0 {
                    for a in 0..NR {
                        let p = next.add((a * k + i) * bytes) as *const i8;
                        _mm_prefetch::<_MM_HINT_T0>(p);
                    }
                }
            }
            for a in 0..C {
                let wv = load8::<BF16>(w, (col + a) * k + i);
                for j in 0..R {
                    acc[j][a] = _mm256_fmadd_ps(wv, xv[j], acc[j][a]);
                }
            }
            i += 8;
        }
        for j in 0..R {
            let out = y.add((row + j) * n + col);
            if C == 4 && full == k {
                _mm_storeu_ps(out, sum4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]));
                continue;
            }
            for a in 0..C {
                let mut total = sum8(acc[j][a]);
                for r in full..k {
                    total += weight::<BF16>(w, (col + a) * k + r) * *x.add((row + j) * k + r);
                }
                *out.add(a) = total;
            }
        }
    }

    /// The four lanes' totals of four vectors, in order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_product, wave};
    use super::*;

    #[test]
    fn matches_libtorch_for_edge_tiles_and_odd_widths() {
        #[cfg(target_arch = "x86_64")]
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipping: no AVX2");
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        return;
        for kind in [Kind::Float, Kind::BFloat16] {
            // Every remainder of rows (mod 3) and of columns (mod 4), `k` with and without a
            // tail, one column part per thread and a part that ends inside a tile.
            for shape in [
                (9, 4, 8),
                (10, 7, 576),
                (11, 33, 100),
                (32, 64, 1536),
                (64, 5, 17),
                (13, 50, 3),
                (17, 962, 64),
            ] {
                check_product(kind, shape, "gemm", gemm_avx2);
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let w = wave(24, 0.2).view([3, 8]);
        assert!(
            gemm_avx2(&wave(64, 0.3).view([8, 8]), &w).is_none(),
            "8 rows"
        );
        assert!(
            gemm_avx2(&wave(129 * 8, 0.3).view([129, 8]), &w).is_none(),
            "129 rows"
        );
        let x = wave(80, 0.5).view([10, 8]).to_kind(Kind::Double);
        assert!(gemm_avx2(&x, &w.to_kind(Kind::Double)).is_none(), "f64");
    }
}
