use super::*;
use crate::detokenizer::{IncrementalDecoder, StoppingCriteria};

fn seq(tokens: &[u32], prompt_len: usize, params: SamplingParams, top_n: usize) -> Sequence {
    Sequence {
        id: 0,
        tokens: tokens.to_vec(),
        prompt_len,
        max_new_tokens: 16,
        sampler: Sampler::new(params),
        constraint: None,
        stopping: StoppingCriteria::new(16, Vec::new(), false),
        decoder: IncrementalDecoder::new(prompt_len),
        top_n_tokens: top_n,
        prefill_logprobs: false,
        prompt_logprobs: Vec::new(),
        slots: Vec::new(),
        cached: 0,
        chunk: 1,
        finished: None,
    }
}

fn choose(logits: &[f32], seqs: &mut [Sequence]) -> Vec<Choice> {
    let v = logits.len() as i64;
    let rows: Vec<f32> = (0..seqs.len())
        .flat_map(|_| logits.iter().copied())
        .collect();
    let scores = Tensor::from_slice(&rows).view([seqs.len() as i64, v]);
    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
    choose_batch(&scores, &mut refs, None).unwrap()
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        do_sample: true,
        seed,
        ..Default::default()
    }
}

#[test]
fn greedy_picks_argmax_with_its_logprob_and_top_n_is_sorted() {
    let mut s = [seq(&[0], 1, SamplingParams::default(), 3)];
    let c = &choose(&[0.0, 2.0, 1.0, -1.0], &mut s)[0];
    assert_eq!(c.token, 1);
    let lse = (1.0f32 + 2.0f32.exp() + 1.0f32.exp() + (-1.0f32).exp()).ln();
    assert!((c.logprob - (2.0 - lse)).abs() < 1e-6);
    let ids: Vec<u32> = c.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![1, 2, 0]);
    assert!(c.top.windows(2).all(|w| w[0].1 >= w[1].1));
}

#[test]
fn repetition_penalty_follows_transformers() {
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..Default::default()
    };
    // token 0 (positive, seen) is divided: 3 -> 1.5 < 2; token 2 (negative, seen) is multiplied.
    let mut s = [seq(&[0, 2, 0], 3, p, 0)];
    assert_eq!(choose(&[3.0, 2.0, -1.0], &mut s)[0].token, 1);
}

#[test]
fn frequency_and_presence_penalties() {
    let p = SamplingParams {
        frequency_penalty: 0.4,
        ..Default::default()
    };
    // Token 1 appears twice (-0.8): 2.5 -> 1.7 < 2.0.
    let mut s = [seq(&[1, 1], 2, p, 0)];
    assert_eq!(choose(&[2.0, 2.5, 1.2], &mut s)[0].token, 0);
    let p = SamplingParams {
        presence_penalty: 1.0,
        ..Default::default()
    };
    // Token 1 in the prompt only: not penalised. Generated twice: penalised once.
    let mut s = [seq(&[0, 1, 1], 3, p.clone(), 0)];
    assert_eq!(choose(&[2.0, 2.5, 1.2], &mut s)[0].token, 1);
    let mut s = [seq(&[0, 1, 1], 1, p, 0)];
    assert_eq!(choose(&[2.0, 2.5, 1.2], &mut s)[0].token, 0);
}

#[test]
fn same_seed_same_samples_whatever_the_batch() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let alone = |seed| {
        let mut s = [seq(&[0], 1, sampling(seed), 0)];
        (0..20)
            .map(|_| choose(&logits, &mut s)[0].token)
            .collect::<Vec<_>>()
    };
    assert_eq!(alone(7), alone(7));
    assert_ne!(alone(7), alone(8));
    // The same request in row 1 of a batch with a greedy and another sampled neighbour.
    let mut batch = [
        seq(&[0], 1, SamplingParams::default(), 0),
        seq(&[0], 1, sampling(7), 0),
        seq(&[0], 1, sampling(99), 0),
    ];
    let in_batch: Vec<u32> = (0..20)
        .map(|_| choose(&logits, &mut batch)[1].token)
        .collect();
    assert_eq!(in_batch, alone(7));
}

#[test]
fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
    // Distinct values (no ties at the top): 37 is invertible mod 50.
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 * 0.1).collect();
    let best = (0..50)
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap() as u32;
    let p = SamplingParams {
        top_k: 1,
        seed: 3,
        ..Default::default()
    };
    assert_eq!(choose(&logits, &mut [seq(&[0], 1, p, 0)])[0].token, best);
    let nucleus = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
    for seed in 0..40 {
        let p = SamplingParams {
            top_p: 0.7,
            seed,
            ..Default::default()
        };
        let c = &choose(&nucleus, &mut [seq(&[0], 1, p, 0)])[0];
        assert!(c.token < 2, "seed {seed} drew {}", c.token);
    }
}

#[test]
fn typical_p_drops_the_least_typical_tokens() {
    // Entropy of (0.5, 0.3, 0.15, 0.05) is ~1.14 nats; surprisals 0.69, 1.20, 1.90, 3.0.
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
    for seed in 0..40 {
        let p = SamplingParams {
            typical_p: 0.5,
            seed,
            ..Default::default()
        };
        let c = &choose(&logits, &mut [seq(&[0], 1, p, 0)])[0];
        assert!(c.token < 2, "seed {seed} drew {}", c.token);
    }
}

#[test]
fn watermark_greenlist_is_torchs_permutation() {
    // torch.randperm(4096, generator=torch.Generator().manual_seed(15485863 * 7))[:8]
    let mask = watermark_greenlist(7, 4096, 0.5);
    assert_eq!(mask.sum(Kind::Int64).int64_value(&[]), 2048);
    for id in [4089, 1323, 3398, 1073, 3798, 3275, 1120, 3717] {
        assert!(mask.int64_value(&[id]) == 1, "{id} should be green");
    }
    // A flat distribution with the watermark on picks a green token greedily.
    let p = SamplingParams {
        watermark: true,
        ..Default::default()
    };
    let c = &choose(&vec![0.0; 4096], &mut [seq(&[7], 1, p, 0)])[0];
    assert_eq!(mask.int64_value(&[c.token as i64]), 1);
}

#[test]
fn ties_order_top_n_by_id_so_greedy_comes_first() {
    // Tokens 1 and 3 tie for best, 0 and 2 tie for next: ordered by id, as argmax breaks ties.
    for n in [1, 2, 3, 4] {
        let mut s = [seq(&[0], 1, SamplingParams::default(), n)];
        let c = &choose(&[0.5, 2.0, 0.5, 2.0], &mut s)[0];
        assert_eq!(c.token, 1);
        let ids: Vec<u32> = c.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0, 2][..n].to_vec(), "top {n}");
    }
}

#[test]
fn plain_greedy_rows_take_the_kernel_with_the_tensor_path_s_answer() {
    // 4 rows of 300 logits; rows picked out of order, as a batch's sampling rows can be.
    let logits = (Tensor::arange(1_200, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .view([4, 300])
        * 5.0;
    let rows = [3i64, 0, 2];
    let mut plain: Vec<Sequence> = (0..3)
        .map(|_| seq(&[0], 1, SamplingParams::default(), 0))
        .collect();
    let refs: Vec<&mut Sequence> = plain.iter_mut().collect();
    let Some(fast) = choose_greedy(&logits, &rows, &refs) else {
        eprintln!("skipping: no kernel for this CPU");
        return;
    };
    let mut refs: Vec<&mut Sequence> = plain.iter_mut().collect();
    let scores = logits.index_select(0, &Tensor::from_slice(&rows));
    let slow = choose_batch(&scores, &mut refs, None).unwrap();
    for (f, s) in fast.iter().zip(&slow) {
        assert_eq!(f.token, s.token);
        assert!(
            (f.logprob - s.logprob).abs() < 1e-5,
            "{} against {}",
            f.logprob,
            s.logprob
        );
        assert!(f.top.is_empty());
    }
    // A row that asks for anything else sends the whole batch down the tensor path.
    let others = [
        seq(&[0], 1, SamplingParams::default(), 2),
        seq(&[0], 1, sampling(7), 0),
        seq(
            &[0],
            1,
            SamplingParams {
                repetition_penalty: 1.3,
                ..Default::default()
            },
            0,
        ),
        seq(
            &[0],
            1,
            SamplingParams {
                watermark: true,
                ..Default::default()
            },
            0,
        ),
    ];
    for other in others {
        let mut batch = vec![seq(&[0], 1, SamplingParams::default(), 0), other];
        let refs: Vec<&mut Sequence> = batch.iter_mut().collect();
        assert!(choose_greedy(&logits, &[0, 1], &refs).is_none());
    }
}
