//! The Llama family: Llama (incl. SmolLM2), Mistral, Qwen2/2.5, Qwen3 and Phi-3.
//!
//! They share one structure (RMSNorm, RoPE, GQA, SiLU-gated MLP) and differ in options the
//! config already carries: biases (Qwen2), q/k norms (Qwen3), sliding windows (Mistral) and
//! checkpoints that store q/k/v and gate/up pre-fused (Phi-3).

use tch::{Device, Kind};

use super::transformer::{Layer, Linear, Mlp, Norm, Transformer};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Weights;

pub fn load(c: ModelConfig, w: &Weights, kind: Kind, device: Device) -> Result<Transformer> {
    let (h, nh, nkv, hd, ffn) = c.dims();
    let eps = c.norm_eps;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let attn = |s: &str| format!("{p}.self_attn.{s}");
        let mlp = |s: &str| format!("{p}.mlp.{s}");
        let qkv_rows = [nh * hd, nkv * hd, nkv * hd];
        // Phi-3 ships the fusions we would make anyway.
        let qkv = if w.contains(&format!("{}.weight", attn("qkv_proj"))) {
            Linear::single(w, &attn("qkv_proj"), qkv_rows.iter().sum(), h, c.qkv_bias)?
        } else {
            Linear::fused(
                w,
                &[attn("q_proj"), attn("k_proj"), attn("v_proj")],
                &qkv_rows,
                h,
                c.qkv_bias,
            )?
        };
        let gate_up = if w.contains(&format!("{}.weight", mlp("gate_up_proj"))) {
            Linear::single(w, &mlp("gate_up_proj"), 2 * ffn, h, c.mlp_bias)?
        } else {
            Linear::fused(
                w,
                &[mlp("gate_proj"), mlp("up_proj")],
                &[ffn, ffn],
                h,
                c.mlp_bias,
            )?
        };
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(Norm::rms(
                    w,
                    &format!("{}.weight", attn("q_norm")),
                    hd,
                    eps,
                )?),
                Some(Norm::rms(
                    w,
                    &format!("{}.weight", attn("k_norm")),
                    hd,
                    eps,
                )?),
            )
        } else {
            (None, None)
        };
        layers.push(Layer {
            input_norm: Norm::rms(w, &format!("{p}.input_layernorm.weight"), h, eps)?,
            qkv,
            o: Linear::single(w, &attn("o_proj"), h, nh * hd, false)?,
            q_norm,
            k_norm,
            post_attention_norm: None,
            pre_mlp_norm: Norm::rms(w, &format!("{p}.post_attention_layernorm.weight"), h, eps)?,
            post_mlp_norm: None,
            mlp: Mlp::Gated {
                gate_up,
                down: Linear::single(w, &mlp("down_proj"), h, ffn, c.mlp_bias)?,
            },
            window: c.layer_windows.get(i).copied().flatten(),
        });
    }
    let embed = w.get("model.embed_tokens.weight", &[c.vocab_size as i64, h])?;
    Ok(Transformer {
        lm_head: Transformer::lm_head(w, &c, &embed, "lm_head.weight")?,
        embed,
        embed_scale: None,
        positions: Transformer::rope(&c, device),
        layers,
        final_norm: Norm::rms(w, "model.norm.weight", h, eps)?,
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
