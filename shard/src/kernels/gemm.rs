//! Products of a few dozen rows with a weight matrix (decode steps of 9 to 128 sequences).
//!
//! Past 8 rows a decode step is bound by FMAs, not by memory, and libtorch hands these shapes
//! to MKL's GEMM, which reaches 39 GFLOP/s at 32 rows on the 2-core Zen 3 VM against 95 on a
//! large square product (docs/benchmarks.md): it packs the whole weight matrix on every call,
//! and packing costs as much as the few rows' arithmetic saves. Here nothing is packed. Both
//! operands keep the layout they have (`x` `[m, k]`, `w` `[n, k]`, `k` contiguous in both), and
//! a tile of a few rows of `x` by a few rows of `w` runs along `k` with its dot products in
//! vector accumulators: 3 × 4 on AVX2, whose 16 registers then hold the 12 accumulators, 3
//! `x` vectors and one `w` vector (7 loads feed 12 FMAs), and 4 × 6 on AVX-512's 32 registers
//! (10 loads feed 24 FMAs). By count the FMA ports are the limit. The weight rows of a tile
//! stay in L1 while every group of rows of `x` passes by, so each weight is read from memory
//! once, and the next tile's weights are prefetched meanwhile. The output columns are split
//! across libtorch's threads, as for `matvec`.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::{isa, Isa};

/// The rows of `x` any build of the kernel handles.
const ROWS: Range<usize> = 9..129;

/// `x @ w.T` for `x` `[m, k]` and `w` `[n, k]` (both CPU, same dtype), or `None` when the
/// kernel does not apply or would not beat libtorch, and the caller should use libtorch.
pub fn gemm(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    let kind = w.kind();
    let isa = isa(kind)?;
    let rows = usize::try_from(x.size().first().copied()?).ok()?;
    if !takes(isa, kind, rows) {
        return None;
    }
    gemm_on(isa, x, w)
}

/// Where the kernel beats libtorch, measured interleaved with the `gemm` example of
/// `tessera-benchmark`. From 9 rows (at 8 the streaming kernels are still ahead) on AVX2 up to
/// 128 (MKL is 1.4x behind there on the Zen 3 VM, and wins on some shapes at 192); on AVX-512
/// for f32 up to 48 (1.33-1.36x ahead at 32 rows on the AVX-512 Xeon VM, level at 64, mostly
/// behind at 128). Not bf16 on AVX-512: there oneDNN has native bf16 kernels (and where the
/// CPU has AMX, `amx` runs them).
fn takes(isa: Isa, kind: Kind, rows: usize) -> bool {
    match isa {
        Isa::Avx2 => ROWS.contains(&rows),
        Isa::Avx512 => kind == Kind::Float && (9..49).contains(&rows),
    }
}

/// The kernel on `isa` (which the CPU must have: the callers take it from `isa`).
fn gemm_on(isa: Isa, x: &Tensor, w: &Tensor) -> Option<Tensor> {
    let kind = w.kind();
    let (m, n, k) = super::product_shape(x, w)?;
    if !ROWS.contains(&m) {
        return None;
    }
    let y = Tensor::empty([m as i64, n as i64], (kind, tch::Device::Cpu));
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
            // (`x` f32, `w` and `y` f32 or bf16 as `bf16` says), alive until `split` returns;
            // parts are disjoint ranges of output columns; the callers checked that the CPU
            // has `isa`.
            unsafe {
                tiles::gemm(
                    isa,
                    bf16,
                    wp as *const u8,
                    xp as *const f32,
                    yp as *mut u8,
                    (m, n, k),
                    part,
                )
            }
        };
        super::threads::split(n, 16, true, &run);
    }
    #[cfg(not(target_arch = "x86_64"))]
    return None;
    Some(y)
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::lanes::{Avx2, Avx512, Lanes};
    use super::super::matvec::avx2::weight;
    use super::super::{put, Isa};

    /// `y[m, n] = x[m, k] @ w[n, k].T` for the output columns `part`.
    ///
    /// # Safety
    /// `w` and `y` (f32, or bf16 when `bf16`) and `x` (f32) must cover those shapes, `part`
    /// must lie in `0..n`, and the CPU must have `isa`.
    pub unsafe fn gemm(
        isa: Isa,
        bf16: bool,
        w: *const u8,
        x: *const f32,
        y: *mut u8,
        shape: (usize, usize, usize),
        part: Range<usize>,
    ) {
        match (isa, bf16) {
            (Isa::Avx2, true) => columns_avx2::<true>(w, x, y, shape, part),
            (Isa::Avx2, false) => columns_avx2::<false>(w, x, y, shape, part),
            (Isa::Avx512, true) => columns_avx512::<true>(w, x, y, shape, part),
            (Isa::Avx512, false) => columns_avx512::<false>(w, x, y, shape, part),
        }
    }

    /// AVX2's 16 registers: 3 × 4 accumulators, 3 rows of `x`, one of `w`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns_avx2<const BF16: bool>(
        w: *const u8,
        x: *const f32,
        y: *mut u8,
        shape: (usize, usize, usize),
        part: Range<usize>,
    ) {
        columns::<Avx2, 3, 4, BF16>(w, x, y, shape, part)
    }

    /// AVX-512's 32 registers: 4 × 6 accumulators, 4 rows of `x`, one of `w`; 10 loads feed
    /// 24 FMAs, and `x` passes the weights half as often as with AVX2's tile.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn columns_avx512<const BF16: bool>(
        w: *const u8,
        x: *const f32,
        y: *mut u8,
        shape: (usize, usize, usize),
        part: Range<usize>,
    ) {
        columns::<Avx512, 4, 6, BF16>(w, x, y, shape, part)
    }

    /// Tiles of `MR` rows of `x` by `NR` rows of `w` over the columns `part`. The edges (fewer
    /// than `MR` rows left, fewer than `NR` columns) run one row or one column at a time: they
    /// are a small share of a product's work (at most `MR - 1` rows, and `NR - 1` columns per
    /// thread's part), and one tile shape per edge keeps the code small.
    #[inline(always)]
    unsafe fn columns<L: Lanes, const MR: usize, const NR: usize, const BF16: bool>(
        w: *const u8,
        x: *const f32,
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
            // queue behind the CPU's few outstanding-miss buffers.
            let next_cols = (part.end - col - cols).min(NR);
            let next = w.add((col + cols) * k * bytes::<BF16>());
            let lines = (next_cols * k * bytes::<BF16>()).div_ceil(64);
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
                    tile::<L, MR, NR, BF16>(w, x, y, shape, (row, col), ahead);
                } else if cols == NR {
                    for r in row..row + rows {
                        let ahead = if r == row { ahead } else { Ahead::NONE };
                        tile::<L, 1, NR, BF16>(w, x, y, shape, (r, col), ahead);
                    }
                } else {
                    // The last columns of `part`: nothing comes next.
                    for c in col..col + cols {
                        if rows == MR {
                            tile::<L, MR, 1, BF16>(w, x, y, shape, (row, c), Ahead::NONE);
                        } else {
                            for r in row..row + rows {
                                tile::<L, 1, 1, BF16>(w, x, y, shape, (r, c), Ahead::NONE);
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

    const fn bytes<const BF16: bool>() -> usize {
        if BF16 {
            2
        } else {
            4
        }
    }

    /// One tile: rows `row..row + R` of `x` against rows `col..col + C` of `w`.
    // Indexes keep the register arrays' roles (input row `j`, weight row `a`) readable.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<L: Lanes, const R: usize, const C: usize, const BF16: bool>(
        w: *const u8,
        x: *const f32,
        y: *mut u8,
        (n, k): (usize, usize),
        (row, col): (usize, usize),
        ahead: Ahead,
    ) {
        let full = k / L::WIDTH * L::WIDTH;
        let bytes = bytes::<BF16>();
        // Spread over the tile's steps along `k`, a few lines a step.
        let per_step = ahead.lines.div_ceil((full / L::WIDTH).max(1));
        let mut fetched = 0;
        let mut acc = [[L::zero(); C]; R];
        let mut i = 0;
        while i < full {
            let mut xv = [L::zero(); R];
            for j in 0..R {
                xv[j] = L::load::<false>(x.add((row + j) * k + i) as *const u8);
            }
            for _ in 0..per_step {
                if fetched < ahead.lines {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.start.add(fetched * 64) as *const i8);
                    fetched += 1;
                }
            }
            for a in 0..C {
                let wv = L::load::<BF16>(w.add(((col + a) * k + i) * bytes));
                for j in 0..R {
                    acc[j][a] = L::fmadd(wv, xv[j], acc[j][a]);
                }
            }
            i += L::WIDTH;
        }
        for j in 0..R {
            let mut totals = [0.0; C];
            let mut a = 0;
            while a + 4 <= C {
                let group = [acc[j][a], acc[j][a + 1], acc[j][a + 2], acc[j][a + 3]];
                totals[a..a + 4].copy_from_slice(&L::sum4(group));
                a += 4;
            }
            for a in a..C {
                totals[a] = L::sum(acc[j][a]);
            }
            for a in 0..C {
                for r in full..k {
                    totals[a] += weight::<BF16>(w, (col + a) * k + r) * *x.add((row + j) * k + r);
                }
                put::<BF16>(y, (row + j) * n + col + a, totals[a]);
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
                        gemm_on(isa, x, w)
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
        assert!(takes(Isa::Avx2, Kind::BFloat16, 9) && takes(Isa::Avx2, Kind::Float, 128));
        assert!(!takes(Isa::Avx2, Kind::Float, 8) && !takes(Isa::Avx2, Kind::Float, 129));
        assert!(takes(Isa::Avx512, Kind::Float, 9) && takes(Isa::Avx512, Kind::Float, 48));
        assert!(
            !takes(Isa::Avx512, Kind::Float, 49),
            "MKL is level from 64 rows"
        );
        assert!(
            !takes(Isa::Avx512, Kind::BFloat16, 32),
            "oneDNN's bf16 kernels"
        );
    }
}
