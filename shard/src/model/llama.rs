//! The Llama architecture family: Llama (incl. SmolLM2), Mistral and Qwen2.
//!
//! The numerics follow transformers' implementation step for step (RMSNorm in f32 then cast,
//! rotate-half RoPE with f32 tables, SDPA with GQA), because the reference tests demand
//! token-for-token equality with it. q/k/v and gate/up are fused into one matmul each at load
//! time: fewer, larger matmuls are what a 2-core CPU and a GPU both prefer.

use tch::{Device, Kind, Tensor};

use super::ForwardInput;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::{KvLayout, SeqKvCache};
use crate::weights::Weights;

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

struct Layer {
    input_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    qkv: Linear,
    o: Linear,
    gate_up: Linear,
    down: Linear,
}

/// Rotary tables for every position, kept in f32 as transformers computes them.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(c: &ModelConfig, device: Device) -> Self {
        let d = c.head_dim as i64;
        let exps = Tensor::arange_start_step(0, d, 2, (Kind::Int64, device)).to_kind(Kind::Float)
            / d as f64;
        let inv_freq = Tensor::from(c.rope_theta)
            .to_kind(Kind::Float)
            .to_device(device)
            .pow(&exps)
            .reciprocal();
        let pos = Tensor::arange(c.max_position_embeddings as i64, (Kind::Float, device));
        let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Self {
            cos: emb.cos(),
            sin: emb.sin(),
        }
    }

    /// Applies RoPE to `x` (`[T, heads, head_dim]`) at `positions` (`[T]`).
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[2] / 2;
        let x1 = x.narrow(2, 0, half);
        let x2 = x.narrow(2, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
        x * cos + rotated * sin
    }
}

pub struct Llama {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    kind: Kind,
    device: Device,
}

fn fused(w: &Weights, names: &[String], rows: &[i64], cols: i64, bias: bool) -> Result<Linear> {
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
    Ok(Linear { weight, bias })
}

impl Llama {
    pub fn load(
        config: ModelConfig,
        weights: &Weights,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let c = &config;
        let (h, nh, nkv, hd, ffn) = (
            c.hidden_size as i64,
            c.num_heads as i64,
            c.num_kv_heads as i64,
            c.head_dim as i64,
            c.intermediate_size as i64,
        );
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: weights.get(name, &[h])?,
                eps: c.rms_norm_eps,
            })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let attn = |s: &str| format!("{p}.self_attn.{s}");
            let mlp = |s: &str| format!("{p}.mlp.{s}");
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                post_attention_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                qkv: fused(
                    weights,
                    &[attn("q_proj"), attn("k_proj"), attn("v_proj")],
                    &[nh * hd, nkv * hd, nkv * hd],
                    h,
                    c.qkv_bias,
                )?,
                o: fused(weights, &[attn("o_proj")], &[h], nh * hd, false)?,
                gate_up: fused(
                    weights,
                    &[mlp("gate_proj"), mlp("up_proj")],
                    &[ffn, ffn],
                    h,
                    c.mlp_bias,
                )?,
                down: fused(weights, &[mlp("down_proj")], &[h], ffn, c.mlp_bias)?,
            });
        }
        let vocab = c.vocab_size as i64;
        let embed = weights.get("model.embed_tokens.weight", &[vocab, h])?;
        // Tied checkpoints store no lm_head; the embedding matrix doubles as the output projection.
        let lm_head = if weights.contains("lm_head.weight") {
            weights.get("lm_head.weight", &[vocab, h])?
        } else {
            embed.shallow_clone()
        };
        Ok(Self {
            embed,
            layers,
            norm: norm("model.norm.weight")?,
            lm_head,
            rope: Rope::new(c, device),
            kind,
            device,
            config,
        })
    }

    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            num_layers: self.config.num_layers,
            num_kv_heads: self.config.num_kv_heads,
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

    /// Runs the batch and returns f32 logits `[rows, vocab]` for `input.logit_rows`.
    /// `caches` are in the same order as `input.new_tokens`; each grows by its new tokens.
    pub fn forward(&self, input: &ForwardInput, caches: &mut [&mut SeqKvCache]) -> Tensor {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let t = input.input_ids.size()[0];
        let cos = self
            .rope
            .cos
            .index_select(0, &input.positions)
            .to_kind(self.kind)
            .unsqueeze(1);
        let sin = self
            .rope
            .sin
            .index_select(0, &input.positions)
            .to_kind(self.kind)
            .unsqueeze(1);
        // Per sequence: its span in the flattened batch, and its attention mask (None = no mask needed).
        let mut spans = Vec::with_capacity(caches.len());
        let mut start = 0i64;
        for (n, cache) in input.new_tokens.iter().zip(caches.iter()) {
            let n = *n as i64;
            spans.push((start, n, self.attention(cache.len() as i64, n)));
            start += n;
        }
        let mut x = Tensor::embedding(&self.embed, &input.input_ids, -1, false, false);
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x);
            let qkv = layer.qkv.forward(&h);
            let q = qkv.narrow(1, 0, nh * hd).view([t, nh, hd]);
            let k = qkv.narrow(1, nh * hd, nkv * hd).view([t, nkv, hd]);
            let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd).view([t, nkv, hd]);
            let q = self.rope.apply(&q, &cos, &sin);
            let k = self.rope.apply(&k, &cos, &sin);
            let mut outs = Vec::with_capacity(spans.len());
            for ((s, n, attention), cache) in spans.iter().zip(caches.iter_mut()) {
                let qi = q.narrow(0, *s, *n).transpose(0, 1).unsqueeze(0);
                let ki = k.narrow(0, *s, *n).transpose(0, 1);
                let vi = v.narrow(0, *s, *n).transpose(0, 1);
                let (keys, values) = cache.append(li, &ki, &vi);
                let o = Tensor::scaled_dot_product_attention(
                    &qi,
                    &keys.unsqueeze(0),
                    &values.unsqueeze(0),
                    attention.mask(),
                    0.0,
                    matches!(attention, Attention::Causal),
                    None,
                    nkv != nh,
                );
                outs.push(o.squeeze_dim(0).transpose(0, 1).reshape([*n, nh * hd]));
            }
            let attn = if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(&outs, 0)
            };
            x = x + layer.o.forward(&attn);
            let h = layer.post_attention_norm.forward(&x);
            let gu = layer.gate_up.forward(&h);
            let ffn = gu.size()[1] / 2;
            let act = gu.narrow(1, 0, ffn).silu() * gu.narrow(1, ffn, ffn);
            x = x + layer.down.forward(&act);
        }
        for (cache, n) in caches.iter_mut().zip(&input.new_tokens) {
            cache.advance(*n);
        }
        let rows = x.index_select(0, &input.logit_rows);
        let rows = self.norm.forward(&rows);
        rows.linear::<Tensor>(&self.lm_head, None)
            .to_kind(Kind::Float)
    }

    /// How `n` new tokens after `past` cached ones attend. The common cases avoid a mask, so
    /// SDPA can take its fused (flash) kernels.
    fn attention(&self, past: i64, n: i64) -> Attention {
        let total = past + n;
        let window = self
            .config
            .sliding_window
            .map(|w| w as i64)
            .filter(|&w| w < total);
        match (window, past, n) {
            (None, _, 1) => return Attention::Full,
            (None, 0, _) => return Attention::Causal,
            _ => {}
        }
        let q_pos = Tensor::arange_start(past, total, (Kind::Int64, self.device)).unsqueeze(1);
        let k_pos = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0);
        let mut mask = k_pos.le_tensor(&q_pos);
        if let Some(w) = window {
            mask = mask.logical_and(&(q_pos - k_pos).lt(w));
        }
        Attention::Mask(mask.unsqueeze(0).unsqueeze(0))
    }
}

/// The attention pattern of one sequence's new tokens.
enum Attention {
    /// Every new token sees the whole history (a single decode token).
    Full,
    /// A fresh prompt: plain causal attention.
    Causal,
    /// Anything else (a prompt after cached tokens, a sliding window): explicit boolean mask,
    /// `true` where attending is allowed.
    Mask(Tensor),
}

impl Attention {
    fn mask(&self) -> Option<&Tensor> {
        match self {
            Attention::Mask(m) => Some(m),
            _ => None,
        }
    }
}
