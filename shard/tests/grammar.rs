//! Structured output in the shard, on a tiny random checkpoint (whose unconstrained output is
//! noise): whatever the seed, the output matches the request's regex, ends complete even when
//! the token budget is tight, and leaves unconstrained neighbours in the batch untouched.

mod common;

use common::*;
use tessera_proto as pb;

const MODEL: &str = "tiny-llama";

fn constrained(
    id: u64,
    case: &serde_json::Value,
    regex: &str,
    max_new: u32,
    seed: u64,
    blocks: &mut Blocks,
) -> pb::Request {
    let mut r = request(id, case, max_new, blocks);
    r.parameters = Some(pb::NextTokenChooserParameters {
        do_sample: seed > 0,
        temperature: 1.0,
        seed,
        repetition_penalty: 1.0,
        grammar: regex.into(),
        grammar_type: pb::GrammarType::Regex as i32,
        ..Default::default()
    });
    if let Some(s) = r.stopping_parameters.as_mut() {
        s.ignore_eos_token = false;
    }
    r
}

/// Runs one batch to the end: per request, its text and finish reason.
fn finished(
    runner: &mut tessera_shard::Runner,
    requests: Vec<pb::Request>,
) -> Vec<(u64, String, i32, Vec<u32>)> {
    let mut done = Vec::new();
    let mut ids: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    let mut step = runner.prefill(&batch(1, requests), None).expect("prefill");
    loop {
        for g in &step.generations {
            ids.entry(g.request_id)
                .or_default()
                .extend(&g.tokens.as_ref().expect("tokens").ids);
            if let Some(t) = &g.generated_text {
                done.push((
                    g.request_id,
                    t.text.clone(),
                    t.finish_reason,
                    ids[&g.request_id].clone(),
                ));
            }
        }
        match step.batch {
            Some(b) => step = runner.decode(&[b]).expect("decode"),
            None => break,
        }
    }
    done.sort_by_key(|d| d.0);
    done
}

fn full_match(regex: &str, text: &str) -> bool {
    regex::Regex::new(&format!("^(?:{regex})$"))
        .expect("regex")
        .is_match(text)
}

#[test]
fn output_matches_its_regex_whatever_the_seed() {
    let r = refs(MODEL);
    let cases = cases(&r);
    let mut runner = load(MODEL, "float32", 1024);
    let regexes = [
        r"[0-9]{3}-[0-9]{4}",
        r"(yes|no|maybe)",
        r#"\{"a": (0|[1-9][0-9]{0,5}), "b": "[a-z ]{0,12}"\}"#,
        r"[A-Z][a-z]+( [A-Z][a-z]+){0,3}\.",
        r"(0|[1-9][0-9]*)(\.[0-9]+)?",
    ];
    let mut blocks = Blocks::default();
    let mut requests = Vec::new();
    for (i, re) in regexes.iter().enumerate() {
        for seed in 0..3u64 {
            let id = (i * 3) as u64 + seed;
            let case = &cases[id as usize % cases.len()];
            requests.push(constrained(id, case, re, 40, seed, &mut blocks));
        }
    }
    let out = finished(&mut runner, requests);
    assert_eq!(out.len(), regexes.len() * 3);
    for (id, text, finish, _) in out {
        let re = regexes[id as usize / 3];
        assert!(full_match(re, &text), "{re} vs {text:?}");
        // `length` where the budget had to close a run-on word.
        let ends = [
            pb::FinishReason::EosToken as i32,
            pb::FinishReason::Length as i32,
        ];
        assert!(ends.contains(&finish), "{re} vs {text:?}");
    }
}

#[test]
fn a_tight_budget_still_ends_in_an_accepted_output() {
    let r = refs(MODEL);
    let cases = cases(&r);
    let mut runner = load(MODEL, "float32", 256);
    let mut blocks = Blocks::default();
    // Random weights rarely close a free-text string on their own.
    let re = r#"\["[a-z ]*"(, "[a-z ]*")*\]"#;
    let requests = (0..4u64)
        .map(|seed| constrained(seed, &cases[0], re, 6 + seed as u32, seed, &mut blocks))
        .collect();
    for (id, text, finish, tokens) in finished(&mut runner, requests) {
        assert!(full_match(re, &text), "{text:?}");
        assert!(tokens.len() <= 6 + id as usize);
        assert_eq!(finish, pb::FinishReason::Length as i32, "{text:?}");
    }
}

#[test]
fn unconstrained_neighbours_are_untouched() {
    let r = refs(MODEL);
    let cases = cases(&r);
    let mut runner = load(MODEL, "float32", 512);
    let mut blocks = Blocks::default();
    let plain = |id, blocks: &mut Blocks| request(id, &cases[2], 12, blocks);
    let alone = generate(&mut runner, vec![plain(0, &mut blocks)])
        .get(0)
        .to_vec();
    let mut crowd = vec![plain(0, &mut blocks)];
    for i in 1..4u64 {
        crowd.push(constrained(i, &cases[1], r"[a-c]{4,9}", 12, i, &mut blocks));
    }
    let together = finished(&mut runner, crowd);
    assert_eq!(together[0].3, alone);
    for (_, text, _, _) in &together[1..] {
        assert!(full_match(r"[a-c]{4,9}", text), "{text:?}");
    }
}

#[test]
fn a_regex_that_cannot_compile_ends_its_own_request_only() {
    let r = refs(MODEL);
    let cases = cases(&r);
    let mut runner = load(MODEL, "float32", 64);
    let mut blocks = Blocks::default();
    let bad = constrained(0, &cases[0], "(unclosed", 4, 0, &mut blocks);
    let good = constrained(1, &cases[1], "[0-9]{2}", 4, 0, &mut blocks);
    let out = finished(&mut runner, vec![bad, good]);
    assert_eq!(out[0].1, "");
    assert!(full_match("[0-9]{2}", &out[1].1), "{:?}", out[1].1);
}
