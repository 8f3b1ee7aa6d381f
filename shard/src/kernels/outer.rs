//! f32 products of a few dozen rows on AVX-512, as sums of outer products.
//!
//! `gemm`'s tiles are dot products: four rows of `x` by four rows of `w`, each accumulator
//! a vector of partial sums along `k`. That costs twice: every tile ends in horizontal sums
//! (shuffles, on a port the FMAs also use), and every step reads four vectors of `x`, so the
//! whole of `x` passes each tile of weights from L2 (32 bytes a cycle at full speed). Here
//! the rows of `x` lie across the lanes instead: `x` is packed transposed once per call
//! (`[k, m]`, `m` padded to whole vectors), and a step along `k` multiplies one weight of each
//! of 8 rows of `w`, broadcast, by the two or three vectors of `x` at that `k`. The
//! accumulators then hold `yᵀ` whole, no sums are left at the end, and a step reads 10 or 11
//! operands for 16 or 24 FMAs. Every weight is read once per call, straight into a broadcast;
//! the next tile's weights are prefetched meanwhile, as in `gemm`. The output columns are split
//! across libtorch's threads, and each thread packs `x` for itself rather than wait for one
//! to pack it (the packing was not timed alone; the figures below include it).
//!
//! On the AMX Xeon VM, f32 at 32 rows (`gemm` example, interleaved with `gemm`'s tiles): a
//! layer's products 295-317 against 266-276 GFLOP/s (0.83-0.91 of the 2048² matmul rate
//! measured in the same run), the LM head (113 MB, from memory) 247-265 against 220-231;
//! whole batch-32 decode steps 53.7 and 54.0 against 56.1 and 56.5 ms (`step_profile`).

use std::ops::Range;

use tch::{Kind, Tensor};

#[cfg(test)]
use super::Now;
use super::{isa, Isa, Sink};

/// The rows of `x` the kernel takes: two or three vectors of lanes. Up to 16 rows (one
/// vector) `gemm`'s tiles are ahead: there each broadcast weight feeds a single FMA, and
/// loads outnumber FMAs (`gemm` example, interleaved: 149-157 against 191-196 GFLOP/s at 12
/// rows, 171-195 against 206-222 at 16).
const ROWS: Range<usize> = 17..49;

/// Lanes of a vector.
const LANES: usize = 16;

/// `x @ w.T` for f32 `x` `[m, k]` and `w` `[n, k]` on a CPU with AVX-512, or `None` where the
/// kernel does not apply and the caller should use another.
#[cfg(test)]
pub fn gemm(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    gemm_in(x, w, &mut Now)
}

/// `gemm`, its work into `sink`.
pub(super) fn gemm_in<'a>(x: &Tensor, w: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    if w.kind() != Kind::Float || isa(Kind::Float) != Some(Isa::Avx512) {
        return None;
    }
    let (m, n, k) = super::product_shape(x, w)?;
    if !ROWS.contains(&m) {
        return None;
    }
    let y = Tensor::empty([m as i64, n as i64], (Kind::Float, tch::Device::Cpu));
    #[cfg(target_arch = "x86_64")]
    {
        let prepared = x.contiguous();
        if !sink.unchanged(x, &prepared) {
            return None;
        }
        let x = prepared;
        for t in [w, &x, &y] {
            sink.keep(t);
        }
        let (wp, xp, yp) = (
            w.data_ptr() as usize,
            x.data_ptr() as usize,
            y.data_ptr() as usize,
        );
        let run = move |part: Range<usize>| {
            // SAFETY: `w`, `x` and `y` are contiguous f32 CPU tensors of the shapes checked above,
            // alive until the work has run (the sink keeps them); parts are disjoint ranges of
            // output columns; `isa` found AVX-512.
            unsafe {
                tiles::columns(
                    wp as *const f32,
                    xp as *const f32,
                    yp as *mut f32,
                    (m, n, k),
                    part,
                )
            }
        };
        // Parts in whole tiles (of 8 columns) and whole cache lines of `y` (16).
        sink.split(n, 16, true, run);
    }
    #[cfg(not(target_arch = "x86_64"))]
    return None;
    Some(y)
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use std::ops::Range;

    use super::super::lanes::transpose16;
    use super::LANES;

    /// `$body` 16 times, `$j` a constant `0..16` in each: as a loop, the compiler kept it
    /// rolled, and computed the steps' addresses at run time.
    macro_rules! sixteen {
        ($j:ident => $body:expr) => {{
            sixteen!(@ $j $body; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
        }};
        (@ $j:ident $body:expr; $($n:literal)*) => {{
            $( { let $j: usize = $n; $body; } )*
        }};
    }

    thread_local! {
        /// Each thread's packed `xᵀ`, kept between calls (a product's is at most 48 × `k`).
        static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// `y[m, n] = x[m, k] @ w[n, k].T` for the output columns `part`.
    ///
    /// # Safety
    /// `w`, `x` and `y` must hold those shapes, `part` must lie in `0..n`, `m` in 17..=48, and
    /// the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn columns(
        w: *const f32,
        x: *const f32,
        y: *mut f32,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        let vectors = m.div_ceil(LANES);
        // Taken out of the thread-local and put back, rather than borrowed in a closure, so
        // that everything here is built for AVX-512 whatever closures inherit.
        let mut xt = PACKED.take();
        pack(x, (m, k), vectors * LANES, &mut xt);
        // Eight weight rows: the compiler loads a step's broadcast weights all at once, so
        // accumulators, weights and `x`'s vectors must fit the 32 registers together. With 12
        // rows at two vectors (38) it spilled: 237-279 against 295-317 GFLOP/s at 32 rows
        // (`gemm` example, interleaved).
        if vectors == 2 {
            run::<2, 8>(w, xt.as_ptr(), y, (m, n, k), part)
        } else {
            run::<3, 8>(w, xt.as_ptr(), y, (m, n, k), part)
        }
        PACKED.set(xt);
    }

    /// `x` `[m, k]` into `xt` as `[k, width]`, the rows past `m` zero: 16 × 16 blocks
    /// transposed in registers (`transpose16`), the last `k % 16` columns one element at a time.
    #[inline(always)]
    unsafe fn pack(x: *const f32, (m, k): (usize, usize), width: usize, xt: &mut Vec<f32>) {
        // Every element is written below, so a longer buffer needs no clearing.
        if xt.len() < k * width {
            xt.resize(k * width, 0.0);
        }
        let out = xt.as_mut_ptr();
        let whole = k / LANES * LANES;
        for r0 in (0..width).step_by(LANES) {
            for i0 in (0..whole).step_by(LANES) {
                let v: [__m512i; LANES] = std::array::from_fn(|j| {
                    if r0 + j < m {
                        _mm512_loadu_si512(x.add((r0 + j) * k + i0) as *const _)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                for (c, v) in transpose16(v).into_iter().enumerate() {
                    _mm512_storeu_si512(out.add((i0 + c) * width + r0) as *mut _, v);
                }
            }
            for i in whole..k {
                for j in 0..LANES {
                    let r = r0 + j;
                    *out.add(i * width + r) = if r < m { *x.add(r * k + i) } else { 0.0 };
                }
            }
        }
    }

    /// Tiles of `NW` output columns over `part`, then the columns left one at a time.
    #[inline(always)]
    unsafe fn run<const V: usize, const NW: usize>(
        w: *const f32,
        xt: *const f32,
        y: *mut f32,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        let mut col = part.start;
        while col + NW <= part.end {
            let more = col + NW < part.end;
            tile::<V, NW>(w, xt, y, (m, n, k), col, more);
            col += NW;
        }
        while col < part.end {
            tile::<V, 1>(w, xt, y, (m, n, k), col, false);
            col += 1;
        }
    }

    /// Output columns `col..col + NW` for every row: `V` vectors of rows by `NW` weight rows,
    /// with the `NW` weight rows after them prefetched meanwhile when `more` come.
    // Indexes keep the register arrays' roles (weight row `a`, vector of rows `v`) readable.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<const V: usize, const NW: usize>(
        w: *const f32,
        xt: *const f32,
        y: *mut f32,
        (m, n, k): (usize, usize, usize),
        col: usize,
        more: bool,
    ) {
        let rows: [*const f32; NW] = std::array::from_fn(|a| w.add((col + a) * k));
        let ahead = w.wrapping_add((col + NW) * k);
        let mut acc = [[_mm512_setzero_ps(); V]; NW];
        // A cache line of each weight row at a time, and with it the same line of each of
        // the next tile's rows: prefetches spread evenly over the tile.
        let whole = k / LANES * LANES;
        let mut i = 0;
        while i < whole {
            if more {
                // All `NW` rows, even where fewer come (a prefetch past the weights is dropped,
                // never a fault): a count known only at run time made a branch of each one.
                for a in 0..NW {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(a * k + i) as *const i8);
                }
            }
            // This chunk's start in each row, so that its 16 steps address the weights at
            // fixed offsets: walking the rows instead, the compiler spent 7 adds a step,
            // on the ports the FMAs need.
            let at: [*const f32; NW] = std::array::from_fn(|a| rows[a].add(i));
            let x_at = xt.add(i * V * LANES);
            sixteen!(j => step::<V, NW>(&mut acc, &at, x_at, j));
            i += LANES;
        }
        for i in whole..k {
            step::<V, NW>(&mut acc, &rows, xt, i);
        }
        // `yᵀ` out of the registers, then each row's `NW` columns into `y`.
        let mut out = [[0f32; 3 * LANES]; NW];
        for a in 0..NW {
            for v in 0..V {
                _mm512_storeu_ps(out[a].as_mut_ptr().add(v * LANES), acc[a][v]);
            }
        }
        for r in 0..m {
            let dst = y.add(r * n + col);
            for a in 0..NW {
                *dst.add(a) = out[a][r];
            }
        }
    }

    /// One step along `k`: element `i` of each of the weight rows `rows` times the vectors
    /// of `x` at `xt`'s step `i`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn step<const V: usize, const NW: usize>(
        acc: &mut [[__m512; V]; NW],
        rows: &[*const f32; NW],
        xt: *const f32,
        i: usize,
    ) {
        let at = xt.add(i * V * LANES);
        let xv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(at.add(v * LANES)));
        for a in 0..NW {
            let wa = _mm512_set1_ps(*rows[a].add(i));
            for v in 0..V {
                acc[a][v] = _mm512_fmadd_ps(wa, xv[v], acc[a][v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::check_product;
    use super::*;

    #[test]
    fn matches_libtorch_at_every_height_and_edge() {
        if isa(Kind::Float) != Some(Isa::Avx512) {
            eprintln!("skipping: no AVX-512");
            return;
        }
        // Two and three vectors of rows, full and padded; columns that end inside a tile, a
        // thread part that ends inside one, `k` with and without a tail past whole blocks.
        for shape in [
            (17, 4, 8),
            (24, 24, 576),
            (17, 37, 100),
            (32, 64, 1536),
            (32, 960, 576),
            (33, 50, 3),
            (48, 962, 64),
            (40, 1, 17),
        ] {
            check_product(Kind::Float, shape, "outer", gemm);
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let w = Tensor::ones([3, 8], (Kind::Float, tch::Device::Cpu));
        let x = |m: i64, kind: Kind| Tensor::ones([m, 8], (kind, tch::Device::Cpu));
        assert!(gemm(&x(16, Kind::Float), &w).is_none(), "16 rows");
        assert!(gemm(&x(49, Kind::Float), &w).is_none(), "49 rows");
        let wb = w.to_kind(Kind::BFloat16);
        assert!(gemm(&x(32, Kind::BFloat16), &wb).is_none(), "bf16");
    }
}
