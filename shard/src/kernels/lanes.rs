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
    unsafe fn sum(v: Self::V) -> f32;
    /// The totals of four vectors, in order.
    #[inline(always)]
    unsafe fn sum4(v: [Self::V; 4]) -> [f32; 4] {
        [
            Self::sum(v[0]),
            Self::sum(v[1]),
            Self::sum(v[2]),
            Self::sum(v[3]),
        ]
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
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
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
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
    #[inline(always)]
    unsafe fn sum4([a, b, c, d]: [__m256; 4]) -> [f32; 4] {
        let s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        let mut out = [0.0; 4];
        _mm_storeu_ps(
            out.as_mut_ptr(),
            _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)),
        );
        out
    }
}
