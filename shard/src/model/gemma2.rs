//! Gemma 2: the Llama structure plus four norms per layer (around both attention and MLP, all
//! of the `1 + weight` kind), embeddings scaled by `sqrt(hidden_size)`, a custom attention
//! scale (`query_pre_attn_scalar`), tanh soft-capping of attention scores and final logits,
//! and sliding-window attention on alternate layers.

use tch::{Device, Kind};

use super::transformer::{Layer, Linear, Mlp, Norm, Transformer};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Weights;

fn norm(w: &Weights, name: &str, size: i64, eps: f64) -> Result<Norm> {
    Ok(Norm::Rms {
        weight: w.get(name, &[size])?,
        eps,
        unit_offset: true,
    })
}

pub fn load(c: ModelConfig, w: &Weights, kind: Kind, device: Device) -> Result<Transformer> {
    let (h, nh, nkv, hd, ffn) = c.dims();
    let eps = c.norm_eps;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let attn = |s: &str| format!("{p}.self_attn.{s}");
        let mlp = |s: &str| format!("{p}.mlp.{s}");
        layers.push(Layer {
            input_norm: norm(w, &format!("{p}.input_layernorm.weight"), h, eps)?,
            qkv: Linear::fused(
                w,
                &[attn("q_proj"), attn("k_proj"), attn("v_proj")],
                &[nh * hd, nkv * hd, nkv * hd],
                h,
                c.qkv_bias,
            )?,
            o: Linear::single(w, &attn("o_proj"), h, nh * hd, c.qkv_bias)?,
            q_norm: None,
            k_norm: None,
            post_attention_norm: Some(norm(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
            )?),
            pre_mlp_norm: norm(w, &format!("{p}.pre_feedforward_layernorm.weight"), h, eps)?,
            post_mlp_norm: Some(norm(
                w,
                &format!("{p}.post_feedforward_layernorm.weight"),
                h,
                eps,
            )?),
            mlp: Mlp::Gated {
                gate_up: Linear::fused(
                    w,
                    &[mlp("gate_proj"), mlp("up_proj")],
                    &[ffn, ffn],
                    h,
                    false,
                )?,
                down: Linear::single(w, &mlp("down_proj"), h, ffn, false)?,
            },
            window: c.layer_windows.get(i).copied().flatten(),
        });
    }
    let embed = w.get("model.embed_tokens.weight", &[c.vocab_size as i64, h])?;
    Ok(Transformer {
        lm_head: Transformer::lm_head(w, &c, &embed, "lm_head.weight")?,
        embed,
        embed_scale: Some((c.hidden_size as f64).sqrt()),
        positions: Transformer::rope(&c, device),
        layers,
        final_norm: norm(w, "model.norm.weight", h, eps)?,
        attention: Transformer::attention_params(&c),
        kind,
        device,
        config: c,
        parallel: None,
        vocab_block: 0,
        plan_decode: true,
        planned_steps: Default::default(),
        plans_built: Default::default(),
    })
}
