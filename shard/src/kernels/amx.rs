//! bf16 products of a few dozen rows on AMX, the tile unit of Intel Xeons from Sapphire Rapids.
//!
//! At 9 to 128 rows a bf16 decode step is one product after another, and libtorch hands
//! them to oneDNN, which runs them at a fraction of its large-matmul rate (186-248 GFLOP/s at
//! 32 rows against 666 or more on a 2048² square, docs/benchmarks.md). One AMX `tdpbf16ps`
//! multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32 accumulators, so the
//! arithmetic of these shapes is nearly free and what is left is feeding the tiles.
//!
//! Nothing of the weights is packed: the left operand is 16 weight rows × 32 of `k`, which
//! `tileloadd` reads straight out of `w` `[n, k]` with the row stride, and the right operand
//! is the rows of `x` in AMX's pair-interleaved layout, packed by each thread at the start of
//! its part of a call (a few dozen rows). The accumulators so hold `yᵀ`, transposed as they
//! are stored. Two weight tiles by two tiles of `x` make four accumulators: all eight
//! tile registers. The loads of the next
//! step along `k` are issued right after the last product that reads each register, so they
//! overlap the products instead of waiting for all four (single-threaded, from memory: 4.2
//! GB/s of weights with the loads grouped, 5-7 GB/s interleaved). The next 32 weight rows
//! are prefetched meanwhile into L2 (`prefetcht1`), as in `matvec`. Into L1 (`prefetcht0`,
//! this kernel's hint until 2026-12-05) whole bf16 steps were 5-10% slower
//! (`step_profile`, AMX Xeon VM, three interleaved rounds at batches 9-64: batch 32
//! 25.2-26.7 → 23.0-24.5 ms, batch 16 19.6-20.3 → 17.5-18.3); `prefetcht2` was level with
//! `prefetcht1`, and asking only for each 4 KiB page's first lines (the hardware prefetcher
//! doing the rest) level with L1. Output columns are split across libtorch's threads in
//! blocks of 32.
//!
//! Linux grants AMX's 8 KiB of tile state per process on request (`arch_prctl`); where it
//! refuses, or the CPU has no AMX, `gemm` declines and the caller keeps libtorch.

use std::ops::Range;

use tch::{Kind, Tensor};

#[cfg(test)]
use super::Now;
use super::{isa, Isa, Sink};

/// The rows of `x` the kernel takes, measured interleaved with the `gemm` example (a layer's
/// products and the head, bf16) and in whole decode steps (`step_profile`): from 9 rows to 64
/// (1.08x libtorch at 64, 1.64x at 32; 0.99x at 128, where oneDNN's own AMX kernels catch up).
/// At 8 rows the tiles beat `matvec` on weights in cache (1.5-1.8x libtorch against 1.2-1.5x)
/// but not in a decode step, where the weights come from memory and `matvec` streams them
/// better (batch-8 steps were level or slower with AMX). Since each thread packs `x` itself
/// the tiles win whole steps from 5 rows (tenth session, bf16, interleaved: batch 8
/// 19.70-20.43 → 17.77-17.86 ms, batches 5-7 3-7% faster; batch 4 and below slower), but up to
/// 8 rows a row's product must keep its bits whatever the batch (a seeded request samples
/// the same text alone and in a batch of 8), which `matvec`, row by row, gives and the tiles
/// do not.
const ROWS: Range<usize> = 9..65;

/// `x @ w.T` for bf16 `x` `[m, k]` and `w` `[n, k]`, or `None` when AMX is not there or the
/// shape does not fit its tiles (`n` a multiple of 32, `k` of 32) and the caller should use
/// libtorch.
#[cfg(test)]
pub fn gemm(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    gemm_in(x, w, &mut Now)
}

/// `gemm`, its work into `sink`.
pub(super) fn gemm_in<'a>(x: &Tensor, w: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    if w.kind() != Kind::BFloat16 || !available() {
        return None;
    }
    let (m, n, k) = super::product_shape(x, w)?;
    if !ROWS.contains(&m) {
        return None;
    }
    gemm_on(x, w, (m, n, k), sink)
}

/// Whether the kernel may run here: AMX-BF16 in the CPU, the tile state granted by the
/// kernel, and the kernels not turned off (`isa` answers for `TESSERA_NO_KERNELS`; every AMX
/// CPU has AVX-512 BF16, whose stores write the output). `TESSERA_NO_AMX=1` turns off this
/// kernel alone, for comparison.
fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var_os("TESSERA_NO_AMX").is_none()
                && isa(Kind::BFloat16) == Some(Isa::Avx512)
                && tiles::enable()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

fn gemm_on<'a>(
    x: &Tensor,
    w: &Tensor,
    (m, n, k): (usize, usize, usize),
    sink: &mut impl Sink<'a>,
) -> Option<Tensor> {
    if n % 32 != 0 || k % 32 != 0 || !x.is_contiguous() {
        return None;
    }
    let y = Tensor::empty([m as i64, n as i64], (Kind::BFloat16, tch::Device::Cpu));
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let (wp, xp, yp) = (
            w.data_ptr() as usize,
            x.data_ptr() as usize,
            y.data_ptr() as usize,
        );
        let run = move |part: Range<usize>| {
            let mut packed = PACKED.take();
            // SAFETY: `x` `[m, k]`, `w` `[n, k]` and `y` `[m, n]` (bf16, contiguous) are alive
            // until the work has run (the sink keeps them), and `packed` is then `x` padded to
            // whole pairs of tiles; the parts are disjoint ranges of output columns in blocks of
            // 32; `available` checked the CPU and the tile state.
            unsafe {
                pack(xp as *const u32, m, k, &mut packed);
                tiles::columns(
                    wp as *const u16,
                    packed.as_ptr(),
                    yp as *mut u8,
                    (m, n, k),
                    part,
                )
            };
            PACKED.set(packed);
        };
        for t in [w, x, &y] {
            sink.keep(t);
        }
        sink.split(n, 32, true, run);
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    return None;
    Some(y)
}

/// The rows of `x` (bf16, contiguous) as AMX's right operand: for each step of 32 along `k`,
/// tiles of 16 rows of `x`, each tile 16 lines of 16 `u32` that hold elements `2i` and `2i + 1`
/// of the step for the tile's 16 rows. Rows are padded with zeros to a multiple of 32. Each
/// tile is a 16 × 16 transpose of `u32` pairs, done in registers (`tiles::pack`). Every thread
/// of a product packs the whole of `x` for itself, at the start of its part (not timed
/// alone; the step times below include it), where packing once in a region of its own
/// before the product's (split across the threads, or on one while the other waited) cost a
/// second region start and end per product. bf16 steps (`step_profile`, AMX Xeon VM,
/// interleaved): batch 32 faster in four pairs of six (means 28.87 → 28.38 ms), batch 16
/// 22.94 / 23.39 → 21.77 / 22.72 ms.
///
/// # Safety
/// `x` must be a contiguous bf16 `[m, k]` tensor's data (`k` a multiple of 32), and the CPU
/// must have AVX-512F.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn pack(x: *const u32, m: usize, k: usize, packed: &mut Vec<u32>) {
    let blocks = m.div_ceil(32) * 2;
    let pairs = k / 2;
    // Every element of every tile is written (zeros past row `m`), so a longer buffer from an
    // earlier product needs no clearing.
    if packed.len() < blocks * 16 * pairs {
        packed.resize(blocks * 16 * pairs, 0);
    }
    // SAFETY: `x` holds `m × k / 2` pairs of bf16 as `u32`s (the caller's promise), and
    // `packed` every step's tiles.
    unsafe { tiles::pack(x, packed.as_mut_ptr(), (m, pairs), 0..k / 32) }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
thread_local! {
    /// Each thread's packed `x`, kept between products.
    static PACKED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tiles {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::lanes::{transpose16, Avx512, Lanes};

    /// Asks Linux for the AMX tile state (`ARCH_REQ_XCOMP_PERM` for `XFEATURE_XTILEDATA`), once
    /// the CPU says it has AMX-TILE and AMX-BF16.
    pub fn enable() -> bool {
        let leaf = __cpuid_count(7, 0);
        let (tile, bf16) = (leaf.edx & (1 << 24) != 0, leaf.edx & (1 << 22) != 0);
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: the request only changes which register state the process may use.
        tile && bf16
            && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
    }

    /// `ldtilecfg`'s 64-byte operand: palette 1, and every tile 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Stores accumulator `$t` into `$buf` (16 lines of 16 f32).
    macro_rules! store_tile {
        ($t:literal, $buf:expr) => {
            asm!(
                concat!("tilestored [{p} + {s}*1], tmm", $t),
                p = in(reg) $buf,
                s = in(reg) 64usize,
                options(nostack)
            )
        };
    }

    /// `y[m, n] = x[m, k] @ w[n, k].T` for the output columns `part`, from `x` packed by
    /// `pack`. Tiles: 0-3 the accumulators (weight block `a`, row block `b` in tile `2a + b`),
    /// 4-5 the two weight blocks, 6-7 the two row blocks.
    ///
    /// # Safety
    /// `w` `[n, k]` and `y` `[m, n]` (bf16) and `x` (`pack`ed from `[m, k]`) must cover those
    /// shapes, with `n` and `k` multiples of 32; `part` must lie in `0..n` in blocks of 32;
    /// the CPU must have AMX-BF16 and AVX-512 BF16, and the tile state must be granted.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn columns(
        w: *const u16,
        x: *const u32,
        y: *mut u8,
        (m, n, k): (usize, usize, usize),
        part: Range<usize>,
    ) {
        // Each thread loads the configuration: oneDNN's AMX kernels set their own on these
        // same threads between our calls.
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack));
        let stride = k * 2; // bytes between weight rows
        let steps = k / 32;
        let pairs = m.div_ceil(32);
        let step_x = pairs * 2 * 256; // `u32`s between steps along `k` in packed `x`
        let block_bytes = 32 * k * 2; // 32 weight rows
        let mut out = Out([[0.0; 16]; 16]);
        let mut col = part.start;
        while col < part.end {
            let w0 = w.add(col * k);
            let w1 = w0.add(16 * k);
            // The next block's rows, contiguous in `w`, a share at each step of the first pass.
            let next = (col + 32 < part.end).then(|| w0.add(32 * k) as *const i8);
            let per_step = (block_bytes / 64).div_ceil(steps.saturating_sub(1).max(1));
            for pair in 0..pairs {
                let x0 = x.add(pair * 2 * 256);
                asm!(
                    "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                    "tileloadd tmm4, [{w0} + {s}*1]",
                    "tileloadd tmm6, [{x0} + {s64}*1]",
                    "tileloadd tmm7, [{x1} + {s64}*1]",
                    "tileloadd tmm5, [{w1} + {s}*1]",
                    w0 = in(reg) w0, w1 = in(reg) w1, x0 = in(reg) x0, x1 = in(reg) x0.add(256),
                    s = in(reg) stride, s64 = in(reg) 64usize, options(nostack)
                );
                for step in 1..steps {
                    if let (Some(next), 0) = (next, pair) {
                        let lines = (step - 1) * per_step..(step * per_step).min(block_bytes / 64);
                        for line in lines {
                            _mm_prefetch::<_MM_HINT_T1>(next.add(line * 64));
                        }
                    }
                    // This step's four products, each register reloaded for the next step
                    // once its last reader is issued.
                    let xn = x0.add(step * step_x);
                    asm!(
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm4, [{w0} + {s}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tileloadd tmm6, [{x0} + {s64}*1]",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        "tileloadd tmm7, [{x1} + {s64}*1]",
                        "tileloadd tmm5, [{w1} + {s}*1]",
                        w0 = in(reg) w0.add(step * 32), w1 = in(reg) w1.add(step * 32),
                        x0 = in(reg) xn, x1 = in(reg) xn.add(256),
                        s = in(reg) stride, s64 = in(reg) 64usize, options(nostack)
                    );
                }
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack)
                );
                let buf = out.0.as_mut_ptr();
                for tile in 0..4 {
                    match tile {
                        0 => store_tile!("0", buf),
                        1 => store_tile!("1", buf),
                        2 => store_tile!("2", buf),
                        _ => store_tile!("3", buf),
                    }
                    let first_row = pair * 32 + (tile % 2) * 16;
                    let first_col = col + (tile / 2) * 16;
                    out.write(y, n, first_row..m.min(first_row + 16), first_col);
                }
            }
            col += 32;
        }
        asm!("tilerelease", options(nostack));
    }

    /// `pack`'s tiles for the steps `steps`: per step and block of 16 rows, 16 rows of 16
    /// pairs are loaded (zeros past row `m`) and transposed (`transpose16`).
    ///
    /// # Safety
    /// `x` must hold `m × pairs` `u32`s and `packed` every tile of `m.div_ceil(32) * 2` blocks
    /// for `pairs / 16` steps; `steps` must lie in `0..pairs / 16`; the CPU must have
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack(
        x: *const u32,
        packed: *mut u32,
        (m, pairs): (usize, usize),
        steps: Range<usize>,
    ) {
        let blocks = m.div_ceil(32) * 2;
        for step in steps {
            for block in 0..blocks {
                let r: [__m512i; 16] = std::array::from_fn(|i| {
                    let row = block * 16 + i;
                    if row < m {
                        _mm512_loadu_si512(x.add(row * pairs + step * 16) as *const __m512i)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                let tile = packed.add((step * blocks + block) * 256);
                for (column, v) in transpose16(r).into_iter().enumerate() {
                    _mm512_storeu_si512(tile.add(column * 16) as *mut __m512i, v);
                }
            }
        }
    }

    /// One accumulator as stored: line `c` holds output column `c` for 16 rows.
    #[repr(C, align(64))]
    struct Out([[f32; 16]; 16]);

    impl Out {
        /// Writes rows `rows` (at most 16) of the tile into `y` `[_, n]` at columns
        /// `col..col + 16`, rounded to bf16 as libtorch converts: a gather per row.
        #[inline(always)]
        unsafe fn write(&self, y: *mut u8, n: usize, rows: Range<usize>, col: usize) {
            let lines = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(16),
            );
            let base = self.0.as_ptr() as *const f32;
            for (lane, row) in rows.enumerate() {
                let v = _mm512_i32gather_ps::<4>(lines, base.add(lane));
                Avx512::store::<true>(y.add((row * n + col) * 2), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_product, wave};
    use super::*;

    #[test]
    fn matches_libtorch_on_whole_tiles_and_partial_row_blocks() {
        if !available() {
            eprintln!("skipping: no AMX here");
            return;
        }
        // Rows: one short of a tile, one past, whole pairs of tiles, and past one pair; `k`
        // of one step and of many; `n` of one block and of parts split across threads.
        for shape in [
            (9, 32, 32),
            (17, 64, 576),
            (32, 960, 576),
            (33, 96, 1536),
            (64, 3072, 576),
            (64, 64, 64),
        ] {
            check_product(Kind::BFloat16, shape, "amx", |x, w| gemm(x, w));
        }
    }

    /// The transpose against the layout written out element by element.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn packs_pairs_of_x_in_amx_layout() {
        if !available() {
            return;
        }
        for (m, k) in [(9usize, 32usize), (32, 576), (33, 64), (64, 1536)] {
            let x = (Tensor::arange((m * k) as i64, (Kind::Float, tch::Device::Cpu)) * 0.01)
                .view([m as i64, k as i64])
                .to_kind(Kind::BFloat16);
            // A longer buffer full of garbage, as an earlier product may leave: every element
            // of the tiles must still be written.
            let mut packed = vec![0xdead_beef_u32; 50_000];
            // SAFETY: `x` is a contiguous bf16 `[m, k]` tensor and `available` found AVX-512.
            unsafe { pack(x.data_ptr() as *const u32, m, k, &mut packed) };
            let bits = x.view_dtype(Kind::Int16).flatten(0, -1);
            let bits = Vec::<i16>::try_from(&bits).expect("bf16 bits");
            let blocks = m.div_ceil(32) * 2;
            for step in 0..k / 32 {
                for row in 0..blocks * 16 {
                    for pair in 0..16 {
                        let at = (step * blocks + row / 16) * 256 + pair * 16 + row % 16;
                        let want = if row < m {
                            let i = row * k + step * 32 + pair * 2;
                            (bits[i] as u16 as u32) | ((bits[i + 1] as u16 as u32) << 16)
                        } else {
                            0
                        };
                        assert_eq!(
                            packed[at], want,
                            "{m}x{k}: step {step} row {row} pair {pair}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn declines_what_its_tiles_do_not_fit() {
        let x = wave(32 * 64, 0.3).view([32, 64]).to_kind(Kind::BFloat16);
        let w = |n: i64, k: i64| wave(n * k, 0.2).view([n, k]).to_kind(Kind::BFloat16);
        assert!(gemm(&x, &w(48, 64)).is_none(), "48 columns");
        let x_odd = wave(32 * 48, 0.3).view([32, 48]).to_kind(Kind::BFloat16);
        assert!(gemm(&x_odd, &w(64, 48)).is_none(), "k of 48");
        let x8 = wave(8 * 64, 0.3).view([8, 64]).to_kind(Kind::BFloat16);
        assert!(gemm(&x8, &w(64, 64)).is_none(), "8 rows are matvec's");
        let x65 = wave(65 * 64, 0.3).view([65, 64]).to_kind(Kind::BFloat16);
        assert!(gemm(&x65, &w(64, 64)).is_none(), "65 rows are oneDNN's");
        let xf = x.to_kind(Kind::Float);
        assert!(gemm(&xf, &w(64, 64).to_kind(Kind::Float)).is_none(), "f32");
    }
}
