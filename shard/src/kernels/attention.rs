//! Decode attention straight from the paged KV pool: one query token per sequence against its
//! context, read through the slot table without gathering K/V into new tensors.
//!
//! For every sequence and KV head, the query heads of its group score each context key (one
//! dot product of `head_dim` lanes), take a softmax in f32 (with Gemma-style soft-capping and
//! a sliding window when the layer has one), and accumulate the values in f32 registers. The
//! libtorch alternative spends most of its time on the gathers and on per-op overhead, which
//! at one token per sequence is most of the work.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use tch::{Kind, Tensor};

use super::supported;

/// Shape and score shaping of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct DecodeShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// The most `head_dim / 16` accumulators the value sum keeps in registers.
const MAX_CHUNKS: usize = 16;

/// Attention of `q` (`[B, heads, head_dim]`) over the pool tensors `keys`/`values`
/// (`[slots, kv_heads, head_dim]`), sequence `b` seeing the slots `context[b]` in position
/// order. Returns `[B, heads * head_dim]` in the pool's dtype, or `None` when no kernel applies.
pub fn decode_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    context: &[&[i64]],
    shape: DecodeShape,
) -> Option<Tensor> {
    let kind = keys.kind();
    let (b, h, d) = q.size3().ok()?;
    let DecodeShape {
        num_heads,
        num_kv_heads,
        head_dim,
        ..
    } = shape;
    let slots = keys.size().first().copied()? as usize;
    if q.device() != tch::Device::Cpu
        || q.kind() != kind
        || values.kind() != kind
        || b as usize != context.len()
        || h as usize != num_heads
        || d as usize != head_dim
        || head_dim % 16 != 0
        || head_dim / 16 > MAX_CHUNKS
        || num_heads % num_kv_heads != 0
        || !keys.is_contiguous()
        || !values.is_contiguous()
        || context
            .iter()
            .any(|c| c.is_empty() || c.iter().any(|&s| s < 0 || s as usize >= slots))
        || !supported(kind)
    {
        return None;
    }
    let q = q.contiguous();
    let out = Tensor::empty([b, h * d], (kind, tch::Device::Cpu));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `q`, `keys`, `values` and `out` are contiguous CPU tensors of `kind` with the
    // shapes checked above, every slot is inside the pool, and `supported` checked the CPU.
    unsafe {
        let (qp, kp, vp, op) = (
            q.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            out.data_ptr(),
        );
        let mut scores = Vec::new();
        for (seq, ctx) in context.iter().enumerate() {
            for kvh in 0..num_kv_heads {
                let job = Job {
                    shape,
                    ctx,
                    kv_head: kvh,
                    first_head: seq * num_heads + kvh * (num_heads / num_kv_heads),
                };
                let ptrs = (
                    qp as *const u8,
                    kp as *const u8,
                    vp as *const u8,
                    op as *mut u8,
                );
                match kind {
                    Kind::Float => job.run::<false>(ptrs, &mut scores),
                    _ => job.run::<true>(ptrs, &mut scores),
                }
            }
        }
    }
    Some(out)
}

/// Loads 16 elements (f32, or bf16 carried as `u16` when `BF16`) as f32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load16<const BF16: bool>(p: *const u8) -> __m512 {
    if BF16 {
        // A bf16 is the top half of an f32.
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

/// Stores 16 f32 lanes as elements; bf16 rounds to nearest even, as libtorch converts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn store16<const BF16: bool>(p: *mut u8, v: __m512) {
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

/// One sequence and KV head: the query heads `first_head..first_head + group`.
struct Job<'a> {
    shape: DecodeShape,
    ctx: &'a [i64],
    kv_head: usize,
    first_head: usize,
}

#[cfg(target_arch = "x86_64")]
impl Job<'_> {
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run<const BF16: bool>(
        &self,
        (q, k, v, out): (*const u8, *const u8, *const u8, *mut u8),
        scores: &mut Vec<f32>,
    ) {
        let elt = if BF16 { 2 } else { 4 };
        let s = self.shape;
        let (hd, chunks) = (s.head_dim, s.head_dim / 16);
        let group = s.num_heads / s.num_kv_heads;
        let row = s.num_kv_heads * hd;
        let len = self.ctx.len();
        let start = s.window.map_or(0, |w| len.saturating_sub(w));
        let seen = &self.ctx[start..];
        scores.clear();
        scores.resize(seen.len(), 0.0);
        for g in 0..group {
            let head = self.first_head + g;
            let qh = q.add(head * hd * elt);
            let mut qv = [_mm512_setzero_ps(); MAX_CHUNKS];
            for (c, lane) in qv.iter_mut().enumerate().take(chunks) {
                *lane = load16::<BF16>(qh.add(c * 16 * elt));
            }
            let mut max = f32::NEG_INFINITY;
            for (j, &slot) in seen.iter().enumerate() {
                let kr = k.add((slot as usize * row + self.kv_head * hd) * elt);
                let mut acc = _mm512_setzero_ps();
                for (c, lane) in qv.iter().enumerate().take(chunks) {
                    acc = _mm512_fmadd_ps(*lane, load16::<BF16>(kr.add(c * 16 * elt)), acc);
                }
                let mut score = _mm512_reduce_add_ps(acc) * s.scale;
                if let Some(cap) = s.softcap {
                    score = (score / cap).tanh() * cap;
                }
                max = max.max(score);
                scores[j] = score;
            }
            let mut sum = 0.0f32;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let mut acc = [_mm512_setzero_ps(); MAX_CHUNKS];
            for (j, &slot) in seen.iter().enumerate() {
                let vr = v.add((slot as usize * row + self.kv_head * hd) * elt);
                let p = _mm512_set1_ps(scores[j]);
                for (c, lane) in acc.iter_mut().enumerate().take(chunks) {
                    *lane = _mm512_fmadd_ps(p, load16::<BF16>(vr.add(c * 16 * elt)), *lane);
                }
            }
            let norm = _mm512_set1_ps(1.0 / sum);
            let oh = out.add(head * hd * elt);
            for (c, lane) in acc.iter().enumerate().take(chunks) {
                store16::<BF16>(oh.add(c * 16 * elt), _mm512_mul_ps(*lane, norm));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(shape: &[i64], step: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        ((Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * step).sin() * 2.0).view(shape)
    }

    /// The same attention with libtorch ops, in f64.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, ctx: &[&[i64]], s: DecodeShape) -> Tensor {
        let group = (s.num_heads / s.num_kv_heads) as i64;
        let rows: Vec<Tensor> = ctx
            .iter()
            .enumerate()
            .map(|(b, c)| {
                let start = s.window.map_or(0, |w| c.len().saturating_sub(w));
                let idx = Tensor::from_slice(&c[start..]);
                let kc = k
                    .index_select(0, &idx)
                    .to_kind(Kind::Double)
                    .transpose(0, 1);
                let vc = v
                    .index_select(0, &idx)
                    .to_kind(Kind::Double)
                    .transpose(0, 1);
                let kc = kc.repeat_interleave_self_int(group, 0, None);
                let vc = vc.repeat_interleave_self_int(group, 0, None);
                let qb = q.get(b as i64).to_kind(Kind::Double).unsqueeze(1);
                let mut sc = qb.matmul(&kc.transpose(1, 2)) * s.scale as f64;
                if let Some(cap) = s.softcap {
                    sc = (sc / cap as f64).tanh() * cap as f64;
                }
                sc.softmax(-1, Kind::Double).matmul(&vc).reshape([-1])
            })
            .collect();
        Tensor::stack(&rows, 0)
    }

    #[test]
    fn matches_libtorch_with_gqa_windows_and_softcap() {
        for kind in [Kind::Float, Kind::BFloat16] {
            if !supported(kind) {
                eprintln!("skipping {kind:?}: no kernel for this CPU");
                continue;
            }
            for (nh, nkv, hd, softcap, window) in [
                (9, 3, 64, None, None),
                (4, 4, 32, Some(50.0), None),
                (8, 2, 16, None, Some(5)),
                (2, 1, 128, Some(3.0), Some(40)),
            ] {
                let slots = 64;
                let k = wave(&[slots, nkv, hd], 0.31).to_kind(kind);
                let v = wave(&[slots, nkv, hd], 0.17).to_kind(kind);
                let q = wave(&[3, nh, hd], 0.23).to_kind(kind);
                let a: Vec<i64> = (0..17).map(|i| (i * 7) % slots).collect();
                let b: Vec<i64> = vec![63];
                let c: Vec<i64> = (10..60).collect();
                let ctx: Vec<&[i64]> = vec![&a, &b, &c];
                let shape = DecodeShape {
                    num_heads: nh as usize,
                    num_kv_heads: nkv as usize,
                    head_dim: hd as usize,
                    scale: 1.0 / (hd as f32).sqrt(),
                    softcap,
                    window,
                };
                let got = decode_attention(&q, &k, &v, &ctx, shape).expect("kernel");
                let want = reference(&q, &k, &v, &ctx, shape);
                let err = (got.to_kind(Kind::Double) - want)
                    .abs()
                    .max()
                    .double_value(&[]);
                let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                assert!(err < tol, "{kind:?} {nh}/{nkv}x{hd}: error {err}");
            }
        }
    }

    #[test]
    fn declines_bad_slots_and_odd_head_dims() {
        let k = wave(&[8, 1, 16], 0.1);
        let q = wave(&[1, 1, 16], 0.2);
        let shape = DecodeShape {
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 16,
            scale: 0.25,
            softcap: None,
            window: None,
        };
        assert!(
            decode_attention(&q, &k, &k, &[&[8]], shape).is_none(),
            "slot outside the pool"
        );
        assert!(
            decode_attention(&q, &k, &k, &[&[]], shape).is_none(),
            "empty context"
        );
        let k = wave(&[8, 1, 12], 0.1);
        let q = wave(&[1, 1, 12], 0.2);
        let odd = DecodeShape {
            head_dim: 12,
            ..shape
        };
        assert!(decode_attention(&q, &k, &k, &[&[1]], odd).is_none());
    }
}
