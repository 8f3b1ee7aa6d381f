//! Matrix-vector products for decode steps (1 to 8 rows against a weight matrix).
//!
//! A decode step at small batch is a stream over every weight: it can only be as fast as
//! memory. libtorch's CPU kernels reach about half of the machine's read bandwidth on these
//! shapes (11-17 GB/s against 32 GB/s on the development VM, docs/benchmarks.md), while one
//! core streaming rows with AVX-512 reaches close to all of it. So rows of `x` are multiplied
//! here, on the calling thread, whenever the CPU has AVX-512 (and AVX-512 BF16 for bf16
//! weights); everything else goes to libtorch. Each weight row is read once for all rows of
//! `x`, with two accumulators per row to hide FMA latency; the row count is a const generic so
//! the accumulators stay in registers. Past 8 rows the work is compute-bound and libtorch's
//! blocked GEMM is the better tool.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use tch::{Kind, Tensor};

use super::supported;

/// The most rows of `x` the kernels take (their accumulators live in registers).
pub const MAX_ROWS: usize = 8;

/// `x @ w.T` for `x` `[m, k]` and `w` `[n, k]` (both CPU, same dtype, `m <= MAX_ROWS`), or
/// `None` when no kernel applies and the caller should use libtorch.
pub fn matvec(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    let kind = w.kind();
    let (m, k) = x.size2().ok()?;
    let (n, k2) = w.size2().ok()?;
    if x.device() != tch::Device::Cpu
        || x.kind() != kind
        || k != k2
        || m < 1
        || m as usize > MAX_ROWS
        || !w.is_contiguous()
        || !supported(kind)
    {
        return None;
    }
    let x = x.contiguous();
    let y = Tensor::empty([m, n], (Kind::Float, tch::Device::Cpu));
    let (m, n, k) = (m as usize, n as usize, k as usize);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: all three tensors are contiguous CPU tensors of the shapes checked above, of the
    // element types read here (f32, or bf16 as u16), and `supported` checked the CPU features.
    unsafe {
        let yp = y.data_ptr() as *mut f32;
        let (wp, xp) = (w.data_ptr(), x.data_ptr());
        macro_rules! run {
            ($($rows:literal)*) => {
                match (kind, m) {
                    $((Kind::Float, $rows) => matvec_f32::<$rows>(wp as *const f32, xp as *const f32, yp, n, k),)*
                    $((_, $rows) => matvec_bf16::<$rows>(wp as *const u16, xp as *const u16, yp, n, k),)*
                    _ => unreachable!("row count checked above"),
                }
            };
        }
        run!(1 2 3 4 5 6 7 8);
    }
    Some(if kind == Kind::Float {
        y
    } else {
        y.to_kind(kind)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn matvec_f32<const M: usize>(
    w: *const f32,
    x: *const f32,
    y: *mut f32,
    n: usize,
    k: usize,
) {
    let full = k / 32 * 32;
    let rest = k - full;
    for row in 0..n {
        let wr = w.add(row * k);
        let mut acc0 = [_mm512_setzero_ps(); M];
        let mut acc1 = [_mm512_setzero_ps(); M];
        let mut i = 0;
        while i < full {
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
            *y.add(j * n + row) = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn matvec_bf16<const M: usize>(
    w: *const u16,
    x: *const u16,
    y: *mut f32,
    n: usize,
    k: usize,
) {
    // `vdpbf16ps` multiplies 32 bf16 pairs and adds each adjacent pair's products into 16
    // f32 lanes, so 64 weights per iteration with two accumulators.
    let load =
        |p: *const u16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p as *const _)) };
    let full = k / 64 * 64;
    for row in 0..n {
        let wr = w.add(row * k);
        let mut acc0 = [_mm512_setzero_ps(); M];
        let mut acc1 = [_mm512_setzero_ps(); M];
        let mut i = 0;
        while i < full {
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
            *y.add(j * n + row) = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(len: i64, step: f64) -> Tensor {
        (Tensor::arange(len, (Kind::Float, tch::Device::Cpu)) * step).sin()
    }

    #[test]
    fn matches_libtorch_for_every_row_count_and_odd_widths() {
        for kind in [Kind::Float, Kind::BFloat16] {
            if !supported(kind) {
                eprintln!("skipping {kind:?}: no kernel for this CPU");
                continue;
            }
            for (m, n, k) in [
                (1, 7, 576),
                (2, 33, 100),
                (3, 5, 17),
                (4, 64, 1536),
                (1, 3, 1),
                (8, 9, 200),
                (6, 2, 64),
            ] {
                // Deterministic values (torch's global RNG belongs to the watermark test).
                let x = wave(m * k, 0.37).view([m, k]).to_kind(kind);
                let w = wave(n * k, 0.11).view([n, k]).to_kind(kind);
                let want = x.to_kind(Kind::Float).matmul(&w.to_kind(Kind::Float).tr());
                let got = matvec(&x, &w).expect("kernel").to_kind(Kind::Float);
                let err = (got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]).max(1.0);
                let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
                assert!(
                    err / scale < tol,
                    "{kind:?} {m}x{n}x{k}: error {err} (scale {scale})"
                );
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
