//! The pre-norm decoder every supported family is built from, and its parts.
//!
//! Families differ in parts, not in control flow: RMSNorm or LayerNorm, gated or plain MLP,
//! RoPE or learned positions, optional q/k norms (Qwen3), extra norms around attention and MLP
//! and soft-capped scores (Gemma 2). Numerics follow transformers step for step (norms in f32,
//! then cast where transformers casts), because the reference tests demand token equality.

use tch::{Device, Kind, Tensor};

use super::attention::{self, AttentionParams, AttentionPlan};
use super::rope::Rope;
use super::ForwardInput;
use crate::config::{Activation, ModelConfig};
use crate::error::Result;
use crate::kv_cache::{KvLayout, KvPool};
use crate::weights::Weights;

pub struct Linear {
    /// `[out, in]`, as checkpoints store it.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `stream`: the rows are decode tokens, which go to the CPU kernels where one applies.
    /// Prompt rows always take libtorch, whose per-row results do not depend on how many rows
    /// there are: a prompt computed whole or after a cached prefix then gets the same K/V,
    /// which in bf16 decides near-ties (the kernels accumulate in a different order).
    pub fn forward(&self, x: &Tensor, stream: bool) -> Tensor {
        if stream {
            if let Some(y) = crate::kernels::decode_product(x, &self.weight) {
                return match &self.bias {
                    Some(b) => y + b,
                    None => y,
                };
            }
        }
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// Loads `names` (each `[rows_i, cols]`, `.weight` and optionally `.bias`) fused into one
    /// matmul: fewer, larger matmuls are what a 2-core CPU and a GPU both prefer.
    pub fn fused(
        w: &Weights,
        names: &[String],
        rows: &[i64],
        cols: i64,
        bias: bool,
    ) -> Result<Self> {
        let mut ws = names
            .iter()
            .zip(rows)
            .map(|(n, &r)| w.get(&format!("{n}.weight"), &[r, cols]))
            .collect::<Result<Vec<_>>>()?;
        let bias = if bias {
            let bs = names
                .iter()
                .zip(rows)
                .map(|(n, &r)| w.get(&format!("{n}.bias"), &[r]))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0))
        } else {
            None
        };
        let weight = if ws.len() == 1 {
            ws.swap_remove(0)
        } else {
            Tensor::cat(&ws, 0)
        };
        Ok(Self::new(weight, bias))
    }

    pub fn single(w: &Weights, name: &str, rows: i64, cols: i64, bias: bool) -> Result<Self> {
        Self::fused(w, &[name.to_string()], &[rows], cols, bias)
    }
}

pub enum Norm {
    /// `x * rsqrt(mean(x²) + eps)` in f32. Llama casts back before scaling by `weight`; Gemma
    /// scales by `1 + weight` in f32 and casts after (`unit_offset`).
    Rms {
        weight: Tensor,
        eps: f64,
        unit_offset: bool,
    },
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
}

impl Norm {
    pub fn rms(w: &Weights, name: &str, size: i64, eps: f64) -> Result<Self> {
        Ok(Norm::Rms {
            weight: w.get(name, &[size])?,
            eps,
            unit_offset: false,
        })
    }

    /// Every row takes the CPU kernel where it applies: unlike a product's, a norm's result
    /// for a row does not depend on the other rows, so a prompt gets the same rows whether it
    /// is computed whole, in chunks or after a cached prefix.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Rms {
                weight,
                eps,
                unit_offset,
            } => {
                if let Some(y) = crate::kernels::rms_norm(x, weight, *eps, *unit_offset) {
                    return y;
                }
                let kind = x.kind();
                if !*unit_offset && kind == Kind::Float {
                    // libtorch's rms_norm does Llama's arithmetic in one call instead of
                    // eight. In 16 bits it applies the weight before the cast, where
                    // transformers casts first, and lands an ulp away.
                    return x.rms_norm([weight.size()[0]], Some(weight), Some(*eps));
                }
                let h = x.to_kind(Kind::Float);
                let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
                let h = h * (var + *eps).rsqrt();
                if *unit_offset {
                    (h * (weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
                } else {
                    h.to_kind(kind) * weight
                }
            }
            Norm::Layer { weight, bias, eps } => {
                let n = weight.size()[0];
                x.layer_norm([n], Some(weight), Some(bias), *eps, false)
            }
        }
    }

    /// The residual add and this norm: `x += a`, then the norm of `x`. An RMSNorm takes one
    /// kernel pass (row by row, as `forward`); `x` must not share storage with any other
    /// tensor, which holds for the residual stream `Transformer::forward` owns.
    fn add_forward(&self, x: &mut Tensor, a: &Tensor) -> Tensor {
        if let Norm::Rms {
            weight,
            eps,
            unit_offset,
        } = self
        {
            // SAFETY: the residual stream is owned by the forward pass alone (each layer's
            // sum is a new tensor, and the embedding lookup that starts it is too), and `a`
            // is another layer output.
            if let Some(h) =
                unsafe { crate::kernels::add_rms_norm(x, a, weight, *eps, *unit_offset) }
            {
                return h;
            }
        }
        *x = &*x + a;
        self.forward(x)
    }
}

fn activate(act: Activation, x: &Tensor) -> Tensor {
    match act {
        Activation::Silu => x.silu(),
        Activation::GeluTanh => x.gelu("tanh"),
        Activation::Gelu => x.gelu("none"),
    }
}

pub enum Mlp {
    /// `down(act(gate(x)) * up(x))`, gate and up fused into one matmul (gate first).
    Gated { gate_up: Linear, down: Linear },
    /// `proj(act(fc(x)))` (GPT-2).
    Plain { fc: Linear, proj: Linear },
}

impl Mlp {
    fn forward(&self, act: Activation, x: &Tensor, stream: bool) -> Tensor {
        match self {
            Mlp::Gated { gate_up, down } => {
                let gu = gate_up.forward(x, stream);
                // Row by row, so every row takes the kernel (as `Norm::forward`).
                let fused = match act {
                    Activation::Silu => crate::kernels::silu_mul(&gu),
                    _ => None,
                };
                let h = fused.unwrap_or_else(|| {
                    let ffn = gu.size()[1] / 2;
                    activate(act, &gu.narrow(1, 0, ffn)) * gu.narrow(1, ffn, ffn)
                });
                down.forward(&h, stream)
            }
            Mlp::Plain { fc, proj } => proj.forward(&activate(act, &fc.forward(x, stream)), stream),
        }
    }
}

pub struct Layer {
    pub input_norm: Norm,
    /// q, k and v fused, in that order.
    pub qkv: Linear,
    pub o: Linear,
    /// Per-head norms of queries and keys before RoPE (Qwen3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    /// Applied to the attention output before the residual add (Gemma 2).
    pub post_attention_norm: Option<Norm>,
    pub pre_mlp_norm: Norm,
    pub post_mlp_norm: Option<Norm>,
    pub mlp: Mlp,
    pub window: Option<usize>,
}

/// How token positions enter the model.
pub enum Positions {
    Rope(Rope),
    /// A learned table added to the token embeddings (GPT-2).
    Learned(Tensor),
}

pub struct Transformer {
    pub config: ModelConfig,
    pub embed: Tensor,
    /// Multiplier of the token embeddings (Gemma 2's `sqrt(hidden_size)`), in the model dtype.
    pub embed_scale: Option<f64>,
    pub positions: Positions,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    pub lm_head: Linear,
    pub attention: AttentionParams,
    pub kind: Kind,
    pub device: Device,
    /// Tensor parallelism (`parallel.rs`): this rank's group, when the model is sharded.
    pub parallel: Option<super::parallel::Parallel>,
    /// Vocabulary rows per rank when sharded (the embedding and lm_head blocks).
    pub vocab_block: i64,
    /// Whether a CPU decode step runs as one plan of kernels where it can (`decode_plan`);
    /// off, it runs op by op (the same bits, slower: for comparison).
    pub plan_decode: bool,
    /// Decode steps that ran as a plan, for tests and comparison.
    pub planned_steps: std::sync::atomic::AtomicU64,
    /// Of those, the steps that built their plan rather than run the one kept from the step
    /// before (`decode_plan::KeptStep`).
    pub plans_built: std::sync::atomic::AtomicU64,
}

impl Transformer {
    /// The separate `lm_head` when the checkpoint has one and is untied, else the embedding
    /// table (tied checkpoints store no lm_head; some store a copy anyway).
    pub fn lm_head(
        w: &Weights,
        config: &ModelConfig,
        embed: &Tensor,
        name: &str,
    ) -> Result<Linear> {
        let shape = [config.vocab_size as i64, config.hidden_size as i64];
        let weight = if w.contains(name) && !config.tie_word_embeddings {
            w.get(name, &shape)?
        } else {
            embed.shallow_clone()
        };
        Ok(Linear::new(weight, None))
    }

    pub fn attention_params(config: &ModelConfig) -> AttentionParams {
        AttentionParams {
            num_heads: config.num_heads as i64,
            num_kv_heads: config.num_kv_heads as i64,
            head_dim: config.head_dim as i64,
            scale: config.attention_scale,
            softcap: config.attn_logit_softcapping,
        }
    }

    pub fn rope(config: &ModelConfig, device: Device) -> Positions {
        Positions::Rope(Rope::new(
            config.rotary_dim as i64,
            config.rope_theta,
            &config.rope_scaling,
            config.max_position_embeddings as i64,
            device,
        ))
    }

    /// Every product's weight matrix and the embedding table: what a decode step streams.
    pub(crate) fn product_weights(&mut self) -> Vec<&mut Tensor> {
        let mut out = vec![&mut self.embed, &mut self.lm_head.weight];
        for l in &mut self.layers {
            out.push(&mut l.qkv.weight);
            out.push(&mut l.o.weight);
            match &mut l.mlp {
                Mlp::Gated { gate_up, down } => {
                    out.push(&mut gate_up.weight);
                    out.push(&mut down.weight);
                }
                Mlp::Plain { fc, proj } => {
                    out.push(&mut fc.weight);
                    out.push(&mut proj.weight);
                }
            }
        }
        out
    }

    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            num_layers: self.config.num_layers,
            // This rank's KV heads (all of them unless sharded).
            num_kv_heads: self.attention.num_kv_heads as usize,
            head_dim: self.config.head_dim,
            kind: self.kind,
            device: self.device,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The sum of the ranks' partial results (row-parallel layers); the identity unsharded.
    fn reduce(&self, t: Tensor) -> Tensor {
        match &self.parallel {
            Some(p) => p.all_reduce(&t),
            None => t,
        }
    }

    /// Token embeddings. Sharded, each rank holds a block of the vocabulary: it embeds the ids
    /// in its block, zeros the rest, and the sum over ranks is the full lookup.
    pub(super) fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        let Some(p) = &self.parallel else {
            return Tensor::embedding(&self.embed, ids, -1, false, false);
        };
        let local = ids - self.vocab_block * p.rank as i64;
        let mine = local.ge(0).logical_and(&local.lt(self.vocab_block));
        let rows = Tensor::embedding(
            &self.embed,
            &local.clamp(0, self.vocab_block - 1),
            -1,
            false,
            false,
        );
        let kind = rows.kind();
        let rows = rows * mine.unsqueeze(1).to_kind(kind);
        p.all_reduce(&rows)
    }

    /// Runs the batch, writing the new tokens' K/V into `pool`, and returns f32 logits
    /// `[rows, vocab]` for `input.logit_rows`.
    pub fn forward(&self, input: &ForwardInput, pool: &mut KvPool) -> Tensor {
        if self.plan_decode {
            if let Some(logits) = self.planned_decode(input, pool) {
                return logits;
            }
        }
        let (nh, nkv, hd) = (
            self.attention.num_heads,
            self.attention.num_kv_heads,
            self.attention.head_dim,
        );
        let t = input.input_ids.size()[0];
        let stream = input.prefills.is_empty();
        let windows: Vec<Option<usize>> = self.layers.iter().map(|l| l.window).collect();
        let plan = AttentionPlan::new(input, &windows, self.attention.softcap.is_some());
        let mut x = self.embed_tokens(&input.input_ids);
        if let Some(scale) = self.embed_scale {
            x = x * Tensor::from(scale)
                .to_kind(self.kind)
                .to_device(self.device);
        }
        let rope = match &self.positions {
            Positions::Rope(rope) => Some((rope, rope.tables(&input.positions, self.kind))),
            Positions::Learned(table) => {
                x = x + table.index_select(0, &input.positions);
                None
            }
        };
        // Each decode row's new slot (the last of its context), for the fused rotation and
        // cache write, when the batch is decode rows only.
        let new_slots: Option<Vec<i64>> = input
            .decode
            .as_ref()
            .filter(|d| stream && d.start == 0)
            .map(|d| {
                (0..d.lens.len())
                    .filter_map(|i| d.slots(i).last().copied())
                    .collect::<Vec<i64>>()
            })
            .filter(|s| s.len() as i64 == t);
        // The last layer's MLP output, added to `x` together with the next norm.
        let mut pending: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = match pending.take() {
                Some(m) => layer.input_norm.add_forward(&mut x, &m),
                None => layer.input_norm.forward(&x),
            };
            let qkv = layer.qkv.forward(&h, stream);
            let fused = match (&rope, &new_slots) {
                (Some((_, (cos, sin))), Some(slots))
                    if layer.q_norm.is_none() && layer.k_norm.is_none() =>
                {
                    pool.rope_store(li, &qkv, (cos, sin), nh as usize, slots)
                }
                _ => None,
            };
            let (q, new_kv) = match fused {
                Some(q) => (q, None),
                None => {
                    let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd).view([t, nkv, hd]);
                    // Queries and keys side by side as `[T, heads + kv_heads, hd]`, so RoPE is
                    // one set of ops for both (per-op overhead dominates small decode steps).
                    let mut qk = qkv.narrow(1, 0, (nh + nkv) * hd).view([t, nh + nkv, hd]);
                    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                        qk = Tensor::cat(
                            &[
                                qn.forward(&qk.narrow(1, 0, nh)),
                                kn.forward(&qk.narrow(1, nh, nkv)),
                            ],
                            1,
                        );
                    }
                    if let Some((rope, (cos, sin))) = &rope {
                        qk = rope.apply(&qk, cos, sin);
                    }
                    let (q, k) = (qk.narrow(1, 0, nh), qk.narrow(1, nh, nkv));
                    pool.write(li, &input.slots, &k, &v);
                    (q, Some((k, v)))
                }
            };
            let attn = attention::attend(
                &self.attention,
                &plan,
                layer.window,
                input,
                pool,
                li,
                &q,
                new_kv.as_ref().map(|(k, v)| (k, v)),
            );
            let mut a = self.reduce(layer.o.forward(&attn, stream));
            if let Some(n) = &layer.post_attention_norm {
                a = n.forward(&a);
            }
            let h = layer.pre_mlp_norm.add_forward(&mut x, &a);
            let mut m = self.reduce(layer.mlp.forward(self.config.activation, &h, stream));
            if let Some(n) = &layer.post_mlp_norm {
                m = n.forward(&m);
            }
            pending = Some(m);
        }
        if let Some(m) = pending {
            x = x + m;
        }
        let rows = x.index_select(0, &input.logit_rows);
        let rows = self.final_norm.forward(&rows);
        let logits = self.lm_head.forward(&rows, stream);
        let logits = match &self.parallel {
            Some(p) => p
                .all_gather(&logits, 1)
                .narrow(1, 0, self.config.vocab_size as i64),
            None => logits,
        }
        .to_kind(Kind::Float);
        match self.config.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }
}
