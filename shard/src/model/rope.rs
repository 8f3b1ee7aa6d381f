//! Rotary position embeddings, with the context-extension schemes real checkpoints use.
//!
//! The tables follow transformers' `rope_init_fn`s exactly (f32 inverse frequencies, rotate-half
//! layout), because the reference tests compare logits at 1e-4. Tables cover every position the
//! model accepts and are gathered once per forward, not once per layer.

use tch::{Device, Kind, Tensor};

use crate::config::RopeScaling;

pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Leading dimensions of each head that rotate (Phi-3's partial rotary factor); the rest pass through.
    rotary_dim: i64,
}

/// The per-pair inverse frequencies of `dim` rotary dimensions, after scaling.
fn inv_freq(dim: i64, theta: f64, scaling: &RopeScaling, device: Device) -> (Tensor, f64) {
    let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float)
        / dim as f64;
    let base = Tensor::from(theta)
        .to_kind(Kind::Float)
        .to_device(device)
        .pow(&exps)
        .reciprocal();
    match *scaling {
        RopeScaling::None | RopeScaling::Dynamic { .. } => (base, 1.0),
        RopeScaling::Linear { factor } => (base / factor, 1.0),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            // Long wavelengths are slowed by `factor`, short ones kept, the band in between
            // interpolated smoothly (Llama 3.1's scheme).
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = base.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = base.where_self(&wavelen.le(low_wavelen), &(&base / factor));
            let smooth: Tensor = (wavelen.reciprocal() * old - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed: Tensor =
                (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen
                .ge(high_wavelen)
                .logical_and(&wavelen.le(low_wavelen));
            (smoothed.where_self(&medium, &scaled), 1.0)
        }
    }
}

impl Rope {
    /// Tables for positions `0..max_positions`. `Dynamic` NTK scaling stretches the base for the
    /// whole table up front (as TGI does), so cached keys never disagree with new ones.
    pub fn new(
        rotary_dim: i64,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: i64,
        device: Device,
    ) -> Self {
        let theta = match *scaling {
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings: old,
            } if max_positions as f64 > old => {
                let ratio = factor * max_positions as f64 / old - (factor - 1.0);
                theta * ratio.powf(rotary_dim as f64 / (rotary_dim as f64 - 2.0))
            }
            _ => theta,
        };
        let (inv, attention_factor) = inv_freq(rotary_dim, theta, scaling, device);
        let pos = Tensor::arange(max_positions, (Kind::Float, device));
        let freqs = pos.unsqueeze(1) * inv.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Self {
            cos: emb.cos() * attention_factor,
            sin: emb.sin() * attention_factor,
            rotary_dim,
        }
    }

    /// `(cos, sin)` for `positions` (`[T]`), shaped `[T, 1, rotary_dim]` in `kind`.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let gather = |t: &Tensor| t.index_select(0, positions).to_kind(kind).unsqueeze(1);
        (gather(&self.cos), gather(&self.sin))
    }

    /// Rotates `x` (`[T, heads, head_dim]`).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let d = x.size()[2];
        if self.rotary_dim < d {
            let rot = x.narrow(2, 0, self.rotary_dim);
            let pass = x.narrow(2, self.rotary_dim, d - self.rotary_dim);
            return Tensor::cat(&[&self.rotate(&rot, cos, sin), &pass], -1);
        }
        self.rotate(x, cos, sin)
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[2] / 2;
        let x1 = x.narrow(2, 0, half);
        let x2 = x.narrow(2, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
        x * cos + rotated * sin
    }
}
