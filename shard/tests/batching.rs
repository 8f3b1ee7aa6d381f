//! The v3 batch protocol against transformers' greedy references: requests joining a running
//! batch (Prefill with `cached_batch`) and leaving it (FilterBatch), batches concatenated by
//! Decode, prompts whose prefix is already cached (`cache_len`), and prompts prefilled in
//! chunks (`chunk_len`). In every case each request must produce exactly the tokens it
//! produces alone, which are transformers' tokens.

mod common;

use common::*;
use tessera_proto as pb;

/// Every architecture; the RoPE-scaling variants of Llama batch exactly as Llama does.
fn model_set() -> impl Iterator<Item = &'static str> {
    MODELS.iter().copied().filter(|m| !m.ends_with("rope"))
}

fn greedy(case: &serde_json::Value) -> Vec<u32> {
    ids(&case["greedy"]["ids"])
}

#[test]
fn requests_join_and_leave_between_steps() {
    for model in model_set() {
        let r = refs(model);
        let cases = cases(&r);
        let n = cases.len() as u64;
        let mut runner = load(model, "float32", 256);
        let mut blocks = Blocks::default();
        let mut req = |i: u64| request(i, &cases[i as usize], 12, &mut blocks);
        let mut out = Outputs::default();
        let first: Vec<_> = (0..n / 2).map(&mut req).collect();
        let step = runner.prefill(&batch(1, first), None).unwrap();
        out.add(&step.generations);
        let mut cached = step.batch;
        for _ in 0..3 {
            let step = runner.decode(&[cached.unwrap()]).unwrap();
            out.add(&step.generations);
            cached = step.batch;
        }
        // New requests join: their prefill and the running decode in one forward pass.
        let joining: Vec<_> = (n / 2..n - 2).map(&mut req).collect();
        let step = runner.prefill(&batch(2, joining), cached.as_ref()).unwrap();
        out.add(&step.generations);
        let running = step.batch.unwrap();
        assert_eq!(running.size as u64, n - 2, "{model}");
        // Request 1 is cancelled: it leaves the batch.
        let keep: Vec<u64> = running
            .request_ids
            .iter()
            .copied()
            .filter(|&i| i != 1)
            .collect();
        let running = runner.filter(running.id, &keep).unwrap().unwrap();
        assert!(!running.request_ids.contains(&1));
        // Two more arrive in a batch of their own, then Decode concatenates both batches.
        let last: Vec<_> = (n - 2..n).map(&mut req).collect();
        let step = runner.prefill(&batch(3, last), None).unwrap();
        out.add(&step.generations);
        let step = runner.decode(&[running, step.batch.unwrap()]).unwrap();
        out.add(&step.generations);
        run_to_end(&mut runner, step.batch, &mut out);
        for (i, c) in cases.iter().enumerate() {
            let want = &greedy(c)[..12];
            let got = out.get(i as u64);
            if i == 1 {
                assert_eq!(
                    got,
                    &want[..got.len()],
                    "{model}: cancelled request's prefix"
                );
                assert!(got.len() < 12);
            } else {
                assert_eq!(got, want, "{model}: request {i} ({:?})", c["prompt"]);
            }
        }
    }
}

#[test]
fn cached_prefix_is_read_from_the_pool_not_recomputed() {
    for model in model_set() {
        let r = refs(model);
        let cases = cases(&r);
        let (long, other) = {
            let mut by_len: Vec<usize> = (0..cases.len()).collect();
            by_len.sort_by_key(|&i| ids(&cases[i]["input_ids"]).len());
            (by_len[by_len.len() - 1], by_len[by_len.len() - 2])
        };
        let prompt_len = ids(&cases[long]["input_ids"]).len();
        assert!(
            prompt_len > 2 * BLOCK,
            "{model}: need a prompt longer than two blocks"
        );
        let mut runner = load(model, "float32", 64);
        let mut blocks = Blocks::default();
        // The first run fills its blocks; its first two blocks hold the prompt's first 32 tokens.
        let a = request(0, &cases[long], 8, &mut blocks);
        let prefix = a.blocks[..2].to_vec();
        let out = generate(&mut runner, vec![a]);
        assert_eq!(out.get(0), &greedy(&cases[long])[..8]);
        // A second request reuses them with cache_len = 32: only the suffix is computed.
        let mut b = request(1, &cases[long], 8, &mut blocks);
        b.blocks.splice(..2, prefix.iter().copied());
        b.cache_len = 2 * BLOCK as u32;
        let out = generate(&mut runner, vec![b.clone()]);
        assert_eq!(
            out.get(1),
            &greedy(&cases[long])[..8],
            "{model}: with cache_len"
        );
        // Proof that the prefix really comes from the pool: blocks holding another prompt's
        // keys change the answer.
        let c = request(2, &cases[other], 4, &mut blocks);
        let foreign = c.blocks[..2].to_vec();
        generate(&mut runner, vec![c]);
        let mut d = b.clone();
        d.id = 3;
        d.blocks.splice(..2, foreign);
        let out = generate(&mut runner, vec![d]);
        assert_ne!(
            out.get(3),
            &greedy(&cases[long])[..8],
            "{model}: foreign prefix"
        );
    }
}

#[test]
fn prompt_prefilled_in_three_chunks() {
    for model in model_set() {
        let r = refs(model);
        let cases = cases(&r);
        let long = (0..cases.len())
            .max_by_key(|&i| ids(&cases[i]["input_ids"]).len())
            .unwrap();
        let prompt_len = ids(&cases[long]["input_ids"]).len();
        let chunk = prompt_len.div_ceil(3);
        let mut runner = load(model, "float32", 64);
        runner.set_max_prefill_tokens(chunk);
        let mut blocks = Blocks::default();
        let req = pb::Request {
            chunk_len: Some(chunk as u32),
            prefill_logprobs: true,
            ..request(0, &cases[long], 10, &mut blocks)
        };
        let mut out = Outputs::default();
        let step = runner.prefill(&batch(1, vec![req]), None).unwrap();
        assert!(
            step.generations.is_empty(),
            "{model}: chunk 1 yields nothing"
        );
        let cached = step.batch.unwrap();
        assert_eq!(
            cached.current_tokens as usize, chunk,
            "{model}: next chunk size"
        );
        let step = runner.decode(&[cached]).unwrap();
        assert!(
            step.generations.is_empty(),
            "{model}: chunk 2 yields nothing"
        );
        let step = runner.decode(&[step.batch.unwrap()]).unwrap();
        assert_eq!(
            step.generations.len(),
            1,
            "{model}: chunk 3 yields the first token"
        );
        let logprobs = &step.generations[0]
            .prefill_tokens
            .as_ref()
            .unwrap()
            .logprobs;
        let want = cases[long]["prompt_logprobs"].as_array().unwrap();
        assert_eq!(logprobs.len(), prompt_len);
        for (got, want) in logprobs.iter().zip(want).skip(1) {
            let want = want.as_f64().unwrap();
            assert!(
                (*got as f64 - want).abs() < 1e-4,
                "{model}: {got} vs {want}"
            );
        }
        out.add(&step.generations);
        run_to_end(&mut runner, step.batch, &mut out);
        assert_eq!(out.get(0), &greedy(&cases[long])[..10], "{model}");

        // The same prompt chunked while another request decodes: every step runs the chunk
        // and the decode in one forward pass, and neither output changes.
        let short = 0;
        let mut out = Outputs::default();
        let step = runner
            .prefill(
                &batch(2, vec![request(1, &cases[short], 10, &mut blocks)]),
                None,
            )
            .unwrap();
        out.add(&step.generations);
        let req = pb::Request {
            chunk_len: Some(chunk as u32),
            ..request(2, &cases[long], 10, &mut blocks)
        };
        let step = runner
            .prefill(&batch(3, vec![req]), step.batch.as_ref())
            .unwrap();
        out.add(&step.generations);
        assert_eq!(
            out.get(1).len(),
            2,
            "{model}: the decode advanced with the chunk"
        );
        run_to_end(&mut runner, step.batch, &mut out);
        assert_eq!(out.get(1), &greedy(&cases[short])[..10], "{model}: decode");
        assert_eq!(out.get(2), &greedy(&cases[long])[..10], "{model}: chunked");
    }
}

/// A seeded sampling request gives byte-identical text alone and in a batch of 8 (with other
/// prompts, greedy and sampled neighbours): its random numbers come from its own generator.
#[test]
fn seeded_sampling_is_identical_alone_and_in_a_batch_of_8() {
    for model in model_set() {
        let r = refs(model);
        let cases = cases(&r);
        let mut runner = load(model, "float32", 512);
        let mut blocks = Blocks::default();
        let sampled =
            |id: u64, case: &serde_json::Value, seed: u64, blocks: &mut Blocks| pb::Request {
                parameters: Some(pb::NextTokenChooserParameters {
                    temperature: 0.8,
                    top_k: 40,
                    top_p: 0.95,
                    do_sample: true,
                    seed,
                    repetition_penalty: 1.1,
                    ..Default::default()
                }),
                ..request(id, case, 24, blocks)
            };
        let text = |runner: &mut tessera_shard::Runner, requests: Vec<pb::Request>, id: u64| {
            let mut out = Outputs::default();
            let step = runner.prefill(&batch(id, requests), None).unwrap();
            out.add(&step.generations);
            run_to_end(runner, step.batch, &mut out);
            let ids = out.get(0).to_vec();
            runner.tokenizer.decode(&ids, false).unwrap()
        };
        let alone = text(&mut runner, vec![sampled(0, &cases[3], 7, &mut blocks)], 1);
        let mut crowd = vec![sampled(0, &cases[3], 7, &mut blocks)];
        for i in 1..8u64 {
            let case = &cases[(i as usize * 3) % cases.len()];
            crowd.push(if i % 2 == 0 {
                request(i, case, 10 + i as u32, &mut blocks)
            } else {
                sampled(i, case, 100 + i, &mut blocks)
            });
        }
        let together = text(&mut runner, crowd, 2);
        assert_eq!(alone, together, "{model}");
    }
}

/// Regression: when a prefill joins running decodes, the step's rows start with the new prompt,
/// not with the batch's first sequence. Each row must still get its own sampling parameters,
/// random generator and `top_n_tokens`.
#[test]
fn sampled_request_keeps_its_parameters_when_others_join() {
    let model = "tiny-llama";
    let r = refs(model);
    let cases = cases(&r);
    let mut runner = load(model, "float32", 256);
    let mut blocks = Blocks::default();
    let sampled = |blocks: &mut Blocks| pb::Request {
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: 0.7,
            do_sample: true,
            seed: 11,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        top_n_tokens: 3,
        ..request(0, &cases[3], 12, blocks)
    };
    let alone = generate(&mut runner, vec![sampled(&mut blocks)])
        .get(0)
        .to_vec();
    let mut out = Outputs::default();
    let step = runner
        .prefill(&batch(1, vec![sampled(&mut blocks)]), None)
        .unwrap();
    out.add(&step.generations);
    let step = runner.decode(&[step.batch.unwrap()]).unwrap();
    out.add(&step.generations);
    let joining = batch(2, vec![request(1, &cases[1], 6, &mut blocks)]);
    let step = runner.prefill(&joining, step.batch.as_ref()).unwrap();
    out.add(&step.generations);
    run_to_end(&mut runner, step.batch, &mut out);
    assert_eq!(out.get(0), alone.as_slice());
    assert_eq!(out.get(1), &greedy(&cases[1])[..6]);
}
