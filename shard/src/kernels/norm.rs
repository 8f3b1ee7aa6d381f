//! RMSNorm, alone or fused with the residual add before it: one pass instead of several libtorch
//! ops, for decode and prompt rows alike.
//!
//! At one token per sequence these tensors hold a few hundred numbers, and libtorch's cost is
//! the ops themselves: `rms_norm` is a composite of about eight ops and takes 27 µs on a
//! 576-wide row on the Zen 3 VM. Plain loops do the same arithmetic in a few microseconds
//! (with RoPE, `rope`: a batch-1 step of SmolLM2 went from 38.8 to 35.4 ms, interleaved runs
//! of the `step_profile` example). The roundings are libtorch's: f32 arithmetic, and in bf16
//! a rounding (to nearest even) after every op that libtorch runs in bf16.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::element::{kernels_on, Bf16, Element};
use super::{Now, Sink};

/// `x` (`[rows, n]`) RMS-normalised with `weight` (`[n]`), or `None` where the kernel does not
/// apply. Llama's order: `weight * (x * rsqrt(mean(x²) + eps))`, the normalised row cast to the
/// dtype before the product; with `unit_offset` (Gemma) `x * rsqrt(..) * (1 + weight)` in f32,
/// cast at the end.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, unit_offset: bool) -> Option<Tensor> {
    rms_norm_in(x, weight, eps, unit_offset, &mut Now)
}

/// `rms_norm`, its work into `sink`.
pub fn rms_norm_in<'a>(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    unit_offset: bool,
    sink: &mut impl Sink<'a>,
) -> Option<Tensor> {
    let kind = x.kind();
    let (rows, n) = x.size2().ok()?;
    let y = rms_norm_output(x, weight)?;
    let (rows, n) = (rows as usize, n as usize);
    let eps = eps as f32;
    // SAFETY: `x`, `y` (`[rows, n]`) and `weight` (`[n]`) are contiguous CPU tensors of
    // `kind`, which is the element type each call reads; `y` is new, so nothing aliases it.
    unsafe {
        match kind {
            Kind::Float => rms_rows::<f32>([x, weight, &y], (rows, n), eps, unit_offset, sink),
            Kind::BFloat16 => rms_rows::<Bf16>([x, weight, &y], (rows, n), eps, unit_offset, sink),
            _ => return None,
        }
    }
    Some(y)
}

/// The output of normalising `x` (`[rows, n]`) with `weight` (`[n]`), or `None` where the
/// kernels do not take them.
fn rms_norm_output(x: &Tensor, weight: &Tensor) -> Option<Tensor> {
    let kind = x.kind();
    let (rows, n) = x.size2().ok()?;
    let fits = kernels_on(kind)
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && weight.kind() == kind
        && weight.size() == [n]
        && x.is_contiguous()
        && weight.is_contiguous()
        && n > 0;
    fits.then(|| Tensor::empty([rows, n], (kind, Device::Cpu)))
}

/// # Safety
/// The tensors must be contiguous CPU tensors of `E`'s dtype and the shapes given.
unsafe fn rms_rows<'a, E: Element>(
    [x, weight, y]: [&Tensor; 3],
    (rows, n): (usize, usize),
    eps: f32,
    unit_offset: bool,
    sink: &mut impl Sink<'a>,
) {
    for t in [x, weight, y] {
        sink.keep(t);
    }
    let (xp, wp, yp) = (
        x.data_ptr() as usize,
        weight.data_ptr() as usize,
        y.data_ptr() as usize,
    );
    let run = move |part: Range<usize>| {
        // SAFETY: as the caller promised; the parts are disjoint ranges of rows, and `y` is alive
        // and written by nothing else until the work has run (the sink keeps them).
        let (x, w, y) = unsafe {
            (
                std::slice::from_raw_parts((xp as *const E).add(part.start * n), part.len() * n),
                std::slice::from_raw_parts(wp as *const E, n),
                std::slice::from_raw_parts_mut((yp as *mut E).add(part.start * n), part.len() * n),
            )
        };
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            rms_row(xr, w, yr, eps, unit_offset);
        }
    };
    sink.split(rows, 1, rows * n >= SPLIT_ELEMENTS, run);
}

/// From how many elements the rows are split across libtorch's threads: at batch 32 a
/// 576-wide norm took 22 µs on one thread of the AMX Xeon VM while the other waited (18,432
/// elements); waking the other costs a few µs. Batch 8 (4,608) stays on one.
pub(super) const SPLIT_ELEMENTS: usize = 1 << 13;

/// One row `x` normalised into `y` (see `rms_norm`).
#[inline]
fn rms_row<E: Element>(x: &[E], w: &[E], y: &mut [E], eps: f32, unit_offset: bool) {
    // Eight partial sums, so that the compiler can keep them in one vector.
    let mut part = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (p, v) in part.iter_mut().zip(c) {
            *p += v.get() * v.get();
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v.get() * v.get()).sum();
    let r = 1.0 / ((part.iter().sum::<f32>() + tail) / x.len() as f32 + eps).sqrt();
    for ((yv, xv), wv) in y.iter_mut().zip(x).zip(w) {
        let h = xv.get() * r;
        *yv = if unit_offset {
            E::put(h * (1.0 + wv.get()))
        } else {
            E::put(wv.get() * E::round(h))
        };
    }
}

/// The residual add and the next norm in one pass: `x += a` in place (rounded to the dtype,
/// as libtorch's `add` rounds), then `rms_norm(x)` as a new tensor. Between two weight
/// streams the separate `add` cost about 15 µs a layer on the AMX Xeon VM, against 2.5 µs
/// in a tight loop. `None` where the kernel does not apply (nothing is written then).
///
/// # Safety
/// `x` is written through its data pointer: the caller must hold it exclusively (no other
/// tensor may share its storage), and `a` must not share it either.
pub unsafe fn add_rms_norm(
    x: &Tensor,
    a: &Tensor,
    weight: &Tensor,
    eps: f64,
    unit_offset: bool,
) -> Option<Tensor> {
    add_rms_norm_in(x, a, weight, eps, unit_offset, &mut Now)
}

/// `add_rms_norm`, its work into `sink`.
///
/// # Safety
/// As `add_rms_norm`, until the work has run.
pub unsafe fn add_rms_norm_in<'a>(
    x: &Tensor,
    a: &Tensor,
    weight: &Tensor,
    eps: f64,
    unit_offset: bool,
    sink: &mut impl Sink<'a>,
) -> Option<Tensor> {
    let kind = x.kind();
    let (rows, n) = x.size2().ok()?;
    if a.size() != [rows, n] || a.kind() != kind || a.device() != Device::Cpu || !a.is_contiguous()
    {
        return None;
    }
    let y = rms_norm_output(x, weight)?;
    let (rows, n, eps) = (rows as usize, n as usize, eps as f32);
    match kind {
        Kind::Float => add_rms_rows::<f32>([x, a, weight, &y], (rows, n), eps, unit_offset, sink),
        Kind::BFloat16 => {
            add_rms_rows::<Bf16>([x, a, weight, &y], (rows, n), eps, unit_offset, sink)
        }
        _ => return None,
    }
    Some(y)
}

/// # Safety
/// As `add_rms_norm` checks and requires.
unsafe fn add_rms_rows<'a, E: Element>(
    [x, a, weight, y]: [&Tensor; 4],
    (rows, n): (usize, usize),
    eps: f32,
    unit_offset: bool,
    sink: &mut impl Sink<'a>,
) {
    for t in [x, a, weight, y] {
        sink.keep(t);
    }
    let (xp, ap, wp, yp) = (
        x.data_ptr() as usize,
        a.data_ptr() as usize,
        weight.data_ptr() as usize,
        y.data_ptr() as usize,
    );
    let run = move |part: Range<usize>| {
        let (start, len) = (part.start * n, part.len() * n);
        // SAFETY: as the caller promised (`x` held exclusively, `a` and `weight` apart from
        // it, `y` new); the parts are disjoint ranges of rows of `x` and `y`.
        let (x, a, w, y) = unsafe {
            (
                std::slice::from_raw_parts_mut((xp as *mut E).add(start), len),
                std::slice::from_raw_parts((ap as *const E).add(start), len),
                std::slice::from_raw_parts(wp as *const E, n),
                std::slice::from_raw_parts_mut((yp as *mut E).add(start), len),
            )
        };
        for ((xr, ar), yr) in x
            .chunks_exact_mut(n)
            .zip(a.chunks_exact(n))
            .zip(y.chunks_exact_mut(n))
        {
            for (xv, av) in xr.iter_mut().zip(ar) {
                *xv = E::put(xv.get() + av.get());
            }
            rms_row(xr, w, yr, eps, unit_offset);
        }
    };
    sink.split(rows, 1, rows * n >= SPLIT_ELEMENTS, run);
}

#[cfg(test)]
mod tests {
    use super::super::element::testing::{assert_same, wave};
    use super::*;

    #[test]
    fn rms_norm_matches_libtorch_and_gemma_order() {
        for kind in [Kind::Float, Kind::BFloat16] {
            // 33 × 576 is split across threads (`SPLIT_ELEMENTS`), unevenly.
            for (rows, n) in [(1, 576), (3, 17), (8, 64), (33, 576)] {
                let x = wave(&[rows, n], 0.37).to_kind(kind);
                let w = wave(&[n], 0.11).to_kind(kind);
                // transformers' LlamaRMSNorm, op by op.
                let h = x.to_kind(Kind::Float);
                let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
                let want = &w * (&h * (&var + 1e-5).rsqrt()).to_kind(kind);
                let got = rms_norm(&x, &w, 1e-5, false).expect("kernel");
                assert_same(&got, &want, &format!("{kind:?} {rows}x{n}"));
                let want =
                    (h * (var + 1e-5).rsqrt() * (w.to_kind(Kind::Float) + 1.0)).to_kind(kind);
                let got = rms_norm(&x, &w, 1e-5, true).expect("kernel");
                assert_same(&got, &want, &format!("{kind:?} {rows}x{n} unit offset"));
            }
        }
    }

    #[test]
    fn add_rms_norm_is_add_then_rms_norm() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (unit_offset, rows) in [(false, 3), (true, 3), (false, 33), (true, 33)] {
                let n = 576;
                let x0 = wave(&[rows, n], 0.37).to_kind(kind);
                let a = wave(&[rows, n], 0.23).to_kind(kind);
                let w = wave(&[n], 0.11).to_kind(kind);
                let sum = &x0 + &a;
                let want = rms_norm(&sum, &w, 1e-5, unit_offset).expect("kernel");
                let x = x0.copy();
                // SAFETY: `x` is this test's own copy.
                let got = unsafe { add_rms_norm(&x, &a, &w, 1e-5, unit_offset) }.expect("kernel");
                assert!(x.equal(&sum), "{kind:?}: x += a rounds as libtorch's add");
                assert!(
                    got.equal(&want),
                    "{kind:?} {unit_offset}: the norm of the sum"
                );
                let x = x0.copy();
                // SAFETY: as above.
                let refused = unsafe { add_rms_norm(&x, &a.narrow(1, 0, 8), &w, 1e-5, false) };
                assert!(
                    refused.is_none() && x.equal(&x0),
                    "a mismatched shape writes nothing"
                );
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let x = wave(&[2, 8], 0.3);
        assert!(
            rms_norm(&x, &wave(&[7], 0.1), 1e-5, false).is_none(),
            "width"
        );
        assert!(
            rms_norm(&x.tr(), &wave(&[2], 0.1), 1e-5, false).is_none(),
            "strided"
        );
    }
}
