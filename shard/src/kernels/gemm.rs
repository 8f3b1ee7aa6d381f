//! Products of a few dozen rows with a weight matrix (decode steps of 9 to 128 sequences).
//!
//! Past 8 rows a decode step is bound by FMAs, not by memory, and libtorch hands these shapes
//! to MKL's GEMM, which reaches 39 GFLOP/s at 32 rows on the 2-core Zen 3 VM against 95 on a
//! large square product (docs/benchmarks.md): it packs the whole weight matrix on every call,
//! and packing costs as much as the few rows' arithmetic saves. Here nothing is packed. Both
//! operands keep the layout they have (`x` `[m, k]`, `w` `[n, k]`, `k` contiguous in both), and
//! a tile of a few rows of `x` by a few rows of `w` runs along `k` with its dot products in
//! vector accumulators: 3 × 4 on AVX2, whose 16 registers then hold the 12 accumulators, 3
//! `x` vectors and one `w` vector (7 loads feed 12 FMAs), and 4 × 4 on AVX-512 (8 loads feed
//! 16 FMAs; 4 × 6, 24 FMAs, left the compiler short of registers once all six `w` loads were
//! hoisted, and spilled accumulators in the loop). bf16 on AVX-512 BF16 keeps both operands in
//! bf16 and the same tile does `vdpbf16ps`, two products per lane per instruction: twice the
//! f32 FMA's work (215 against 114 GFLOP/s a core on the Zen 4 VM). The weight rows of a tile
//! stay in L1 while every group of rows of `x` passes by, so each weight is read from memory
//! once, and the next tile's weights are prefetched meanwhile. A tile's totals are reduced and
//! written four at a time: scalar, the end of a tile cost about 400 cycles against 30 a step
//! along `k`, as much as a third of a 576-wide product. The output columns are split across
//! libtorch's threads, as for `matvec`.

use std::ops::Range;

use tch::{Kind, Tensor};

#[cfg(test)]
use super::Now;
use super::{isa, Isa, Sink};

/// The rows of `x` any build of the kernel handles.
const ROWS: Range<usize> = 9..129;

/// `x @ w.T` for `x` `[m, k]` and `w` `[n, k]` (both CPU, same dtype), or `None` when the
/// kernel does not apply or would not beat libtorch, and the caller should use libtorch.
#[cfg(test)]
pub fn gemm(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    gemm_in(x, w, &mut Now)
}

/// `gemm`, its work into `sink`.
pub(super) fn gemm_in<'a>(x: &Tensor, w: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    let kind = w.kind();
    let isa = isa(kind)?;
    let rows = usize::try_from(x.size().first().copied()?).ok()?;
    if !takes(isa, rows) {
        return None;
    }
    gemm_on(isa, x, w, sink)
}

/// Where the kernel beats libtorch, measured interleaved with the `gemm` example of
/// `tessera-benchmark`. From 9 rows (at 8 the streaming kernels are still ahead) on AVX2 up to
/// 128 (MKL is 1.4x behind there on the Zen 3 VM, and wins on some shapes at 192); on AVX-512
/// up to 48: f32 1.33-1.36x ahead of MKL at 32 rows on the AVX-512 Xeon VM, level at 64,
/// mostly behind at 128; bf16 1.2-1.4x ahead of oneDNN at 32 rows on the Zen 4 VM, level at
/// 64, 0.8-0.9x at 96 and 128. (Where the CPU has AMX, `amx` takes bf16 first, and `outer`
/// takes f32 from 17 rows on AVX-512: this tile is left f32 at 9 to 16 rows there.)
fn takes(isa: Isa, rows: usize) -> bool {
    match isa {
        Isa::Avx2 => ROWS.contains(&rows),
        Isa::Avx512 => (9..49).contains(&rows),
    }
}

/// The kernel on `isa` (which the CPU must have: the callers take it from `isa`).
fn gemm_on<'a>(isa: Isa, x: &Tensor, w: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    let kind = w.kind();
    let (m, n, k) = super::product_shape(x, w)?;
    if !ROWS.contains(&m) {
        return None;
    }
    let y = Tensor::empty([m as i64, n as i64], (kind, tch::Device::Cpu));
    #[cfg(target_arch = "x86_64")]
    {
        let bf16 = kind == Kind::BFloat16;
        // `x` as f32, widened once here rather than in every tile; bf16 pairs read it as is.
        let prepared = if bf16 && isa == Isa::Avx512 {
            x.contiguous()
        } else {
            x.to_kind(Kind::Float).contiguous()
        };
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
            // SAFETY: `w`, `x` and `y` are contiguous CPU tensors of the shapes checked above (`w`
            // and `y` f32 or bf16 as `bf16` says, `x` as `tiles::gemm` wants it), alive until the
            // work has run (the sink keeps them); parts are disjoint ranges of output columns; the
            // callers checked that the CPU has `isa`.
            unsafe {
                tiles::gemm(
                    isa,
                    bf16,
                    wp as *const u8,
                    xp as *const u8,
                    yp as *mut u8,
                    (m, n, k),
                    part,
                )
            }
        };
        sink.split(n, 16, true, run);
    }
    #[cfg(not(target_arch = "x86_64"))]
    return None;
    Some(y)
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::x86_64::*;
    use std::marker::PhantomData;
    use std::ops::Range;

    use super::super::lanes::{Avx2, Avx512, Lanes};
    use super::super::{put, put4, Isa};

    /// `y[m, n] = x[m, k] @ w[n, k].T` for the output columns `part`.
    ///
    /// # Safety
    /// `w` and `y` must be f32, or bf16 when `bf16`; `x` must be f32, except bf16 on AVX-512
    /// (`Pairs` reads it as it is). They must cover those shapes, `part` must lie in `0..n`,
    /// and the CPU must have `isa` (with AVX-512 BF16 for bf16 on AVX-512).
    pub unsafe fn gemm(
        isa: Isa,
        bf16: bool,
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        shape: (usize, usize, usize),
        part: Range<usize>,
    ) {
        match (isa, bf16) {
            (Isa::Avx2, true) => columns_avx2::<true>(w, x, y, shape, part),
            (Isa::Avx2, false) => columns_avx2::<false>(w, x, y, shape, part),
            (Isa::Avx512, true) => columns_pairs(w, x, y, shape, part),
            (Isa::Avx512, false) => columns_avx512(w, x, y, shape, part),
        }
    }

    /// AVX2's 16 registers: 3 × 4 accumulators, 3 rows of `x`, one of `w`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns_avx2<const BF16: bool>(
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        shape: (usize, usize, usize),
        part: Range<usize>,
    ) {
        columns::<Widened<Avx2, BF16>, 3, 4>(w, x, y, shape, part)
    }

    /// AVX-512: 4 × 4 accumulators, 4 rows of `x`, 4 of `w`; 8 loads feed 16 FMAs, and each
    /// row's four totals leave in one store.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn columns_avx512(
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        shape: (usize, usize, usize),
        part: Range<usize>,
    ) {
        columns::<Widened<Avx512, false>, 4, 4>(w, x, y, shape, part)
    }

    /// bf16 with AVX-512 BF16: the same 4 × 4 tile, each step 32 elements of `k` in one
    /// `vdpbf16ps` per accumulator, twice the f32 FMA's work per instruction.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn columns_pairs(
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        shape: (usize, usize, usize),
        part: Range<usize>,
    ) {
        columns::<Pairs, 4, 4>(w, x, y, shape, part)
    }

    /// One step along `k` of a tile's dot products: what the tile loop is generic over.
    trait Dot {
        /// f32 accumulator lanes.
        type Acc: Copy;
        /// A step's operand, of `w` or of `x`.
        type In: Copy;
        /// Elements of `k` a step covers.
        const STEP: usize;
        /// Bytes per element of `w` (and of `y`) and of `x`.
        const W_BYTES: usize;
        const X_BYTES: usize;
        unsafe fn zero() -> Self::Acc;
        unsafe fn load_w(p: *const u8) -> Self::In;
        unsafe fn load_x(p: *const u8) -> Self::In;
        unsafe fn madd(acc: Self::Acc, w: Self::In, x: Self::In) -> Self::Acc;
        /// Writes the totals of four accumulators to elements `i..i + 4` of `y`.
        unsafe fn put4(y: *mut u8, i: usize, v: [Self::Acc; 4]);
        unsafe fn sum(v: Self::Acc) -> f32;
        /// Writes element `i` of `y`, in `w`'s dtype.
        unsafe fn put(y: *mut u8, i: usize, v: f32);
    }

    /// f32 lanes: `w` f32 or bf16 (widened on load), `x` f32.
    struct Widened<L, const BF16: bool>(PhantomData<L>);

    impl<L: Lanes, const BF16: bool> Dot for Widened<L, BF16> {
        type Acc = L::V;
        type In = L::V;
        const STEP: usize = L::WIDTH;
        const W_BYTES: usize = if BF16 { 2 } else { 4 };
        const X_BYTES: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> L::V {
            L::zero()
        }
        #[inline(always)]
        unsafe fn load_w(p: *const u8) -> L::V {
            L::load::<BF16>(p)
        }
        #[inline(always)]
        unsafe fn load_x(p: *const u8) -> L::V {
            L::load::<false>(p)
        }
        #[inline(always)]
        unsafe fn madd(acc: L::V, w: L::V, x: L::V) -> L::V {
            L::fmadd(w, x, acc)
        }
        #[inline(always)]
        unsafe fn put4(y: *mut u8, i: usize, v: [L::V; 4]) {
            put4::<BF16>(y, i, L::sum4v(v))
        }
        #[inline(always)]
        unsafe fn sum(v: L::V) -> f32 {
            L::sum(v)
        }
        #[inline(always)]
        unsafe fn put(y: *mut u8, i: usize, v: f32) {
            put::<BF16>(y, i, v)
        }
    }

    /// bf16 pairs: `w` and `x` both bf16, 32 elements a step, each `vdpbf16ps` adding two
    /// products into each of 16 f32 lanes. The products are exact in f32 and the sums round to
    /// nearest even, with subnormal inputs and results taken as zero (as the instruction
    /// defines), so the result differs from libtorch's f32 accumulation in the order of the
    /// sums and in subnormals only.
    struct Pairs;

    impl Dot for Pairs {
        type Acc = __m512;
        type In = __m512bh;
        const STEP: usize = 32;
        const W_BYTES: usize = 2;
        const X_BYTES: usize = 2;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_w(p: *const u8) -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(p as *const _))
        }
        #[inline(always)]
        unsafe fn load_x(p: *const u8) -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(p as *const _))
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512, w: __m512bh, x: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(acc, w, x)
        }
        #[inline(always)]
        unsafe fn put4(y: *mut u8, i: usize, v: [__m512; 4]) {
            put4::<true>(y, i, Avx512::sum4v(v))
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            Avx512::sum(v)
        }
        #[inline(always)]
        unsafe fn put(y: *mut u8, i: usize, v: f32) {
            put::<true>(y, i, v)
        }
    }

    /// Tiles of `MR` rows of `x` by `NR` rows of `w` over the columns `part`. The edges (fewer
    /// than `MR` rows left, fewer than `NR` columns) run one row or one column at a time: they
    /// are a small share of a product's work (at most `MR - 1` rows, and `NR - 1` columns per
    /// thread's part), and one tile shape per edge keeps the code small.
    #[inline(always)]
    unsafe fn columns<D: Dot, const MR: usize, const NR: usize>(
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        let shape = (n, k);
        let mut col = part.start;
        while col < part.end {
            let cols = (part.end - col).min(NR);
            // The next columns' weight rows (contiguous in `w`) are fetched while these pass
            // every row of `x`, a share in each group of rows: all at once, the misses would
            // queue behind the CPU's few outstanding-miss buffers. Into L2: on the Zen 4 VM,
            // whole batch-32 steps in four interleaved pairs went 44.0-45.4 → 39.5-43.5 ms
            // (bf16) and 73.7-85.2 → 68.1-75.8 ms (f32) against prefetching into L1.
            let next_cols = (part.end - col - cols).min(NR);
            let next = w.add((col + cols) * k * D::W_BYTES);
            let lines = (next_cols * k * D::W_BYTES).div_ceil(64);
            let groups = m.div_ceil(MR);
            let mut row = 0;
            while row < m {
                let rows = (m - row).min(MR);
                let group = row / MR;
                let (from, to) = (group * lines / groups, (group + 1) * lines / groups);
                let ahead = Ahead {
                    start: next.add(from * 64),
                    lines: to - from,
                };
                if cols == NR && rows == MR {
                    tile::<D, MR, NR>(w, x, y, shape, (row, col), ahead);
                } else if cols == NR {
                    for r in row..row + rows {
                        let ahead = if r == row { ahead } else { Ahead::NONE };
                        tile::<D, 1, NR>(w, x, y, shape, (r, col), ahead);
                    }
                } else {
                    // The last columns of `part`: nothing comes next.
                    for c in col..col + cols {
                        if rows == MR {
                            tile::<D, MR, 1>(w, x, y, shape, (row, c), Ahead::NONE);
                        } else {
                            for r in row..row + rows {
                                tile::<D, 1, 1>(w, x, y, shape, (r, c), Ahead::NONE);
                            }
                        }
                    }
                }
                row += rows;
            }
            col += cols;
        }
    }

    /// Cache lines to prefetch during a tile: `lines` of them from `start`.
    #[derive(Clone, Copy)]
    struct Ahead {
        start: *const u8,
        lines: usize,
    }

    impl Ahead {
        const NONE: Ahead = Ahead {
            start: std::ptr::null(),
            lines: 0,
        };
    }

    /// One tile: rows `row..row + R` of `x` against rows `col..col + C` of `w`.
    // Indexes keep the register arrays' roles (input row `j`, weight row `a`) readable.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<D: Dot, const R: usize, const C: usize>(
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        shape: (usize, usize),
        at: (usize, usize),
        ahead: Ahead,
    ) {
        // Two copies, so that where `k` has no tail (every SmolLM2 shape) the accumulators
        // never meet `tail_step`'s by-value return, which puts them in memory: with one copy,
        // a `memset` zeroed them before every tile.
        if shape.1 % D::STEP == 0 {
            tile_in::<D, R, C, false>(w, x, y, shape, at, ahead)
        } else {
            tile_in::<D, R, C, true>(w, x, y, shape, at, ahead)
        }
    }

    /// `tile`, for `k` with a tail past the last whole step (`TAIL`) or without.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile_in<D: Dot, const R: usize, const C: usize, const TAIL: bool>(
        w: *const u8,
        x: *const u8,
        y: *mut u8,
        (n, k): (usize, usize),
        (row, col): (usize, usize),
        ahead: Ahead,
    ) {
        let full = k / D::STEP * D::STEP;
        // Spread over the tile's steps along `k`, a few lines a step.
        let per_step = ahead.lines.div_ceil((full / D::STEP).max(1));
        let mut fetched = 0;
        // The tail of `k` first, into fresh accumulators, and the whole steps on top.
        let mut acc = if TAIL {
            tail_step::<D, R, C>(w, x, k, (row, col), full)
        } else {
            [[D::zero(); C]; R]
        };
        let (xr, wr) = starts::<D, R, C>(w, x, k, (row, col));
        let mut i = 0;
        while i < full {
            for _ in 0..per_step {
                if fetched < ahead.lines {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.start.add(fetched * 64) as *const i8);
                    fetched += 1;
                }
            }
            step::<D, R, C, false>(&mut acc, &xr, &wr, k, i);
            i += D::STEP;
        }
        // Row by row by hand: with a loop over the rows the compiler kept all the accumulators
        // in memory, zeroed by `memset` before every tile (4% of a batch-32 bf16 step).
        const { assert!(R <= 4, "the tiles have at most 4 rows") };
        if let Some(accs) = acc.first() {
            finish::<D, C>(y, row * n + col, accs);
        }
        if let Some(accs) = acc.get(1) {
            finish::<D, C>(y, (row + 1) * n + col, accs);
        }
        if let Some(accs) = acc.get(2) {
            finish::<D, C>(y, (row + 2) * n + col, accs);
        }
        if let Some(accs) = acc.get(3) {
            finish::<D, C>(y, (row + 3) * n + col, accs);
        }
    }

    /// Writes one row of a tile's totals from `out`: four at a time, then one at a time.
    #[inline(always)]
    unsafe fn finish<D: Dot, const C: usize>(y: *mut u8, out: usize, acc: &[D::Acc; C]) {
        for g in 0..C / 4 {
            let a = 4 * g;
            D::put4(y, out + a, [acc[a], acc[a + 1], acc[a + 2], acc[a + 3]]);
        }
        for a in C / 4 * 4..C {
            D::put(y, out + a, D::sum(acc[a]));
        }
    }

    /// Accumulators holding the products of the last `k - full` elements. Apart, and
    /// returned by value: its copies into padded buffers take the accumulators' address, which
    /// keeps them in memory (zeroed by `memset` on every tile, 4% of a batch-32 bf16 step).
    /// Not built for the tile's instruction set (a generic function cannot be), so the vector
    /// operations here are calls: slower, and run once per tile of a `k` with a tail.
    ///
    /// # Safety
    /// As `tile`'s: the CPU has the instructions `D` uses, and the rows lie in `w` and `x`.
    #[inline(never)]
    unsafe fn tail_step<D: Dot, const R: usize, const C: usize>(
        w: *const u8,
        x: *const u8,
        k: usize,
        at: (usize, usize),
        full: usize,
    ) -> [[D::Acc; C]; R] {
        let mut acc = [[D::zero(); C]; R];
        let (xr, wr) = starts::<D, R, C>(w, x, k, at);
        step::<D, R, C, true>(&mut acc, &xr, &wr, k, full);
        acc
    }

    /// Where the tile's rows of `x` and of `w` start. Taken once per tile, so that the loop
    /// along `k` adds one offset to each instead of recomputing `(row + j) * k + i`, whose
    /// terms the compiler kept on the stack and reloaded every step (48 instructions a step
    /// for 16 FMAs). On the AMX Xeon VM, f32 at 32 rows in the `gemm` example went from
    /// 228-229 to 255-259 GFLOP/s, and batch-32 f32 steps from 58.6-60.5 to 52.5-54.9 ms
    /// (interleaved runs); bf16 pairs were level (193-203 GFLOP/s both).
    #[inline(always)]
    unsafe fn starts<D: Dot, const R: usize, const C: usize>(
        w: *const u8,
        x: *const u8,
        k: usize,
        (row, col): (usize, usize),
    ) -> ([*const u8; R], [*const u8; C]) {
        (
            std::array::from_fn(|j| x.add((row + j) * k * D::X_BYTES)),
            std::array::from_fn(|a| w.add((col + a) * k * D::W_BYTES)),
        )
    }

    /// One step along `k` from `i`: a whole one, or the last `k - i` elements (`PART`), the
    /// operands padded with zeros.
    // As in `tile`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn step<D: Dot, const R: usize, const C: usize, const PART: bool>(
        acc: &mut [[D::Acc; C]; R],
        xr: &[*const u8; R],
        wr: &[*const u8; C],
        k: usize,
        i: usize,
    ) {
        let load = |p: *const u8, bytes: usize, whole: unsafe fn(*const u8) -> D::In| {
            if PART {
                let mut pad = [0u8; 64];
                std::ptr::copy_nonoverlapping(p, pad.as_mut_ptr(), (k - i) * bytes);
                whole(pad.as_ptr())
            } else {
                whole(p)
            }
        };
        let xv: [D::In; R] =
            std::array::from_fn(|j| load(xr[j].add(i * D::X_BYTES), D::X_BYTES, D::load_x));
        for a in 0..C {
            let wv = load(wr[a].add(i * D::W_BYTES), D::W_BYTES, D::load_w);
            for j in 0..R {
                acc[j][a] = D::madd(acc[j][a], wv, xv[j]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_product, wave};
    use super::*;

    #[test]
    fn matches_libtorch_for_edge_tiles_and_odd_widths() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let Some(best) = isa(kind) else {
                eprintln!("skipping {kind:?}: no kernel for this CPU");
                continue;
            };
            // Both widths where the CPU has AVX-512 (whether or not `gemm` would pick it).
            for isa in [best, Isa::Avx2] {
                // Every remainder of rows (mod 3 and 4, the two tiles' heights) and of columns
                // (mod 4 and 6), `k` with and without a tail of either width, one column part
                // per thread and a part that ends inside a tile.
                for shape in [
                    (9, 4, 8),
                    (10, 7, 576),
                    (11, 33, 100),
                    (32, 64, 1536),
                    (64, 5, 17),
                    (13, 50, 3),
                    (17, 962, 64),
                    (12, 9, 24),
                ] {
                    check_product(kind, shape, &format!("gemm {isa:?}"), |x, w| {
                        gemm_on(isa, x, w, &mut Now)
                    });
                }
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let w = wave(24, 0.2).view([3, 8]);
        assert!(gemm(&wave(64, 0.3).view([8, 8]), &w).is_none(), "8 rows");
        assert!(
            gemm(&wave(129 * 8, 0.3).view([129, 8]), &w).is_none(),
            "129 rows"
        );
        let x = wave(80, 0.5).view([10, 8]).to_kind(Kind::Double);
        assert!(gemm(&x, &w.to_kind(Kind::Double)).is_none(), "f64");
    }

    #[test]
    fn takes_only_where_it_was_measured_ahead() {
        assert!(takes(Isa::Avx2, 9) && takes(Isa::Avx2, 128));
        assert!(!takes(Isa::Avx2, 8) && !takes(Isa::Avx2, 129));
        assert!(takes(Isa::Avx512, 9) && takes(Isa::Avx512, 48));
        assert!(
            !takes(Isa::Avx512, 49),
            "MKL and oneDNN are level from 64 rows"
        );
    }
}
