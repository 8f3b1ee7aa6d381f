//! Next-token choice for a whole batch at once: logit processors, warpers, then greedy or
//! seeded sampling, all as tensor ops over `[batch, vocab]` on the model's device.
//!
//! The order follows TGI: watermark, repetition penalty, frequency (and presence) penalty, the
//! grammar mask (structured output), then the warpers temperature, top-k, top-p and typical-p.
//! As in TGI, setting any warper implies sampling. Each step runs only the processors some row
//! asks for, with per-row parameters as `[batch, 1]` tensors (a neutral value for rows that did
//! not ask), so the cost does not grow with per-request branching. Randomness is the one thing
//! that stays per request: each sampling row draws one uniform number from its own seeded
//! generator and picks its token by inverse CDF, so the same seed gives the same text whatever
//! else shares the batch. A batch whose rows all take the plain argmax skips the tensor ops:
//! `choose_greedy` reads each row's argmax and its log-probability straight out of the logits
//! (`kernels::greedy`), where the ops would select, widen and log-softmax a copy of them first.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::sequence::Sequence;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub typical_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty (a Tessera extension of the v3 protocol).
    pub presence_penalty: f32,
    /// Kirchenbauer et al.'s watermark, with TGI's `WATERMARK_GAMMA`/`WATERMARK_DELTA`.
    pub watermark: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            watermark: false,
        }
    }
}

impl SamplingParams {
    /// Proto defaults are zeros; zero means "unset" for the multiplicative parameters.
    pub fn normalised(mut self) -> Self {
        if self.temperature <= 0.0 {
            self.temperature = 1.0;
        }
        if self.top_p <= 0.0 || self.top_p > 1.0 {
            self.top_p = 1.0;
        }
        if self.typical_p <= 0.0 || self.typical_p > 1.0 {
            self.typical_p = 1.0;
        }
        if self.repetition_penalty <= 0.0 {
            self.repetition_penalty = 1.0;
        }
        self
    }

    fn has_warpers(&self) -> bool {
        self.temperature != 1.0 || self.top_k != 0 || self.top_p < 1.0 || self.typical_p < 1.0
    }

    /// Whether the request samples (TGI: `do_sample` or any warper set).
    pub fn sampling(&self) -> bool {
        self.do_sample || self.has_warpers()
    }
}

/// A request's parameters and its private random generator.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let params = params.normalised();
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }
}

/// The chosen token, its log-probability under the processed distribution, and the best
/// `top_n_tokens` alternatives (best first).
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The choices of a batch whose every row takes the plain argmax of its logits (no sampling,
/// no processor, no top-n, no grammar), read straight out of `logits` at `rows` by the CPU
/// kernel (one pass a row instead of a selected, widened and log-softmaxed copy); `None` where
/// a row asks for more, or the kernel does not apply, and `choose_batch` decides.
pub fn choose_greedy(logits: &Tensor, rows: &[i64], seqs: &[&mut Sequence]) -> Option<Vec<Choice>> {
    let plain = seqs.iter().all(|s| {
        let p = &s.sampler.params;
        !p.sampling()
            && p.repetition_penalty == 1.0
            && p.frequency_penalty == 0.0
            && p.presence_penalty == 0.0
            && !p.watermark
            && s.top_n_tokens == 0
            && s.constraint.is_none()
    });
    if !plain {
        return None;
    }
    let rows: Vec<usize> = rows
        .iter()
        .map(|&r| usize::try_from(r).ok())
        .collect::<Option<_>>()?;
    let choices = crate::kernels::greedy(logits, &rows)?;
    choices
        .into_iter()
        .map(|(token, logprob)| {
            Some(Choice {
                token: u32::try_from(token).ok()?,
                logprob,
                top: Vec::new(),
            })
        })
        .collect()
}

/// TGI's watermark constants (Kirchenbauer et al. 2023): the green list is the first
/// `gamma * vocab` entries of a permutation seeded by `HASH_KEY * previous token`.
const WATERMARK_HASH_KEY: i64 = 15_485_863;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The green-list mask `[vocab]` after `prev`, drawn from torch's CPU generator exactly as
/// TGI's `WatermarkLogitsProcessor` does, so TGI's detector recognises our text.
pub fn watermark_greenlist(prev: u32, vocab: i64, gamma: f64) -> Tensor {
    // The generator is libtorch's global one (tch has no per-call generators); nothing else in
    // the shard draws from it, and this lock keeps two green lists from interleaving.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(WATERMARK_HASH_KEY * prev as i64);
    let perm = Tensor::randperm(vocab, (Kind::Int64, Device::Cpu));
    let green = perm.narrow(0, 0, (vocab as f64 * gamma) as i64);
    Tensor::zeros([vocab], (Kind::Bool, Device::Cpu)).index_fill(0, &green, 1)
}

/// `[B, 1]` f32 column of one parameter per row.
fn column(values: &[f32], device: Device) -> Tensor {
    Tensor::from_slice(values).to_device(device).unsqueeze(1)
}

/// Token ids `[B, L]` padded with each row's first id (duplicates are harmless to
/// gather/scatter), and a `[B, L]` f32 mask of the real entries.
fn padded(rows: &[&[u32]], device: Device) -> (Tensor, Tensor) {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; rows.len() * width];
    let mut mask = vec![0f32; rows.len() * width];
    for (i, r) in rows.iter().enumerate() {
        let pad = r.first().copied().unwrap_or(0) as i64;
        for j in 0..width {
            ids[i * width + j] = r.get(j).map_or(pad, |&t| t as i64);
            mask[i * width + j] = if j < r.len() { 1.0 } else { 0.0 };
        }
    }
    let shape = [rows.len() as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    )
}

/// Masks everything outside, in descending-probability `order`, the smallest prefix whose mass
/// reaches `mass` (`[B, 1]`; rows with mass >= 1 keep everything). The first entry always stays.
fn keep_mass(scores: &Tensor, order: &Tensor, mass: &Tensor) -> Tensor {
    let sorted = scores.gather(1, order, false);
    let probs = sorted.softmax(-1, Kind::Float);
    let before = probs.cumsum(-1, Kind::Float) - &probs;
    let remove = before.ge_tensor(mass);
    let _ = remove.narrow(1, 0, 1).fill_(0);
    let remove = remove.scatter(1, order, &remove);
    scores.masked_fill(&remove, f64::NEG_INFINITY)
}

/// Picks the next token of every row of `scores` (`[B, vocab]` f32 logits) for `seqs`.
/// `banned` (`[B, vocab]` bool) marks the tokens a row's grammar rules out.
pub fn choose_batch(
    scores: &Tensor,
    seqs: &mut [&mut Sequence],
    banned: Option<&Tensor>,
) -> Result<Vec<Choice>> {
    let device = scores.device();
    let (b, vocab) = (scores.size()[0], scores.size()[1]);
    let params: Vec<SamplingParams> = seqs.iter().map(|s| s.sampler.params.clone()).collect();
    let any = |f: &dyn Fn(&SamplingParams) -> bool| params.iter().any(f);
    let col = |f: &dyn Fn(&SamplingParams) -> f32| {
        column(&params.iter().map(f).collect::<Vec<_>>(), device)
    };
    let mut scores = scores.to_kind(Kind::Float);

    if any(&|p| p.watermark) {
        let (gamma, delta) = (
            env_f64("WATERMARK_GAMMA", 0.5),
            env_f64("WATERMARK_DELTA", 2.0),
        );
        let mut bonus = Vec::with_capacity(seqs.len());
        for (s, p) in seqs.iter().zip(&params) {
            let row = match (p.watermark, s.tokens.last()) {
                (true, Some(&prev)) => {
                    watermark_greenlist(prev, vocab, gamma).to_kind(Kind::Float) * delta
                }
                _ => Tensor::zeros([vocab], (Kind::Float, Device::Cpu)),
            };
            bonus.push(row);
        }
        scores = scores + Tensor::stack(&bonus, 0).to_device(device);
    }
    let penalties = any(&|p| {
        p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0
    });
    if penalties {
        let history: Vec<&[u32]> = seqs.iter().map(|s| s.tokens.as_slice()).collect();
        let (ids, mask) = padded(&history, device);
        if any(&|p| p.repetition_penalty != 1.0) {
            let pen = col(&|p| p.repetition_penalty);
            let seen = scores.gather(1, &ids, false);
            let seen = (&seen * &pen).where_self(&seen.lt(0.0), &(&seen / &pen));
            scores = scores.scatter(1, &ids, &seen);
        }
        if any(&|p| p.frequency_penalty != 0.0) {
            let counts =
                Tensor::zeros([b, vocab], (Kind::Float, device)).scatter_add(1, &ids, &mask);
            scores = scores - counts * col(&|p| p.frequency_penalty);
        }
        if any(&|p| p.presence_penalty != 0.0) {
            // As OpenAI defines it: once per distinct token generated so far (prompt excluded).
            let generated: Vec<&[u32]> = seqs.iter().map(|s| s.generated_ids()).collect();
            let (ids, mask) = padded(&generated, device);
            let present = Tensor::zeros([b, vocab], (Kind::Float, device))
                .scatter_add(1, &ids, &mask)
                .gt(0.0)
                .to_kind(Kind::Float);
            scores = scores - present * col(&|p| p.presence_penalty);
        }
    }
    if let Some(banned) = banned {
        // After the penalties and before the warpers (TGI's place for grammars), so top-k,
        // top-p and typical-p pick among the tokens the grammar allows.
        scores = scores.masked_fill(banned, f64::NEG_INFINITY);
    }
    let sampling: Vec<bool> = params.iter().map(SamplingParams::sampling).collect();
    if any(&|p| p.sampling() && p.temperature != 1.0) {
        scores = scores / col(&|p| if p.sampling() { p.temperature } else { 1.0 });
    }
    if any(&|p| p.sampling() && p.top_k > 0) {
        let k_of = |p: &SamplingParams| match p.top_k as i64 {
            k if p.sampling() && k > 0 => k.min(vocab),
            _ => 0,
        };
        let kmax = params.iter().map(k_of).max().unwrap_or(1);
        let (top, _) = scores.topk(kmax, -1, true, true);
        let idx: Vec<i64> = params.iter().map(|p| (k_of(p) - 1).max(0)).collect();
        let kth = top.gather(
            1,
            &Tensor::from_slice(&idx).to_device(device).unsqueeze(1),
            false,
        );
        let off: Vec<bool> = params.iter().map(|p| k_of(p) == 0).collect();
        let kth = kth.masked_fill(
            &Tensor::from_slice(&off).to_device(device).unsqueeze(1),
            f64::NEG_INFINITY,
        );
        scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if any(&|p| p.sampling() && p.top_p < 1.0) {
        let mass = col(&|p| {
            if p.sampling() && p.top_p < 1.0 {
                p.top_p
            } else {
                2.0
            }
        });
        let order = scores.argsort(-1, true);
        scores = keep_mass(&scores, &order, &mass);
    }
    if any(&|p| p.sampling() && p.typical_p < 1.0) {
        // Locally typical sampling (Meister et al.): tokens whose surprisal is closest to the
        // entropy, until their mass reaches typical_p.
        let mass = col(&|p| {
            if p.sampling() && p.typical_p < 1.0 {
                p.typical_p
            } else {
                2.0
            }
        });
        let logp = scores.log_softmax(-1, Kind::Float);
        let p = logp.exp();
        let entropy =
            -(logp.nan_to_num(0.0, None, None) * &p).sum_dim_intlist(-1, true, Kind::Float);
        let distance = (-&logp - entropy)
            .abs()
            .nan_to_num(f64::INFINITY, None, None);
        let order = distance.argsort(-1, false);
        scores = keep_mass(&scores, &order, &mass);
    }
    let logprobs = scores.log_softmax(-1, Kind::Float);
    let greedy = logprobs.argmax(-1, false);
    let tokens = if sampling.iter().any(|&s| s) {
        let uniforms: Vec<f64> = seqs
            .iter_mut()
            .zip(&sampling)
            .map(|(s, &on)| {
                if on {
                    s.sampler.rng.random::<f64>()
                } else {
                    0.0
                }
            })
            .collect();
        let cdf = logprobs.exp().cumsum(-1, Kind::Double);
        let total = cdf.narrow(1, vocab - 1, 1);
        let target = Tensor::from_slice(&uniforms).to_device(device).unsqueeze(1) * total;
        let drawn = cdf
            .lt_tensor(&target)
            .sum_dim_intlist(-1, false, Kind::Int64)
            .clamp_max(vocab - 1);
        drawn.where_self(&Tensor::from_slice(&sampling).to_device(device), &greedy)
    } else {
        greedy
    };
    let chosen = logprobs
        .gather(1, &tokens.unsqueeze(1), false)
        .squeeze_dim(1);
    let max_n = seqs
        .iter()
        .map(|s| s.top_n_tokens)
        .max()
        .unwrap_or(0)
        .min(vocab as usize);
    let top = if max_n > 0 {
        Some(top_n(&logprobs, max_n)?)
    } else {
        None
    };
    let tokens = Vec::<i64>::try_from(tokens.to_device(Device::Cpu))?;
    let chosen = Vec::<f32>::try_from(chosen.to_device(Device::Cpu))?;
    Ok((0..b as usize)
        .map(|r| Choice {
            token: tokens[r] as u32,
            logprob: chosen[r],
            top: match &top {
                Some((v, i)) => (0..seqs[r].top_n_tokens)
                    .map(|j| (i[r * max_n + j] as u32, v[r * max_n + j]))
                    .collect(),
                None => Vec::new(),
            },
        })
        .collect())
}

/// The `n` best `(logprob, id)` of each row, flattened row by row, best first and, among equal
/// logprobs, lowest id first. That is the order `argmax` breaks ties in, so a greedy token is
/// always its row's first alternative; `topk` alone orders ties arbitrarily, and bf16 logits
/// tie often.
fn top_n(logprobs: &Tensor, n: usize) -> Result<(Vec<f32>, Vec<i64>)> {
    let (v, i) = logprobs.topk(n as i64, -1, true, true);
    let mut values = Vec::<f32>::try_from(v.to_device(Device::Cpu).reshape([-1]))?;
    let mut ids = Vec::<i64>::try_from(i.to_device(Device::Cpu).reshape([-1]))?;
    // Every entry tied with a row's n-th value competes for the last places, including those
    // `topk` left out. A huge tie (a grammar mask leaves -inf everywhere) keeps `topk`'s pick.
    let last = v.narrow(1, n as i64 - 1, 1);
    let tied = logprobs.eq_tensor(&last);
    let rows = values.len() / n;
    if tied.sum(Kind::Int64).int64_value(&[]) > (rows * (n + 64)) as i64 {
        return Ok((values, ids));
    }
    let mask = logprobs.ge_tensor(&last);
    // `masked_select` lists values in the row-major order `nonzero` lists positions in.
    let at = Vec::<i64>::try_from(mask.nonzero().to_device(Device::Cpu).reshape([-1]))?;
    let picked = Vec::<f32>::try_from(logprobs.masked_select(&mask).to_device(Device::Cpu))?;
    let mut row_entries: Vec<Vec<(f32, i64)>> = vec![Vec::new(); rows];
    for (pair, &value) in at.chunks_exact(2).zip(&picked) {
        row_entries[pair[0] as usize].push((value, pair[1]));
    }
    for (r, mut entries) in row_entries.into_iter().enumerate() {
        entries.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (j, (value, id)) in entries.into_iter().take(n).enumerate() {
            values[r * n + j] = value;
            ids[r * n + j] = id;
        }
    }
    Ok((values, ids))
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
