//! The gated MLP's `silu(gate) * up`, in one pass over the fused gate/up output, for decode and
//! prompt rows alike.
//!
//! libtorch needs four ops for it (two narrows, `silu`, `mul`), about 12 µs on a batch-1 row of
//! SmolLM2 on the AMX Xeon VM, nearly all of it per-op overhead: the arithmetic is 1,536
//! exponentials. Here it is one loop with a vectorised `exp` (`Lanes::exp`). The roundings are
//! libtorch's: `silu` computes `g / (1 + e^-g)` in f32 and rounds to the dtype, then the
//! product rounds again.

use tch::{Device, Kind, Tensor};

#[cfg(target_arch = "x86_64")]
use super::lanes::{Avx2, Avx512, Lanes};
use super::{isa, Isa, Now, Sink};

/// `silu(gu[:, ..f]) * gu[:, f..]` for `gu` `[rows, 2f]` (gate first, as `Mlp::Gated` fuses
/// them), as a new `[rows, f]` tensor; `None` where no kernel applies.
pub fn silu_mul(gu: &Tensor) -> Option<Tensor> {
    silu_mul_in(gu, &mut Now)
}

/// `silu_mul`, its work into `sink`.
pub fn silu_mul_in<'a>(gu: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    silu_mul_on(isa(gu.kind())?, gu, sink)
}

/// `silu_mul` with a chosen instruction set, which the caller has checked the CPU has.
fn silu_mul_on<'a>(isa: Isa, gu: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    let kind = gu.kind();
    let (rows, width) = gu.size2().ok()?;
    if gu.device() != Device::Cpu
        || !matches!(kind, Kind::Float | Kind::BFloat16)
        || !gu.is_contiguous()
        || width % 2 != 0
    {
        return None;
    }
    let f = width / 2;
    let y = Tensor::empty([rows, f], (kind, Device::Cpu));
    #[cfg(target_arch = "x86_64")]
    {
        let (rows, f) = (rows as usize, f as usize);
        let (src, dst) = (gu.data_ptr() as usize, y.data_ptr() as usize);
        let elt = if kind == Kind::BFloat16 { 2 } else { 4 };
        let run = move |part: std::ops::Range<usize>| {
            let src = (src as *const u8).wrapping_add(part.start * 2 * f * elt);
            let dst = (dst as *mut u8).wrapping_add(part.start * f * elt);
            let rows = part.len();
            // SAFETY: `gu` is a contiguous CPU `[rows, 2f]` tensor and `y` a new `[rows, f]` one,
            // both of `kind`, the element type each call reads, alive until the work has run (the
            // sink keeps them); the parts are disjoint ranges of rows; the caller checked the CPU.
            unsafe {
                match (isa, kind == Kind::BFloat16) {
                    (Isa::Avx512, false) => rows_avx512::<false>(src, dst, rows, f),
                    (Isa::Avx512, true) => rows_avx512::<true>(src, dst, rows, f),
                    (Isa::Avx2, false) => rows_avx2::<false>(src, dst, rows, f),
                    (Isa::Avx2, true) => rows_avx2::<true>(src, dst, rows, f),
                }
            }
        };
        // As the norms: split once a step holds a few thousand elements.
        sink.keep(gu);
        sink.keep(&y);
        sink.split(rows, 1, rows * f >= super::norm::SPLIT_ELEMENTS, run);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        return None;
    }
    Some(y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows_avx512<const BF16: bool>(src: *const u8, dst: *mut u8, rows: usize, f: usize) {
    rows_of::<Avx512, BF16>(src, dst, rows, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const BF16: bool>(src: *const u8, dst: *mut u8, rows: usize, f: usize) {
    rows_of::<Avx2, BF16>(src, dst, rows, f)
}

/// # Safety
/// `src` must hold `rows × 2f` and `dst` `rows × f` elements of the dtype `BF16` names.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_of<L: Lanes, const BF16: bool>(src: *const u8, dst: *mut u8, rows: usize, f: usize) {
    let elt = if BF16 { 2 } else { 4 };
    let full = f / L::WIDTH * L::WIDTH;
    let one = L::splat(1.0);
    let zero = L::zero();
    for row in 0..rows {
        let gate = src.add(row * 2 * f * elt);
        let up = gate.add(f * elt);
        let out = dst.add(row * f * elt);
        let mut i = 0;
        while i < full {
            let g = L::load::<BF16>(gate.add(i * elt));
            let mut h = L::div(g, L::add(one, L::exp(L::sub(zero, g))));
            if BF16 {
                h = L::round_bf16(h);
            }
            L::store::<BF16>(
                out.add(i * elt),
                L::mul(h, L::load::<BF16>(up.add(i * elt))),
            );
            i += L::WIDTH;
        }
        for i in full..f {
            let get = |p: *const u8| {
                if BF16 {
                    f32::from_bits((*(p as *const u16).add(i) as u32) << 16)
                } else {
                    *(p as *const f32).add(i)
                }
            };
            let g = get(gate);
            let mut h = g / (1.0 + (-g).exp());
            if BF16 {
                h = half::bf16::from_f32(h).to_f32();
            }
            super::put::<BF16>(out, i, h * get(up));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libtorch_silu_times_up() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let Some(best) = isa(kind) else {
                eprintln!("skipping {kind:?}: no kernel for this CPU");
                continue;
            };
            for isa in [best, Isa::Avx2] {
                // Widths with and without a scalar tail; gates from -120 to 120, past where
                // e^-g overflows and underflows, and ±inf.
                // 33 rows of 1,536 are split across threads (`SPLIT_ELEMENTS`).
                for (rows, f) in [(1, 1536), (3, 37), (2, 8), (33, 1536)] {
                    let n = rows * 2 * f;
                    let gu = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.731).sin() * 6.0;
                    let _ = gu.narrow(0, 0, 1).fill_(-120.0);
                    let _ = gu.narrow(0, 1, 1).fill_(120.0);
                    let _ = gu.narrow(0, 2, 1).fill_(f64::NEG_INFINITY);
                    let _ = gu.narrow(0, 3, 1).fill_(f64::INFINITY);
                    let gu = gu.view([rows, 2 * f]).to_kind(kind);
                    let want = gu.narrow(1, 0, f).silu() * gu.narrow(1, f, f);
                    let got = silu_mul_on(isa, &gu, &mut Now).expect("kernel");
                    assert_eq!(got.kind(), kind);
                    let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
                    assert!(
                        got.isnan().equal(&want.isnan()),
                        "{isa:?} {kind:?}: NaN where libtorch has NaN"
                    );
                    let big = want.isinf();
                    assert!(
                        got.masked_select(&big).equal(&want.masked_select(&big)),
                        "{isa:?} {kind:?}: the same infinities"
                    );
                    let ok = want.isfinite();
                    let err = (got.masked_select(&ok) - want.masked_select(&ok))
                        .abs()
                        .max()
                        .double_value(&[]);
                    // f32: a few ulp of values up to ~40; bf16: one rounding of the product.
                    let tol = if kind == Kind::Float { 1e-5 } else { 0.25 };
                    assert!(err <= tol, "{isa:?} {kind:?} {rows}x{f}: error {err}");
                    if kind == Kind::BFloat16 {
                        // The tolerance alone would pass a kernel that skips rounding `silu`
                        // to bf16 before the product (libtorch's two roundings; a quarter of
                        // the values differ then). With them, only `exp`'s last ulp can move a
                        // value across a rounding boundary.
                        let same = got
                            .masked_select(&ok)
                            .eq_tensor(&want.masked_select(&ok))
                            .to_kind(Kind::Float)
                            .mean(Kind::Float)
                            .double_value(&[]);
                        assert!(
                            same > 0.99,
                            "{isa:?} {rows}x{f}: {same} bit-equal to libtorch"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let xs: Vec<f32> = (-2000..=1000)
            .map(|i| i as f32 * 0.0887)
            .chain([0.0, -0.0, 1e-30, -103.0, 88.7, 88.73, 200.0, f32::INFINITY])
            .collect();
        for isa in [isa(Kind::Float), Some(Isa::Avx2)].into_iter().flatten() {
            for &x in &xs {
                let want = x.exp();
                // SAFETY: the ISA is this CPU's (or AVX2, which any AVX-512 CPU has).
                let got = unsafe { exp_one(isa, x) };
                let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(
                    ulp <= 2 || (want < 1e-37 && (got - want).abs() < 1e-37),
                    "{isa:?}: exp({x}) = {got}, libm {want}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn exp_one(isa: Isa, x: f32) -> f32 {
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn on512(x: f32) -> f32 {
            let mut out = [0f32; 16];
            Avx512::store::<false>(out.as_mut_ptr() as *mut u8, Avx512::exp(Avx512::splat(x)));
            out[0]
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn on256(x: f32) -> f32 {
            let mut out = [0f32; 8];
            Avx2::store::<false>(out.as_mut_ptr() as *mut u8, Avx2::exp(Avx2::splat(x)));
            out[0]
        }
        match isa {
            Isa::Avx512 => on512(x),
            Isa::Avx2 => on256(x),
        }
    }
}
