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
    /// Every position's rows as `tables` gives them, in one dtype (`all_rows`).
    rows: std::sync::OnceLock<(Kind, Tensor, Tensor)>,
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
    /// Tables for positions `0..max_positions`. With `Dynamic` NTK scaling, positions within
    /// the trained length use the plain base (exactly what transformers computes for such
    /// sequences); positions beyond it use the base stretched for the longest sequence the
    /// model accepts. The tables are fixed, so a cached key never disagrees with a new one.
    pub fn new(
        rotary_dim: i64,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: i64,
        device: Device,
    ) -> Self {
        let table = |theta: f64| {
            let (inv, attention_factor) = inv_freq(rotary_dim, theta, scaling, device);
            let pos = Tensor::arange(max_positions, (Kind::Float, device));
            let freqs = pos.unsqueeze(1) * inv.unsqueeze(0);
            let emb = Tensor::cat(&[&freqs, &freqs], -1);
            (emb.cos() * attention_factor, emb.sin() * attention_factor)
        };
        let (mut cos, mut sin) = table(theta);
        if let RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: old,
        } = *scaling
        {
            if max_positions as f64 > old {
                let ratio = factor * max_positions as f64 / old - (factor - 1.0);
                let stretched = theta * ratio.powf(rotary_dim as f64 / (rotary_dim as f64 - 2.0));
                let (long_cos, long_sin) = table(stretched);
                let keep = old as i64;
                let tail = max_positions - keep;
                cos = Tensor::cat(&[cos.narrow(0, 0, keep), long_cos.narrow(0, keep, tail)], 0);
                sin = Tensor::cat(&[sin.narrow(0, 0, keep), long_sin.narrow(0, keep, tail)], 0);
            }
        }
        Self {
            cos,
            sin,
            rotary_dim,
            rows: std::sync::OnceLock::new(),
        }
    }

    /// `(cos, signed sin)` for `positions` (`[T]`), shaped `[T, 1, rotary_dim]` in `kind`. The
    /// first half of `sin` is negated, so rotating is `x * cos + roll(x) * sin`.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let gather = |t: &Tensor| t.index_select(0, positions).to_kind(kind).unsqueeze(1);
        let sin = gather(&self.sin);
        let half = self.rotary_dim / 2;
        let signed = Tensor::cat(
            &[sin.narrow(2, 0, half).neg(), sin.narrow(2, half, half)],
            2,
        );
        (gather(&self.cos), signed)
    }

    /// `tables` for every position, `[positions, rotary_dim]` each, the same values row for
    /// row (each element converted and negated alone): for a caller that copies the rows it
    /// needs itself. In a kept decode step, `tables` and two copies into its inputs took
    /// 144-188 µs of a batch-1 step between two weight streams (Zen 4 VM), row copies from
    /// these 14-19 µs. Made once, for the first dtype asked; `None` for another.
    pub fn all_rows(&self, kind: Kind) -> Option<(&Tensor, &Tensor)> {
        let (made, cos, sin) = self.rows.get_or_init(|| {
            let sin = self.sin.to_kind(kind);
            let half = self.rotary_dim / 2;
            let signed = Tensor::cat(
                &[sin.narrow(1, 0, half).neg(), sin.narrow(1, half, half)],
                1,
            );
            (
                kind,
                self.cos.to_kind(kind).contiguous(),
                signed.contiguous(),
            )
        });
        (*made == kind).then_some((cos, sin))
    }

    /// Rotates `x` (`[T, heads, head_dim]`) with tables from `tables`; through the CPU kernel
    /// where it applies, for every row (a row's rotation does not depend on the others).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        if let Some(y) = crate::kernels::rope(x, cos, sin) {
            return y;
        }
        let d = x.size()[2];
        if self.rotary_dim < d {
            let rot = x.narrow(2, 0, self.rotary_dim);
            let pass = x.narrow(2, self.rotary_dim, d - self.rotary_dim);
            return Tensor::cat(&[&Self::rotate(&rot, cos, sin), &pass], -1);
        }
        Self::rotate(x, cos, sin)
    }

    /// transformers' `x * cos + rotate_half(x) * sin`, where `rotate_half(x)` is
    /// `cat(-x2, x1)`: that equals `roll(x, half) * signed_sin`, exactly (a sign flip is exact).
    fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[2] / 2;
        x * cos + x.roll([half], [2]) * sin
    }
}
