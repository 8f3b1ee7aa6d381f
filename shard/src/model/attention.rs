//! Attention over the paged KV pool.
//!
//! Masks depend only on the batch layout and a layer's sliding window, so `AttentionPlan`
//! builds them once per forward pass (one variant per distinct window) and every layer reuses
//! them. Prompt chunks go through SDPA, which has fused CPU and CUDA kernels and matches
//! transformers' own numerics (fresh prompts of one length, side by side, share one call);
//! decode tokens (where no CPU kernel applies), and any model with logit soft-capping (which
//! SDPA cannot express), use an explicit grouped-query attention that never repeats K/V heads.

use tch::{Kind, Tensor};

use super::ForwardInput;
use crate::kernels::attention::DecodeShape;
use crate::kv_cache::KvPool;

/// Head geometry and score shaping of one model.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub scale: f64,
    pub softcap: Option<f64>,
}

/// The masks of one sliding-window setting: `true` where a query may attend to a key.
struct Variant {
    window: Option<usize>,
    /// Per prefill span; `None` for plain causal attention over a fresh prompt.
    prefill: Vec<Option<Tensor>>,
    /// `[B, 1, 1, 1, max_len]` for the decode group; `None` when nothing is masked.
    decode: Option<Tensor>,
}

pub struct AttentionPlan {
    variants: Vec<Variant>,
}

/// `always`: build the mask even for plain causal attention (the explicit path needs one).
fn prefill_mask(
    past: i64,
    len: i64,
    window: Option<i64>,
    always: bool,
    device: tch::Device,
) -> Option<Tensor> {
    let total = past + len;
    let window = window.filter(|&w| w < total);
    if past == 0 && window.is_none() && !always {
        return None;
    }
    let q = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let mut mask = k.le_tensor(&q);
    if let Some(w) = window {
        mask = mask.logical_and(&(q - k).lt(w));
    }
    Some(mask)
}

fn decode_mask(lens: &[i64], window: Option<i64>, device: tch::Device) -> Option<Tensor> {
    let max = lens.iter().copied().max().unwrap_or(0);
    let padded = lens.iter().any(|&l| l != max);
    let windowed = window.is_some_and(|w| max > w);
    if !padded && !windowed {
        return None;
    }
    let lens_t = Tensor::from_slice(lens).to_device(device).unsqueeze(1);
    let k = Tensor::arange(max, (Kind::Int64, device)).unsqueeze(0);
    let mut mask = k.lt_tensor(&lens_t);
    if let Some(w) = window {
        mask = mask.logical_and(&((lens_t - 1) - k).lt(w));
    }
    Some(mask.view([lens.len() as i64, 1, 1, 1, max]))
}

impl AttentionPlan {
    /// `explicit_prefill`: prompts use the explicit path too (models with soft-capping).
    pub fn new(input: &ForwardInput, windows: &[Option<usize>], explicit_prefill: bool) -> Self {
        let device = input.input_ids.device();
        let mut distinct: Vec<Option<usize>> = Vec::new();
        for w in windows {
            if !distinct.contains(w) {
                distinct.push(*w);
            }
        }
        let variants = distinct
            .into_iter()
            .map(|window| {
                let w = window.map(|w| w as i64);
                Variant {
                    window,
                    prefill: input
                        .prefills
                        .iter()
                        .map(|p| prefill_mask(p.past, p.len, w, explicit_prefill, device))
                        .collect(),
                    decode: input
                        .decode
                        .as_ref()
                        .and_then(|d| decode_mask(&d.lens, w, device)),
                }
            })
            .collect();
        Self { variants }
    }

    fn variant(&self, window: Option<usize>) -> &Variant {
        self.variants
            .iter()
            .find(|v| v.window == window)
            .unwrap_or(&self.variants[0])
    }
}

/// Explicit attention. `q`: `[B, heads, Lq, hd]`; `k`/`v`: `[B, kv_heads, Lk, hd]`;
/// `mask`: broadcastable to `[B, kv_heads, group, Lq, Lk]`. Returns `[B, heads, Lq, hd]`.
fn explicit(
    p: &AttentionParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Tensor {
    let (b, lq) = (q.size()[0], q.size()[2]);
    let lk = k.size()[2];
    let group = p.num_heads / p.num_kv_heads;
    let q = q.reshape([b, p.num_kv_heads, group * lq, p.head_dim]);
    let mut scores = q.matmul(&k.transpose(2, 3)) * p.scale;
    if let Some(cap) = p.softcap {
        scores = (scores / cap).tanh() * cap;
    }
    let mut scores = scores.view([b, p.num_kv_heads, group, lq, lk]);
    if let Some(m) = mask {
        scores = scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY);
    }
    let probs =
        scores
            .softmax(-1, Kind::Float)
            .to_kind(v.kind())
            .view([b, p.num_kv_heads, group * lq, lk]);
    probs.matmul(v).view([b, p.num_heads, lq, p.head_dim])
}

/// `n` fresh prompts of equal length, their rows side by side: `q` `[n * len, heads, hd]`, `k`
/// and `v` `[n * len, kv_heads, hd]`. One causal SDPA call for all of them, since each call has
/// a fixed cost (on a GPU, a handful of kernel launches) and equal prompts are common: a
/// batch of 32 would otherwise make 32 calls per layer. Returns `[n * len, heads * hd]`.
fn fresh_prompts(p: &AttentionParams, q: &Tensor, k: &Tensor, v: &Tensor, n: i64) -> Tensor {
    let rows = q.size()[0];
    let split =
        |t: &Tensor, heads: i64| t.reshape([n, rows / n, heads, p.head_dim]).transpose(1, 2);
    Tensor::scaled_dot_product_attention(
        &split(q, p.num_heads),
        &split(k, p.num_kv_heads),
        &split(v, p.num_kv_heads),
        None::<Tensor>,
        0.0,
        true,
        Some(p.scale),
        p.num_kv_heads != p.num_heads,
    )
    .transpose(1, 2)
    .reshape([rows, -1])
}

/// One prompt chunk that reads a cached context through its block table, or needs a mask (a
/// sliding window, or soft-capping, which only the explicit path can express). `q`
/// `[len, heads, hd]`; `k`, `v` `[context, kv_heads, hd]`. Returns `[len, heads * hd]`.
fn span_attention(
    p: &AttentionParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Tensor {
    let len = q.size()[0];
    let qi = q.transpose(0, 1).unsqueeze(0);
    let ki = k.transpose(0, 1).unsqueeze(0);
    let vi = v.transpose(0, 1).unsqueeze(0);
    let o = if p.softcap.is_some() {
        explicit(p, &qi, &ki, &vi, mask)
    } else {
        Tensor::scaled_dot_product_attention(
            &qi,
            &ki,
            &vi,
            mask.map(|m| m.unsqueeze(0).unsqueeze(0)),
            0.0,
            mask.is_none(),
            Some(p.scale),
            p.num_kv_heads != p.num_heads,
        )
    };
    o.squeeze_dim(0).transpose(0, 1).reshape([len, -1])
}

/// Attention for every row of the batch. `q` is `[T, heads, hd]`, `new_kv` the new tokens'
/// `[T, kv_heads, hd]` keys and values when the caller has them as tensors (they are in `pool`
/// either way; a fused decode step writes them there directly). Returns `[T, heads * hd]`.
pub fn attend(
    p: &AttentionParams,
    plan: &AttentionPlan,
    window: Option<usize>,
    input: &ForwardInput,
    pool: &KvPool,
    layer: usize,
    q: &Tensor,
    new_kv: Option<(&Tensor, &Tensor)>,
) -> Tensor {
    let variant = plan.variant(window);
    let mut outs = Vec::with_capacity(input.prefills.len() + 1);
    let spans = &input.prefills;
    // The new tokens' own keys and values, rows `start..start + rows`.
    let own = |start: i64, rows: i64| match new_kv {
        Some((k, v)) => (k.narrow(0, start, rows), v.narrow(0, start, rows)),
        None => pool.gather(layer, &input.slots.narrow(0, start, rows)),
    };
    // A prompt with nothing cached and no mask (plain causal attention over its own new keys).
    let fresh = |i: usize| spans[i].context.is_none() && variant.prefill[i].is_none();
    let mut i = 0;
    while i < spans.len() {
        let span = &spans[i];
        if !fresh(i) {
            let (k, v) = match &span.context {
                Some(ctx) => pool.gather(layer, ctx),
                None => own(span.start, span.len),
            };
            let q = q.narrow(0, span.start, span.len);
            outs.push(span_attention(p, &q, &k, &v, variant.prefill[i].as_ref()));
            i += 1;
            continue;
        }
        // Fresh prompts of one length, side by side in the batch, run as one batched call.
        let mut n = 1;
        while i + n < spans.len()
            && fresh(i + n)
            && spans[i + n].len == span.len
            && spans[i + n].start == span.start + n as i64 * span.len
        {
            n += 1;
        }
        let rows = n as i64 * span.len;
        let (k, v) = own(span.start, rows);
        let q = q.narrow(0, span.start, rows);
        outs.push(fresh_prompts(p, &q, &k, &v, n as i64));
        i += n;
    }
    if let Some(d) = &input.decode {
        let b = d.lens.len() as i64;
        // CPU: the kernel reads the pool through the slot table, on libtorch's threads, and
        // skips the gathers and per-op costs of the libtorch paths below (which CUDA and CPUs
        // without AVX2 take).
        let cpu = q.device() == tch::Device::Cpu;
        let contexts: Vec<&[i64]> = if cpu {
            (0..d.lens.len()).map(|i| d.slots(i)).collect()
        } else {
            Vec::new()
        };
        let shape = DecodeShape {
            num_heads: p.num_heads as usize,
            num_kv_heads: p.num_kv_heads as usize,
            head_dim: p.head_dim as usize,
            scale: p.scale as f32,
            softcap: p.softcap.map(|c| c as f32),
            window,
        };
        let (keys, values) = pool.layer(layer);
        let kernel = cpu
            .then(|| {
                crate::kernels::decode_attention(
                    &q.narrow(0, d.start, b),
                    keys,
                    values,
                    &contexts,
                    shape,
                )
            })
            .flatten();
        if let Some(o) = kernel {
            outs.push(o);
            return if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(&outs, 0)
            };
        }
        let qd = q.narrow(0, d.start, b).unsqueeze(2);
        let (kd, vd) = pool.gather(layer, &d.context);
        // [B, L, kv_heads, hd] -> [B, kv_heads, L, hd]
        let (kd, vd) = (kd.transpose(1, 2), vd.transpose(1, 2));
        // Measured on the 2-core CPU (docs/benchmarks.md): f32 is fastest through SDPA's fused
        // kernel, bf16 through plain batched matmuls on contiguous K/V (SDPA's bf16 CPU path
        // is several times slower). CUDA takes the matmuls too: on an H200 (torch 2.11), SDPA
        // pays a large cost the first time it sees a shape, and a decode step's shape is new
        // whenever a context length or the batch changes. SmolLM2 bf16 steps took 66-94 ms on
        // new shapes against 13 ms on repeated ones; the matmuls took 18-26 ms either way.
        let fused = p.softcap.is_none() && !q.device().is_cuda() && q.kind() == Kind::Float;
        let o = if fused {
            Tensor::scaled_dot_product_attention(
                &qd,
                &kd,
                &vd,
                variant.decode.as_ref().map(|m| m.view([b, 1, 1, -1])),
                0.0,
                false,
                Some(p.scale),
                p.num_kv_heads != p.num_heads,
            )
        } else {
            explicit(
                p,
                &qd,
                &kd.contiguous(),
                &vd.contiguous(),
                variant.decode.as_ref(),
            )
        };
        outs.push(o.reshape([b, -1]));
    }
    if outs.len() == 1 {
        outs.swap_remove(0)
    } else {
        Tensor::cat(&outs, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The explicit decode path (what CUDA and kernel-less CPUs run) against SDPA on the same
    /// padded, windowed, grouped-query batch: both read the same masks from `decode_mask`.
    #[test]
    fn explicit_decode_matches_sdpa() {
        let p = AttentionParams {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 8,
            scale: 8f64.powf(-0.5),
            softcap: None,
        };
        let lens = [7i64, 4, 5];
        let (b, max) = (lens.len() as i64, 7);
        let opts = (Kind::Float, tch::Device::Cpu);
        let wave = |n: i64, f: f64| (Tensor::arange(n, opts) * f).sin();
        let q = wave(b * 6 * 8, 0.37).view([b, 6, 1, 8]);
        let k = wave(b * 2 * max * 8, 0.71).view([b, 2, max, 8]);
        let v = wave(b * 2 * max * 8, 1.13).view([b, 2, max, 8]);
        for window in [None, Some(3)] {
            let mask = decode_mask(&lens, window, tch::Device::Cpu).expect("padded: a mask");
            let ours = explicit(&p, &q, &k, &v, Some(&mask));
            let sdpa = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(mask.view([b, 1, 1, -1])),
                0.0,
                false,
                Some(p.scale),
                true,
            );
            let diff = f64::try_from((ours - sdpa).abs().max()).expect("scalar");
            assert!(diff < 1e-6, "window {window:?}: max difference {diff}");
        }
    }
}
