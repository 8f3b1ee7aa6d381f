//! Next-token choice for one request: logit processors, then greedy or seeded sampling.
//!
//! The order follows TGI (and transformers): repetition penalty, frequency penalty, then the
//! warpers temperature, top-k, top-p and typical-p. As in TGI, setting any warper implies
//! sampling. Work happens on one row of f32 logits in plain Rust: a vocabulary row is a few
//! hundred KB, and a per-request seeded RNG is what makes sampled output reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// The chosen token and its log-probability under the processed distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: f32,
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

    /// Processes `scores` in place (they become log-probabilities) and picks the next token.
    /// `history` is every token of the sequence so far, the prompt's `prompt_len` first.
    pub fn choose(&mut self, scores: &mut [f32], history: &[u32], prompt_len: usize) -> Choice {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s < 0.0 {
                        *s * p.repetition_penalty
                    } else {
                        *s / p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 {
            for &t in history {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s -= p.frequency_penalty;
                }
            }
        }
        if p.presence_penalty != 0.0 {
            // As OpenAI defines it: once per distinct token sampled so far (the prompt excluded).
            let mut generated = history.get(prompt_len..).unwrap_or_default().to_vec();
            generated.sort_unstable();
            generated.dedup();
            for t in generated {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s -= p.presence_penalty;
                }
            }
        }
        let sampling = p.sampling();
        if sampling {
            if p.temperature != 1.0 {
                scores.iter_mut().for_each(|s| *s /= p.temperature);
            }
            if p.top_k > 0 && (p.top_k as usize) < scores.len() {
                top_k_filter(scores, p.top_k as usize);
            }
            if p.top_p < 1.0 {
                top_p_filter(scores, p.top_p);
            }
            if p.typical_p < 1.0 {
                typical_filter(scores, p.typical_p);
            }
        }
        log_softmax(scores);
        let token = if sampling {
            self.sample(scores)
        } else {
            argmax(scores)
        };
        Choice {
            token: token as u32,
            logprob: scores[token],
        }
    }

    fn sample(&mut self, logprobs: &[f32]) -> usize {
        let u: f64 = self.rng.random();
        let mut acc = 0.0f64;
        let mut last = 0;
        for (i, lp) in logprobs.iter().enumerate() {
            if *lp == f32::NEG_INFINITY {
                continue;
            }
            acc += (*lp as f64).exp();
            last = i;
            if u < acc {
                return i;
            }
        }
        last
    }
}

pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best
}

pub fn log_softmax(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = xs.iter().map(|x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    xs.iter_mut().for_each(|x| *x -= lse);
}

/// The `n` best `(token, logprob)` pairs, best first.
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |a, b| logprobs[*b].total_cmp(&logprobs[*a]));
    idx.truncate(n);
    idx.sort_by(|a, b| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b)));
    idx.into_iter().map(|i| (i as u32, logprobs[i])).collect()
}

fn top_k_filter(scores: &mut [f32], k: usize) {
    let mut sorted = scores.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    scores
        .iter_mut()
        .filter(|s| **s < kth)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// Indices sorted by descending score, with their probabilities.
fn sorted_probs(scores: &[f32]) -> (Vec<usize>, Vec<f64>) {
    let mut idx: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i] != f32::NEG_INFINITY)
        .collect();
    idx.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let max = idx.first().map(|&i| scores[i]).unwrap_or(0.0);
    let exps: Vec<f64> = idx
        .iter()
        .map(|&i| ((scores[i] - max) as f64).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    (idx, exps.into_iter().map(|e| e / sum).collect())
}

/// Keeps the smallest set of top tokens whose mass reaches `top_p` (always at least one).
fn top_p_filter(scores: &mut [f32], top_p: f32) {
    let (idx, probs) = sorted_probs(scores);
    let mut acc = 0.0;
    for (rank, (&i, p)) in idx.iter().zip(&probs).enumerate() {
        if rank > 0 && acc >= top_p as f64 {
            scores[i] = f32::NEG_INFINITY;
        }
        acc += p;
    }
}

/// Locally typical sampling (Meister et al.): keeps the tokens whose surprisal is closest to the
/// entropy until their mass reaches `typical_p`.
fn typical_filter(scores: &mut [f32], typical_p: f32) {
    let (idx, probs) = sorted_probs(scores);
    let entropy: f64 = -probs
        .iter()
        .filter(|p| **p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f64>();
    let mut order: Vec<usize> = (0..idx.len()).collect();
    order.sort_by(|a, b| {
        let da = (-probs[*a].ln() - entropy).abs();
        let db = (-probs[*b].ln() - entropy).abs();
        da.total_cmp(&db)
    });
    let mut acc = 0.0;
    for (rank, &o) in order.iter().enumerate() {
        if rank > 0 && acc >= typical_p as f64 {
            scores[idx[o]] = f32::NEG_INFINITY;
        }
        acc += probs[o];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_picks_argmax_with_its_logprob() {
        let mut s = Sampler::new(params());
        let mut x = vec![0.0, 2.0, 1.0];
        let c = s.choose(&mut x, &[], 0);
        assert_eq!(c.token, 1);
        let expected = 2.0 - (1.0f32 + 2.0f32.exp() + 1.0f32.exp()).ln();
        assert!((c.logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params()
        });
        // token 0 (positive, seen) is divided, token 2 (negative, seen) is multiplied.
        let mut x = vec![3.0, 2.0, -1.0];
        let c = s.choose(&mut x, &[0, 2, 0], 0);
        assert_eq!(c.token, 1);
    }

    #[test]
    fn same_seed_same_samples_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                do_sample: true,
                seed,
                ..params()
            });
            (0..20)
                .map(|_| s.choose(&mut logits.clone(), &[], 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            seed: 3,
            ..params()
        });
        assert_eq!(
            s.choose(&mut logits.clone(), &[], 0).token as usize,
            argmax(&logits)
        );
    }

    #[test]
    fn presence_penalty_counts_generated_tokens_once() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.0,
            ..params()
        });
        // Token 0 is in the prompt only (not penalised); token 1 was generated twice (penalised once).
        let mut x = vec![2.0, 2.5, 1.2];
        assert_eq!(s.choose(&mut x, &[0, 1, 1], 1).token, 0);
        let mut x = vec![2.0, 2.5, 1.2];
        assert_eq!(s.choose(&mut x, &[0, 1, 1], 3).token, 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        let mut x = vec![(0.5f32).ln(), (0.3f32).ln(), (0.15f32).ln(), (0.05f32).ln()];
        top_p_filter(&mut x, 0.7);
        assert!(x[0].is_finite() && x[1].is_finite());
        assert_eq!(x[2], f32::NEG_INFINITY);
        assert_eq!(x[3], f32::NEG_INFINITY);
    }

    #[test]
    fn top_n_is_sorted() {
        let v = top_n(&[-3.0, -0.5, -2.0, -1.0], 3);
        assert_eq!(v.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
    }
}
