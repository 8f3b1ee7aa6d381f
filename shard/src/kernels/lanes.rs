//! One vector interface over AVX-512 and AVX2 + FMA, so that each kernel's loop is written
//! once and built for both widths (the many CPUs without AVX-512, Zen 2 and 3 and most client
//! Intel, get the same kernels at half the width).

use std::arch::x86_64::*;

/// The vector operations the kernels need. Elements are f32, or bf16 carried as `u16` when
/// `BF16` (a bf16 is the top half of an f32); lanes are always f32. Every method is
/// `inline(always)` and is only called from a function built with its instruction set.
pub trait Lanes {
    type V: Copy;
    const WIDTH: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load<const BF16: bool>(p: *const u8) -> Self::V;
    /// bf16 rounds to nearest even, as libtorch converts.
    unsafe fn store<const BF16: bool>(p: *mut u8, v: Self::V);
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sum(v: Self::V) -> f32;
    /// The largest lane.
    unsafe fn hmax(v: Self::V) -> f32;
    /// `x` as bf16 would hold it: rounded to nearest even and widened back.
    unsafe fn round_bf16(v: Self::V) -> Self::V;
    /// `2^n × y` for lanes `n` that are whole numbers in -150..=128.
    unsafe fn scale2(y: Self::V, n: Self::V) -> Self::V;
    /// `e^x` within 2 ulp of the true value (libtorch's vectorised `exp`, Sleef's u10, is
    /// within 1): Cody-Waite reduction to `r` in ±ln2/2 and Cephes' degree-6 polynomial.
    /// The input is bounded to -103.97..=89 first: `e^x` rounds to 0 below and overflows to
    /// infinity above, as f32's does. NaN stays NaN.
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        // Bound first, so that NaN (which both return when it is the second operand) stays.
        let x = Self::max(Self::splat(-103.97), x);
        let x = Self::min_(Self::splat(89.0), x);
        let n = Self::nearest(Self::mul(x, Self::splat(std::f32::consts::LOG2_E)));
        // r = x - n ln2, with ln2 in two parts so that n ln2 is exact to f32.
        let r = Self::fmadd(n, Self::splat(-0.693_359_4), x);
        let r = Self::fmadd(n, Self::splat(2.121_944_4e-4), r);
        let mut p = Self::splat(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = Self::fmadd(p, r, Self::splat(c));
        }
        let y = Self::fmadd(Self::mul(p, r), r, Self::add(r, Self::splat(1.0)));
        Self::scale2(y, n)
    }
    unsafe fn min_(a: Self::V, b: Self::V) -> Self::V;
    /// Rounded to the nearest whole number (ties to even).
    unsafe fn nearest(v: Self::V) -> Self::V;
    /// The totals of four vectors, in order, as the lanes of one SSE vector (which the
    /// callers store as they need: four outputs, or four scores).
    unsafe fn sum4v(v: [Self::V; 4]) -> __m128;
    /// The totals of four vectors, in order.
    #[inline(always)]
    unsafe fn sum4(v: [Self::V; 4]) -> [f32; 4] {
        let mut out = [0.0; 4];
        _mm_storeu_ps(out.as_mut_ptr(), Self::sum4v(v));
        out
    }
}

pub struct Avx512;

impl Lanes for Avx512 {
    type V = __m512;
    const WIDTH: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load<const BF16: bool>(p: *const u8) -> __m512 {
        if BF16 {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }
    #[inline(always)]
    unsafe fn store<const BF16: bool>(p: *mut u8, v: __m512) {
        if BF16 {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
            let narrow = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
            _mm256_storeu_si256(p as *mut __m256i, narrow);
        } else {
            _mm512_storeu_ps(p as *mut f32, v)
        }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        _mm512_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn min_(a: __m512, b: __m512) -> __m512 {
        _mm512_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn nearest(v: __m512) -> __m512 {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
    }
    #[inline(always)]
    unsafe fn scale2(y: __m512, n: __m512) -> __m512 {
        _mm512_scalef_ps(y, n)
    }
    #[inline(always)]
    unsafe fn round_bf16(v: __m512) -> __m512 {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
        _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(-65536)))
    }
    #[inline(always)]
    unsafe fn hmax(v: __m512) -> f32 {
        _mm512_reduce_max_ps(v)
    }
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    /// Halves of two vectors folded into one, twice, then AVX2's horizontal adds: 11
    /// instructions for four totals where four `reduce_add`s take about 32.
    #[inline(always)]
    unsafe fn sum4v([a, b, c, d]: [__m512; 4]) -> __m128 {
        // [a's low 256 bits, b's low 256] + [a's high, b's high]: a and b folded to 8 lanes.
        let ab = _mm512_add_ps(
            _mm512_shuffle_f32x4(a, b, 0b01_00_01_00),
            _mm512_shuffle_f32x4(a, b, 0b11_10_11_10),
        );
        let cd = _mm512_add_ps(
            _mm512_shuffle_f32x4(c, d, 0b01_00_01_00),
            _mm512_shuffle_f32x4(c, d, 0b11_10_11_10),
        );
        // The high 256 bits through the f64 view: its extract is AVX-512 F (the f32 one, DQ).
        Avx2::sum4v([
            _mm512_castps512_ps256(ab),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ab), 1)),
            _mm512_castps512_ps256(cd),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(cd), 1)),
        ])
    }
}

pub struct Avx2;

impl Lanes for Avx2 {
    type V = __m256;
    const WIDTH: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load<const BF16: bool>(p: *const u8) -> __m256 {
        if BF16 {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }
    #[inline(always)]
    unsafe fn store<const BF16: bool>(p: *mut u8, v: __m256) {
        if BF16 {
            let bits = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
            let rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
            let high = _mm256_srli_epi32(rounded, 16);
            // packus works within 128-bit halves: the 8 results land in 64-bit blocks 0 and 2.
            let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0b1000);
            _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(packed));
        } else {
            _mm256_storeu_ps(p as *mut f32, v)
        }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        _mm256_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn min_(a: __m256, b: __m256) -> __m256 {
        _mm256_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn nearest(v: __m256) -> __m256 {
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
    }
    /// Two steps, `2^(n/2)` twice, so that both factors are normal f32 even where `2^n` is not
    /// (`n` down to -150, where `y × 2^n` is subnormal or 0).
    #[inline(always)]
    unsafe fn scale2(y: __m256, n: __m256) -> __m256 {
        let n = _mm256_cvtps_epi32(n);
        let a = _mm256_srai_epi32(n, 1);
        let b = _mm256_sub_epi32(n, a);
        let bias = _mm256_set1_epi32(127);
        let pa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
        let pb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
        _mm256_mul_ps(_mm256_mul_ps(y, pa), pb)
    }
    #[inline(always)]
    unsafe fn round_bf16(v: __m256) -> __m256 {
        let bits = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
        _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(-65536)))
    }
    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
    }
    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
    #[inline(always)]
    unsafe fn sum4v([a, b, c, d]: [__m256; 4]) -> __m128 {
        let s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1))
    }
}

/// A 16 × 16 block of 32-bit elements transposed in registers: lane `c` of `r[i]` becomes lane
/// `i` of the result's `c`. Rows 2i and 2i + 1 are interleaved, then pairs of those, and the
/// 128-bit lanes shuffled into place: 64 shuffles. Both packings of `x` use it (`amx`'s bf16
/// pairs, `outer`'s f32 rows). The caller must be built with AVX-512F.
#[inline(always)]
pub unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // `u[4g + e]` holds, in its 128-bit lane `l`, rows 4g..4g + 3 of column 4l + e.
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, e) = (i / 4, i % 4);
        let (a, b) = (t[g * 4 + e / 2], t[g * 4 + 2 + e / 2]);
        if e % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    let mut out = [_mm512_setzero_si512(); 16];
    for e in 0..4 {
        // Lanes 0 and 2, then 1 and 3, of the four row groups' column 4l + e.
        let even = _mm512_shuffle_i32x4::<0x88>(u[e], u[4 + e]);
        let even2 = _mm512_shuffle_i32x4::<0x88>(u[8 + e], u[12 + e]);
        let odd = _mm512_shuffle_i32x4::<0xdd>(u[e], u[4 + e]);
        let odd2 = _mm512_shuffle_i32x4::<0xdd>(u[8 + e], u[12 + e]);
        out[e] = _mm512_shuffle_i32x4::<0x88>(even, even2);
        out[8 + e] = _mm512_shuffle_i32x4::<0xdd>(even, even2);
        out[4 + e] = _mm512_shuffle_i32x4::<0x88>(odd, odd2);
        out[12 + e] = _mm512_shuffle_i32x4::<0xdd>(odd, odd2);
    }
    out
}
