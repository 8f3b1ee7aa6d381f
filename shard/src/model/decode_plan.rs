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
//!
//! The plan is kept with the KV pool it writes (`KeptStep`) and run again while the batch
//! keeps its number of rows: the step refills its inputs (the embedded tokens, the rotation
//! tables, the rows' slots) and runs it, instead of planning every kernel again.

use tch::{Device, Kind, Tensor};

use super::rope::Rope;
use super::transformer::{Layer, Linear, Mlp, Norm, Positions, Transformer};
use super::ForwardInput;
use crate::config::Activation;
use crate::kernels::{self, attention::DecodeShape, Contexts, Plan};
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

/// A planned step kept in the pool it writes (`KvPool::kept_step`), and run again for the next
/// step of a batch of the same shape. Planning a step, with the embedding lookup and the
/// rotation tables (0.09 ms of it), took 0.76-0.90 ms of a 6-7 ms bf16 batch-1 step of SmolLM2
/// on the Zen 4 VM, 0.94 ms at batch 32 (our reading: the kernels' checks and outputs, a few
/// hundred libtorch calls, cold after the weight stream), while from step to step only the
/// tokens, their positions and the rows' slots change. Those the step writes into the plan's
/// inputs before each run.
pub(crate) struct KeptStep {
    key: Key,
    plan: Plan<'static>,
    contexts: Contexts,
    /// The embedded tokens, which the plan turns into the residual stream in place.
    x: Tensor,
    /// The rotation tables of the rows' positions.
    tables: (Tensor, Tensor),
    /// Where the plan leaves the logits `[rows, vocab]`, f32.
    logits: Tensor,
}

/// What a kept plan was built for, besides the model's fixed shapes and weights.
#[derive(PartialEq)]
struct Key {
    /// The lm_head weight's address: the plan keeps the weights alive, so no other model's
    /// can have it.
    model: usize,
    rows: usize,
    windows: Vec<Option<usize>>,
    /// Whether the new slots were distinct: then the plan writes them from several threads.
    distinct: bool,
}

impl KeptStep {
    /// Runs the plan for this step's tokens, positions and slots; `None`, having run nothing,
    /// where the slots do not fit it.
    fn run(
        &mut self,
        model: &Transformer,
        input: &ForwardInput,
        rope: &Rope,
        pool: usize,
    ) -> Option<Tensor> {
        let decode = input.decode.as_ref()?;
        // SAFETY: `&mut self` holds the plan, the only reader of the table, and no plan runs
        // while `run` is not running it.
        // (Whether the new slots are distinct is part of the key, which matched.)
        let set = unsafe { self.contexts.set(&decode.context_cpu, &decode.lens) };
        if !set || !self.contexts.within(pool) {
            return None;
        }
        if model.embed_scale.is_some()
            || !kernels::gather_rows(&model.embed, &input.input_ids, &self.x)
        {
            self.x.copy_(&model.embedded(&input.input_ids));
        }
        let rows = |t: &Tensor| t.view([t.size()[0], -1]);
        let gathered = rope.all_rows(model.kind).is_some_and(|(cos, sin)| {
            kernels::gather_rows(cos, &input.positions, &rows(&self.tables.0))
                && kernels::gather_rows(sin, &input.positions, &rows(&self.tables.1))
        });
        if !gathered {
            let (cos, sin) = rope.tables(&input.positions, model.kind);
            self.tables.0.copy_(&cos);
            self.tables.1.copy_(&sin);
        }
        self.plan.run();
        // The plan writes the same tensor next step: the caller gets its own.
        Some(self.logits.copy())
    }
}

impl Transformer {
    /// The tokens' embeddings, scaled where the model scales them.
    fn embedded(&self, ids: &Tensor) -> Tensor {
        let x = self.embed_tokens(ids);
        match self.embed_scale {
            Some(scale) => x * Tensor::from(scale).to_kind(self.kind),
            None => x,
        }
    }

    /// Logits `[rows, vocab]` (f32) of a batch of decode rows, computed by one plan, or `None`
    /// where the plan does not apply (see the module doc), having run nothing.
    pub(super) fn planned_decode(&self, input: &ForwardInput, pool: &mut KvPool) -> Option<Tensor> {
        let decode = input.decode.as_ref()?;
        let Positions::Rope(rope) = &self.positions else {
            return None;
        };
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
            && rms(&self.final_norm).is_some()
            && self.layers.iter().all(plannable)
            && Vec::<i64>::try_from(&input.logit_rows).ok()? == (0..t as i64).collect::<Vec<_>>();
        if !applies {
            return None;
        }
        // Each row's new slot, the last of its context.
        let new_slots: Vec<i64> = (0..t)
            .map(|i| decode.slots(i).last().copied())
            .collect::<Option<_>>()?;
        let key = Key {
            model: self.lm_head.weight.data_ptr() as usize,
            rows: t,
            windows: self.layers.iter().map(|l| l.window).collect(),
            distinct: kernels::distinct(&new_slots),
        };
        let slots = pool.num_slots();
        let kept = pool.kept_step.take().filter(|k| k.key == key);
        let logits = match kept {
            Some(mut kept) => {
                let logits = kept.run(self, input, rope, slots);
                pool.kept_step = Some(kept);
                logits?
            }
            None => {
                // The embedding lookup and the rotation tables run now: the plan starts from
                // them. Both are new tensors (a lookup, an `index_select` and a `cat`), which
                // the kept plan goes on reading, refilled.
                let x = self.embedded(&input.input_ids);
                let tables = rope.tables(&input.positions, self.kind);
                let contexts = Contexts::new(&(0..t).map(|i| decode.slots(i)).collect::<Vec<_>>());
                let kept = self.plan_step(x, tables, contexts, key, pool)?;
                self.plans_built
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                kept.plan.run();
                let logits = kept.logits.copy();
                pool.kept_step = Some(kept);
                logits
            }
        };
        self.planned_steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(match self.config.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        })
    }

    /// The plan of a decode step from the embedded tokens `x`, or `None` where a kernel
    /// declines (nothing has run).
    fn plan_step(
        &self,
        x: Tensor,
        tables: (Tensor, Tensor),
        contexts: Contexts,
        key: Key,
        pool: &KvPool,
    ) -> Option<KeptStep> {
        let heads = self.attention.num_heads as usize;
        let shape = |window| DecodeShape {
            num_heads: heads,
            num_kv_heads: self.attention.num_kv_heads as usize,
            head_dim: self.attention.head_dim as usize,
            scale: self.attention.scale as f32,
            softcap: self.attention.softcap.map(|c| c as f32),
            window,
        };
        let (cos, sin) = (&tables.0, &tables.1);
        let mut plan = Plan::new();
        let p = &mut plan;
        let mut pending: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let (w, eps, unit) = rms(&layer.input_norm)?;
            // SAFETY (every `add_rms_norm_in` here): the residual stream `x` is the step's own
            // tensor (the embedding lookup's output, or its scaled copy, or the kept step's
            // copy of it), which no other tensor shares, and the layer outputs added to it are
            // other tensors.
            let h = match pending.take() {
                Some(m) => unsafe { kernels::add_rms_norm_in(&x, &m, w, eps, unit, p)? },
                None => kernels::rms_norm_in(&x, w, eps, unit, p)?,
            };
            let qkv = product(&layer.qkv, &h, p)?;
            let (keys, values) = pool.layer(li);
            // SAFETY: the plan runs only under `&mut KvPool` (the pool keeps it), which holds
            // the pool's tensors while it runs, and they are the pool's own storage, never a
            // view of `qkv`.
            let q = unsafe {
                kernels::rope_store_in(&qkv, (cos, sin), heads, (keys, values), &contexts, p)?
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
        let (w, eps, unit) = rms(&self.final_norm)?;
        let h = match &pending {
            Some(m) => unsafe { kernels::add_rms_norm_in(&x, m, w, eps, unit, p)? },
            None => kernels::rms_norm_in(&x, w, eps, unit, p)?,
        };
        let mut logits = product(&self.lm_head, &h, p)?;
        if logits.kind() == Kind::BFloat16 {
            logits = kernels::widen_in(&logits, p)?;
        }
        Some(KeptStep {
            key,
            plan,
            contexts,
            x,
            tables,
            logits,
        })
    }
}
