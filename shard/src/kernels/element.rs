//! Scalar access to the two element types the f32 and bf16 loops take (`norm`, `rope`), with
//! libtorch's roundings: a bf16 is the top half of an f32, and f32 results are rounded to the
//! nearest bf16, ties to even, as libtorch converts. Also two element-wise jobs of a planned
//! decode step (`plan`): a product's bias added in place (`add_bias_in`, libtorch's `add`
//! with its rounding), and bf16 logits widened to f32 (`widen_in`): libtorch's `to_kind` took
//! about 95 µs for one row of SmolLM2's 49,152 at the end of a bf16 batch-1 step on the AMX
//! Xeon VM, most of it a region of its own.

use tch::Kind;
use tch::{Device, Tensor};

use super::Sink;

/// Whether kernels run for `kind` on this CPU (`TESSERA_NO_KERNELS` turns these off too).
/// These loops need no particular instruction set; they follow the others so that one switch
/// compares Tessera's kernels with libtorch alone.
pub(super) fn kernels_on(kind: Kind) -> bool {
    super::isa(kind).is_some()
}

/// bf16 (the top half of an f32) widened to f32.
#[inline]
pub(super) fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 rounded to the nearest bf16, ties to even, as libtorch converts (NaN stays NaN).
#[inline]
pub(super) fn narrow(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x` (a contiguous CPU bf16 tensor) as a new f32 tensor of its shape, the work into `sink`;
/// `None` where the kernels are off or `x` is not such a tensor. Exact, as every bf16 is an f32.
pub fn widen_in<'a>(x: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    if !kernels_on(Kind::BFloat16)
        || x.kind() != Kind::BFloat16
        || x.device() != Device::Cpu
        || !x.is_contiguous()
    {
        return None;
    }
    let y = Tensor::empty(x.size(), (Kind::Float, Device::Cpu));
    let n = x.numel();
    if n == 0 {
        return Some(y);
    }
    sink.keep(x);
    sink.keep(&y);
    let (src, dst) = (x.data_ptr() as usize, y.data_ptr() as usize);
    let run = move |part: std::ops::Range<usize>| {
        // SAFETY: `x` and `y` hold `n` elements (bf16, f32), kept alive until the work has
        // run; the parts are disjoint ranges of them.
        let (from, to) = unsafe {
            (
                std::slice::from_raw_parts((src as *const u16).add(part.start), part.len()),
                std::slice::from_raw_parts_mut((dst as *mut f32).add(part.start), part.len()),
            )
        };
        for (t, &f) in to.iter_mut().zip(from) {
            *t = widen(f);
        }
    };
    // Parts in whole cache lines of the output; a few thousand elements stay on one thread.
    sink.split(n, 16, n >= 1 << 14, run);
    Some(y)
}

/// `y += bias` in place for `y` `[rows, n]` and `bias` `[n]` (contiguous CPU tensors of one
/// dtype, f32 or bf16), rounded to the dtype as libtorch's `add` rounds, the work into `sink`;
/// `None` where the kernels do not take them (nothing is written then).
///
/// # Safety
/// `y` is written through its data pointer: the caller must hold it exclusively until the
/// work has run (a product's new output), and `bias` must not share its storage.
pub unsafe fn add_bias_in<'a>(y: &Tensor, bias: &Tensor, sink: &mut impl Sink<'a>) -> Option<()> {
    let kind = y.kind();
    let (rows, n) = y.size2().ok()?;
    let fits = kernels_on(kind)
        && matches!(kind, Kind::Float | Kind::BFloat16)
        && [y, bias]
            .iter()
            .all(|t| t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous())
        && bias.size() == [n];
    if !fits {
        return None;
    }
    let (rows, n) = (rows as usize, n as usize);
    if rows * n == 0 {
        return Some(());
    }
    sink.keep(y);
    sink.keep(bias);
    let (yp, bp) = (y.data_ptr() as usize, bias.data_ptr() as usize);
    let bf16 = kind == Kind::BFloat16;
    let run = move |part: std::ops::Range<usize>| {
        // SAFETY: as the caller promised; the parts are disjoint ranges of rows of `y`.
        unsafe {
            if bf16 {
                add_rows::<Bf16>(yp, bp, part, n)
            } else {
                add_rows::<f32>(yp, bp, part, n)
            }
        }
    };
    sink.split(rows, 1, rows * n >= super::norm::SPLIT_ELEMENTS, run);
    Some(())
}

/// # Safety
/// `y` holds `rows.end` rows of `n` elements of `E`, `bias` `n`, and nothing else writes
/// those rows of `y` meanwhile.
unsafe fn add_rows<E: Element>(y: usize, bias: usize, rows: std::ops::Range<usize>, n: usize) {
    let bias = std::slice::from_raw_parts(bias as *const E, n);
    let y = std::slice::from_raw_parts_mut((y as *mut E).add(rows.start * n), rows.len() * n);
    for row in y.chunks_exact_mut(n) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v = E::put(v.get() + b.get());
        }
    }
}

/// Element access for the two dtypes the kernels take.
pub(super) trait Element: Copy {
    /// Whether this is bf16 (the vector loads and stores take it as a const parameter).
    const BF16: bool;
    const KIND: Kind;
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
    /// `x` as this dtype would hold it (a rounding for bf16, nothing for f32).
    fn round(x: f32) -> f32 {
        Self::put(x).get()
    }
}

impl Element for f32 {
    const BF16: bool = false;
    const KIND: Kind = Kind::Float;
    fn get(self) -> f32 {
        self
    }
    fn put(x: f32) -> Self {
        x
    }
}

/// bf16 as its bits.
#[derive(Clone, Copy)]
pub(super) struct Bf16(pub(super) u16);

impl Element for Bf16 {
    const BF16: bool = true;
    const KIND: Kind = Kind::BFloat16;
    fn get(self) -> f32 {
        widen(self.0)
    }
    fn put(x: f32) -> Self {
        Bf16(narrow(x))
    }
}

/// What the element loops' tests share.
#[cfg(test)]
pub(super) mod testing {
    use tch::{Device, Kind, Tensor};

    pub fn wave(shape: &[i64], step: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * step).sin() * 3.0).view(shape)
    }

    pub fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
        let err = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        let tol = if got.kind() == Kind::Float {
            1e-5
        } else {
            2e-2
        };
        assert!(err < tol, "{what}: error {err}");
    }
}
