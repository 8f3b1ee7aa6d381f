//! GPT-2: LayerNorm with biases, learned absolute positions, a plain GELU MLP, biases on every
//! projection, and `Conv1D` weights stored `[in, out]` (transposed once at load, so the forward
//! pass is the same `linear` as every other family).

use tch::{Device, Kind, Tensor};

use super::transformer::{Layer, Linear, Mlp, Norm, Positions, Transformer};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Weights;

fn conv1d(w: &Weights, name: &str, inp: i64, out: i64) -> Result<Linear> {
    Ok(Linear::new(
        w.get(&format!("{name}.weight"), &[inp, out])?
            .t_()
            .contiguous(),
        Some(w.get(&format!("{name}.bias"), &[out])?),
    ))
}

fn layer_norm(w: &Weights, name: &str, size: i64, eps: f64) -> Result<Norm> {
    Ok(Norm::Layer {
        weight: w.get(&format!("{name}.weight"), &[size])?,
        bias: w.get(&format!("{name}.bias"), &[size])?,
        eps,
    })
}

pub fn load(c: ModelConfig, w: &Weights, kind: Kind, device: Device) -> Result<Transformer> {
    let (h, ffn) = (c.hidden_size as i64, c.intermediate_size as i64);
    let eps = c.norm_eps;
    // The original OpenAI checkpoints on the Hub have no `transformer.` prefix.
    let root = if w.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("{root}h.{i}");
        layers.push(Layer {
            input_norm: layer_norm(w, &format!("{p}.ln_1"), h, eps)?,
            qkv: conv1d(w, &format!("{p}.attn.c_attn"), h, 3 * h)?,
            o: conv1d(w, &format!("{p}.attn.c_proj"), h, h)?,
            q_norm: None,
            k_norm: None,
            post_attention_norm: None,
            pre_mlp_norm: layer_norm(w, &format!("{p}.ln_2"), h, eps)?,
            post_mlp_norm: None,
            mlp: Mlp::Plain {
                fc: conv1d(w, &format!("{p}.mlp.c_fc"), h, ffn)?,
                proj: conv1d(w, &format!("{p}.mlp.c_proj"), ffn, h)?,
            },
            window: None,
        });
    }
    let embed = w.get(&format!("{root}wte.weight"), &[c.vocab_size as i64, h])?;
    let wpe: Tensor = w.get(
        &format!("{root}wpe.weight"),
        &[c.max_position_embeddings as i64, h],
    )?;
    Ok(Transformer {
        lm_head: Transformer::lm_head(w, &c, &embed, "lm_head.weight")?,
        embed,
        embed_scale: None,
        positions: Positions::Learned(wpe),
        layers,
        final_norm: layer_norm(w, &format!("{root}ln_f"), h, eps)?,
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
