//! A CPU decode step as one plan of kernels (`kernels::Plan`), run in a single parallel region.
//!
//! `Transformer::forward` runs a decode step op by op: per layer, two norms, four products, the
//! rotation and cache write, attention and the activation, each a kernel call with its own
//! output allocation and its own OpenMP region, while the other threads wait. Here the same
//! kernels are planned for every layer first, and the whole step then runs in one region. The
//! kernels, and the parts each thread takes of them, are the same, so the logits are the same
//! bits as `forward`'s (tested below).
//!
//! It applies where every part of the step has a kernel: CPU, unsharded, decode rows only,
//! layers of RMSNorm, RoPE over whole heads, attention without q/k norms or extra norms, and a
//! SiLU-gated MLP, with or without biases (Llama, SmolLM2, Mistral, Qwen2). Anything else (a
//! partial rotary dimension, Qwen3's q/k norms, Gemma 2, GPT-2), or a kernel that declines to
//! plan, sends the step to `forward`; nothing has run by then.

use tch::{Device, Kind, Tensor};

use super::transformer::{Layer, Linear, Mlp, Norm, Positions, Transformer};
use super::ForwardInput;
use crate::config::Activation;
use crate::kernels::{self, attention::DecodeShape, Plan};
use crate::kv_cache::KvPool;

/// An RMSNorm's weight, epsilon and Gemma's unit offset; `None` for another norm.
fn rms(norm: &Norm) -> Option<(&Tensor, f64, bool)> {
    match norm {
        Norm::Rms {
            weight,
            eps,
            unit_offset,
        } => Some((weight, *eps, *unit_offset)),
        Norm::Layer { .. } => None,
    }
}

/// Whether the layer is made only of parts the plan has kernels for.
fn plannable(layer: &Layer) -> bool {
    rms(&layer.input_norm).is_some()
        && rms(&layer.pre_mlp_norm).is_some()
        && layer.q_norm.is_none()
        && layer.k_norm.is_none()
        && layer.post_attention_norm.is_none()
        && layer.post_mlp_norm.is_none()
        && matches!(&layer.mlp, Mlp::Gated { .. })
}

/// `x @ linear.weight.T (+ bias)` planned into `plan`, as `Linear::forward` computes it.
fn product<'a>(linear: &Linear, x: &Tensor, plan: &mut Plan<'a>) -> Option<Tensor> {
    let y = kernels::decode_product_in(x, &linear.weight, plan)?;
    if let Some(bias) = &linear.bias {
        // SAFETY: `y` is the product's new output, which nothing else holds, and the bias is
        // the model's own tensor.
        unsafe { kernels::add_bias_in(&y, bias, plan)? };
    }
    Some(y)
}

impl Transformer {
    /// Logits `[rows, vocab]` (f32) of a batch of decode rows, computed by one plan, or `None`
    /// where the plan does not apply (see the module doc), having run nothing.
    pub(super) fn planned_decode(&self, input: &ForwardInput, pool: &mut KvPool) -> Option<Tensor> {
        let decode = input.decode.as_ref()?;
        let Positions::Rope(rope) = &self.positions else {
            return None;
        };
        let final_norm = rms(&self.final_norm)?;
        let t = usize::try_from(input.input_ids.size().first().copied()?).ok()?;
        let applies = self.device == Device::Cpu
            && self.parallel.is_none()
            && input.prefills.is_empty()
            && decode.start == 0
            && decode.lens.len() == t
            && t > 0
            && self.config.activation == Activation::Silu
            // On AVX2 the products take bf16 rows widened to f32, a copy made while planning,
            // which the kernels decline to plan: no need to start.
            && (self.kind != Kind::BFloat16
                || kernels::isa(Kind::BFloat16) == Some(kernels::Isa::Avx512))
            && self.layers.iter().all(plannable)
            && Vec::<i64>::try_from(&input.logit_rows).ok()? == (0..t as i64).collect::<Vec<_>>();
        if !applies {
            return None;
        }
        // Each row's new slot (the last of its context) and whole context.
        let contexts: Vec<&[i64]> = (0..t).map(|i| decode.slots(i)).collect();
        let slots: Vec<i64> = contexts
            .iter()
            .map(|c| c.last().copied())
            .collect::<Option<_>>()?;
        let heads = self.attention.num_heads as usize;
        let shape = |window| DecodeShape {
            num_heads: heads,
            num_kv_heads: self.attention.num_kv_heads as usize,
            head_dim: self.attention.head_dim as usize,
            scale: self.attention.scale as f32,
            softcap: self.attention.softcap.map(|c| c as f32),
            window,
        };

        // The embedding lookup and the rotation tables run now: the plan starts from them.
        let mut x = self.embed_tokens(&input.input_ids);
        if let Some(scale) = self.embed_scale {
            x = x * Tensor::from(scale).to_kind(self.kind);
        }
        let (cos, sin) = rope.tables(&input.positions, self.kind);

        let mut plan = Plan::new();
        let p = &mut plan;
        let mut pending: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let (w, eps, unit) = rms(&layer.input_norm)?;
            // SAFETY (every `add_rms_norm_in` here): the residual stream `x` is this function's
            // own tensor (the embedding lookup's output, or its scaled copy), which no other
            // tensor shares, and the layer outputs added to it are other tensors.
            let h = match pending.take() {
                Some(m) => unsafe { kernels::add_rms_norm_in(&x, &m, w, eps, unit, p)? },
                None => kernels::rms_norm_in(&x, w, eps, unit, p)?,
            };
            let qkv = product(&layer.qkv, &h, p)?;
            let (keys, values) = pool.layer(li);
            // SAFETY: `&mut KvPool` holds the pool's tensors for as long as the plan lives,
            // and they are the pool's own storage, never a view of `qkv`.
            let q = unsafe {
                kernels::rope_store_in(&qkv, (&cos, &sin), heads, (keys, values), &slots, p)?
            };
            let attn =
                kernels::decode_attention_in(&q, keys, values, &contexts, shape(layer.window), p)?;
            let a = product(&layer.o, &attn, p)?;
            let (w, eps, unit) = rms(&layer.pre_mlp_norm)?;
            let h = unsafe { kernels::add_rms_norm_in(&x, &a, w, eps, unit, p)? };
            let Mlp::Gated { gate_up, down } = &layer.mlp else {
                return None;
            };
            let gu = product(gate_up, &h, p)?;
            let act = kernels::silu_mul_in(&gu, p)?;
            pending = Some(product(down, &act, p)?);
        }
        // The last MLP output's residual add and the final norm, in one pass as in the layers.
        let (w, eps, unit) = final_norm;
        let h = match &pending {
            Some(m) => unsafe { kernels::add_rms_norm_in(&x, m, w, eps, unit, p)? },
            None => kernels::rms_norm_in(&x, w, eps, unit, p)?,
        };
        let mut logits = product(&self.lm_head, &h, p)?;
        if logits.kind() == Kind::BFloat16 {
            logits = kernels::widen_in(&logits, p)?;
        }
        plan.run();
        self.planned_steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let logits = logits.to_kind(Kind::Float);
        Some(match self.config.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        })
    }
}
