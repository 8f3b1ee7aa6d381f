//! CPU kernels for the decode step, where libtorch's general kernels lose to a plain stream.
//!
//! A decode step at small batch reads every weight once and a little KV cache per sequence: it can
//! only be as fast as memory. libtorch's CPU kernels reach about half of the machine's read
//! bandwidth on these shapes and pay fixed costs per op that dominate tiny tensors, so the two hot
//! spots are hand-written here: `matvec` (weights times a few rows) and `attention` (one query
//! token per sequence against its paged context). Each is built for AVX-512 (with AVX-512 BF16 for
//! bf16) and for AVX2 + FMA, the many CPUs without AVX-512 (Zen 2 and 3, most client Intel), and
//! runs its parts on libtorch's own threads (`threads`). A decode step of a few dozen sequences is
//! bound by FMAs instead, and there `gemm` beats MKL (f32: it packs the weights on every call)
//! and oneDNN (bf16, with AVX-512 BF16's pair dot products), `outer` beats `gemm` (f32 from 17
//! rows on AVX-512: sums of outer products, no horizontal sums), and `amx` (bf16 on Xeons with
//! AMX tiles) beats oneDNN too. The small ops between the products (RMSNorm with the residual
//! add before it, RoPE with the KV cache write, SiLU × up) are single loops too (`norm`,
//! `rope`, `activation`): at a few rows their cost is libtorch's per-op overhead, which
//! between two weight streams was 10-20 µs an op on the AMX Xeon VM (our reading, not proven: the
//! stream evicts libtorch's code and metadata from the caches). So is the greedy token choice
//! (`choice`): each row's argmax and its log-probability, the logits read from memory once. The
//! row-wise kernels (`norm`, `rope`, `activation`) take prompt rows too: a row's result does not
//! depend on the other rows, and in a prefill each saves libtorch several passes over the
//! activations (a bf16 prefill of 32 × 128 tokens: see docs/benchmarks.md); a prompt's keys
//! and values go into the pool by a row copy on both threads (`store`). Every
//! caller falls back to libtorch when no kernel applies. `TESSERA_NO_KERNELS=1` turns them off, for
//! comparison. The decode kernels take a `Sink` for their work: `Now` runs it at once, a `Plan`
//! records it, so that a whole decode step can run in one parallel region (`plan`,
//! `model::decode_plan`).

mod activation;
mod amx;
pub mod attention;
mod choice;
mod contexts;
mod element;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod matvec;
mod norm;
mod outer;
mod plan;
mod rope;
mod store;
pub mod threads;

pub use activation::{silu_mul, silu_mul_in};
pub use attention::{decode_attention, decode_attention_in};
pub use choice::greedy;
pub use contexts::Contexts;
pub use element::{add_bias_in, widen_in};
pub use norm::{add_rms_norm, add_rms_norm_in, rms_norm, rms_norm_in};
pub use plan::{Now, Plan, Sink};
pub use rope::{rope, rope_store, rope_store_in};
pub use store::{distinct, gather_rows, store_rows};

use matvec::MAX_ROWS;

/// `x @ w.T` for the rows of a decode step: the streaming kernel for a few rows; for a few
/// dozen, AMX tiles where the CPU has them (bf16, 9-64 rows), outer products on AVX-512 (f32,
/// 17-48 rows), else the GEMM; or `None` where none applies and the caller should use
/// libtorch.
pub fn decode_product(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    decode_product_in(x, w, &mut Now)
}

/// `decode_product`, its work into `sink`.
pub fn decode_product_in<'a>(x: &Tensor, w: &Tensor, sink: &mut impl Sink<'a>) -> Option<Tensor> {
    let rows = usize::try_from(x.size().first().copied()?).ok()?;
    if rows <= MAX_ROWS {
        matvec::matvec_in(x, w, sink)
    } else {
        amx::gemm_in(x, w, sink)
            .or_else(|| outer::gemm_in(x, w, sink))
            .or_else(|| gemm::gemm_in(x, w, sink))
    }
}

use tch::{Kind, Tensor};

/// `(m, n, k)` for `x @ w.T` with `x` `[m, k]` and `w` `[n, k]` when both are CPU tensors of
/// one dtype the product kernels take (f32, bf16) and `w` is contiguous; `None` otherwise.
fn product_shape(x: &Tensor, w: &Tensor) -> Option<(usize, usize, usize)> {
    let kind = w.kind();
    let (m, k) = x.size2().ok()?;
    let (n, k2) = w.size2().ok()?;
    let fits = x.device() == tch::Device::Cpu
        && w.device() == tch::Device::Cpu
        && x.kind() == kind
        && matches!(kind, Kind::Float | Kind::BFloat16)
        && k == k2
        && w.is_contiguous();
    fits.then_some((m as usize, n as usize, k as usize))
}

/// Writes a product kernel's f32 result into element `i` of its output: f32, or bf16
/// (`BF16`) rounded to nearest even as libtorch converts. Writing the weights' dtype directly
/// saves a conversion op per product (four per layer) on the decode step.
///
/// # Safety
/// `y` must hold at least `i + 1` elements of that type.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn put<const BF16: bool>(y: *mut u8, i: usize, v: f32) {
    if BF16 {
        *(y as *mut u16).add(i) = half::bf16::from_f32(v).to_bits();
    } else {
        *(y as *mut f32).add(i) = v;
    }
}

/// `put` for four consecutive outputs from `i`, from the lanes of `v`: one store instead of
/// four scalar conversions, which at the end of a GEMM tile cost as much as a third of its
/// products (docs/benchmarks.md).
///
/// # Safety
/// `y` must hold at least `i + 4` elements of that type.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn put4<const BF16: bool>(y: *mut u8, i: usize, v: std::arch::x86_64::__m128) {
    use std::arch::x86_64::*;
    if BF16 {
        // Round to nearest even on the bits, as `put`; a NaN keeps a set mantissa bit.
        let bits = _mm_castps_si128(v);
        let lsb = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
        let rounded = _mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7fff)), lsb);
        let nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
        let quiet = _mm_or_si128(bits, _mm_set1_epi32(0x0040_0000));
        let high = _mm_srli_epi32(_mm_blendv_epi8(rounded, quiet, nan), 16);
        // Four 16-bit values in the low 8 bytes (the high halves are zero, so no saturation).
        let packed = _mm_packus_epi32(high, high);
        _mm_storel_epi64((y as *mut u16).add(i) as *mut __m128i, packed);
    } else {
        _mm_storeu_ps((y as *mut f32).add(i), v);
    }
}

/// The instruction sets a kernel can be built on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    /// AVX2 and FMA: half the vector width, and bf16 widened to f32 by shifts.
    Avx2,
}

/// The best kernel instruction set for `kind` on this CPU, or `None` (libtorch only).
pub(crate) fn isa(kind: Kind) -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F32: OnceLock<Option<Isa>> = OnceLock::new();
        static BF16: OnceLock<Option<Isa>> = OnceLock::new();
        let f32_isa = *F32.get_or_init(|| {
            if std::env::var_os("TESSERA_NO_KERNELS").is_some() {
                None
            } else if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                Some(Isa::Avx512)
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Some(Isa::Avx2)
            } else {
                None
            }
        });
        match kind {
            Kind::Float => f32_isa,
            Kind::BFloat16 => *BF16.get_or_init(|| match f32_isa {
                Some(Isa::Avx512) if is_x86_feature_detected!("avx512bf16") => Some(Isa::Avx512),
                // bf16 is widened to f32 on AVX2, which any AVX-512 CPU also has.
                Some(_) => Some(Isa::Avx2),
                None => None,
            }),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        None
    }
}

/// Asks for the cache lines of `bytes` from `p` into L2 (a hint: it cannot fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch(p: *const u8, bytes: usize) {
    let mut line = 0;
    while line < bytes {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
            p.wrapping_add(line) as *const i8
        );
        line += 64;
    }
}

/// What the product kernels' tests share: deterministic inputs (torch's global RNG belongs to
/// the watermark test) and the comparison with libtorch's f32 product.
#[cfg(test)]
pub(crate) mod testing {
    use tch::{Kind, Tensor};

    pub fn wave(len: i64, step: f64) -> Tensor {
        (Tensor::arange(len, (Kind::Float, tch::Device::Cpu)) * step).sin()
    }

    /// Checks `product(x, w)` against `x @ w.T` for `x` `[m, k]` and `w` `[n, k]` in `kind`,
    /// relative to the largest output: 1e-5 in f32, 1e-2 in bf16.
    pub fn check_product(
        kind: Kind,
        (m, n, k): (i64, i64, i64),
        what: &str,
        product: impl Fn(&Tensor, &Tensor) -> Option<Tensor>,
    ) {
        let x = wave(m * k, 0.37).view([m, k]).to_kind(kind);
        let w = wave(n * k, 0.11).view([n, k]).to_kind(kind);
        let want = x.to_kind(Kind::Float).matmul(&w.to_kind(Kind::Float).tr());
        let got = product(&x, &w).expect("kernel");
        assert_eq!(
            got.kind(),
            kind,
            "{what}: the output takes the weights' dtype"
        );
        let got = got.to_kind(Kind::Float);
        let err = (got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1.0);
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
        assert!(
            err / scale < tol,
            "{what} {kind:?} {m}x{n}x{k}: error {err} (scale {scale})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose bf16 rounding is easy to get wrong.
    #[cfg(target_arch = "x86_64")]
    const AWKWARD: [f32; 14] = [
        0.0,
        -0.0,
        1.0,
        // Exact ties between two bf16 values: one rounds down to even, one up.
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f80_8001),
        -12.345_678,
        1e-40,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        // A signalling NaN.
        f32::from_bits(0x7f80_0001),
    ];

    /// The row-wise kernels take prompt rows as well as decode rows because a row's result
    /// does not depend on the rows around it: a prompt must get the same bits computed whole,
    /// in chunks or after a cached prefix. Each part here is a few rows taken alone (one, a
    /// few, and a thread split's worth) against the same rows of the whole batch.
    #[test]
    fn row_wise_kernels_give_a_row_the_same_bits_in_any_batch() {
        use super::element::{kernels_on, testing::wave};
        let (rows, n, heads, d) = (40i64, 576i64, 9i64, 64i64);
        let parts = [(0i64, 1i64), (7, 3), (13, 27)];
        let same = |whole: &Tensor, part: &Tensor, start: i64, len: i64, what: &str| {
            let whole = whole.narrow(0, start, len).to_kind(Kind::Float);
            assert!(
                whole.equal(&part.to_kind(Kind::Float)),
                "{what}: rows {start}..{} differ from the same rows in the whole batch",
                start + len
            );
        };
        for kind in [Kind::Float, Kind::BFloat16] {
            if !kernels_on(kind) {
                continue;
            }
            let x = wave(&[rows, n], 0.37).to_kind(kind);
            let a = wave(&[rows, n], 0.23).to_kind(kind);
            let weight = wave(&[n], 0.11).to_kind(kind);
            let gu = wave(&[rows, 2 * n], 0.07).to_kind(kind);
            let q = wave(&[rows, heads, d], 0.19).to_kind(kind);
            let (cos, sin) = (
                wave(&[rows, 1, d], 0.05).to_kind(kind),
                wave(&[rows, 1, d], 0.09).to_kind(kind),
            );
            for unit_offset in [false, true] {
                let whole = rms_norm(&x, &weight, 1e-5, unit_offset).expect("rms_norm");
                let sum = x.copy();
                // SAFETY: `sum` is a fresh copy that nothing else holds.
                let added = unsafe { add_rms_norm(&sum, &a, &weight, 1e-5, unit_offset) }
                    .expect("add_rms_norm");
                for (start, len) in parts {
                    let rows_of = |t: &Tensor| t.narrow(0, start, len).copy();
                    let part = rms_norm(&rows_of(&x), &weight, 1e-5, unit_offset).expect("part");
                    same(&whole, &part, start, len, &format!("rms_norm {kind:?}"));
                    let part_sum = rows_of(&x);
                    // SAFETY: as above.
                    let part = unsafe {
                        add_rms_norm(&part_sum, &rows_of(&a), &weight, 1e-5, unit_offset)
                    }
                    .expect("part");
                    same(&added, &part, start, len, &format!("add_rms_norm {kind:?}"));
                    same(
                        &sum,
                        &part_sum,
                        start,
                        len,
                        &format!("add_rms_norm's sum {kind:?}"),
                    );
                }
            }
            let act = silu_mul(&gu).expect("silu_mul");
            let rot = rope(&q, &cos, &sin).expect("rope");
            for (start, len) in parts {
                let rows_of = |t: &Tensor| t.narrow(0, start, len).copy();
                let part = silu_mul(&rows_of(&gu)).expect("part");
                same(&act, &part, start, len, &format!("silu_mul {kind:?}"));
                let part = rope(&rows_of(&q), &rows_of(&cos), &rows_of(&sin)).expect("part");
                same(&rot, &part, start, len, &format!("rope {kind:?}"));
            }
        }
    }

    /// `put` rounds as libtorch converts f32 to bf16: to nearest, ties to even, NaN kept.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn put_rounds_bf16_as_libtorch() {
        let values = AWKWARD.to_vec();
        let want = Tensor::from_slice(&values)
            .to_kind(Kind::BFloat16)
            .view_dtype(Kind::Int16);
        let want = Vec::<i16>::try_from(&want).expect("bf16 bits");
        let mut got = vec![0u16; values.len()];
        for (i, &v) in values.iter().enumerate() {
            // SAFETY: `got` holds `values.len()` bf16 slots.
            unsafe { put::<true>(got.as_mut_ptr() as *mut u8, i, v) };
        }
        for ((v, w), g) in values.iter().zip(&want).zip(&got) {
            if v.is_nan() {
                assert!(half::bf16::from_bits(*g).is_nan(), "NaN stays NaN");
            } else {
                assert_eq!(*g, *w as u16, "{v:e}: libtorch {w:#06x}, put {g:#06x}");
            }
        }
    }

    /// `put4` writes what `put` writes, bit for bit (ties, NaN, infinities, subnormals), in
    /// both dtypes, and nothing past its four elements.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn put4_writes_what_put_writes() {
        use std::arch::x86_64::_mm_loadu_ps;
        // Padded to whole fours with a value of its own.
        let mut values = AWKWARD.to_vec();
        values.resize(AWKWARD.len().next_multiple_of(4), 3.0);
        for chunk in values.chunks(4) {
            let (mut one, mut four) = ([0u16; 6], [0u16; 6]);
            let (mut one32, mut four32) = ([0f32; 6], [0f32; 6]);
            // SAFETY: each buffer holds 6 elements, written at 1..5; `chunk` holds 4 f32.
            unsafe {
                let v = _mm_loadu_ps(chunk.as_ptr());
                put4::<true>(four.as_mut_ptr() as *mut u8, 1, v);
                put4::<false>(four32.as_mut_ptr() as *mut u8, 1, v);
                for (i, &x) in chunk.iter().enumerate() {
                    put::<true>(one.as_mut_ptr() as *mut u8, 1 + i, x);
                    put::<false>(one32.as_mut_ptr() as *mut u8, 1 + i, x);
                }
            }
            assert_eq!(four, one, "bf16 of {chunk:?}");
            let bits = |a: [f32; 6]| a.map(f32::to_bits);
            assert_eq!(bits(four32), bits(one32), "f32 of {chunk:?}");
        }
    }
}
