//! Structured output's costs on the default model: the one-off compile of each schema (the
//! router's schema-to-regex conversion and check, then the shard's index over SmolLM2's 49,152
//! tokens), and the time per output token of the same batch decoded with and without a grammar
//! (a list of records, each a flat object), measured in the same run, interleaved.
//!
//! `cargo run --release -p tessera-benchmark --example grammar -- [MODEL_DIR] [BATCH] [TOKENS]`

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};
use tch::Device;
use tessera_proto as pb;
use tessera_shard::grammar::{vocabulary, Grammar};
use tessera_shard::Runner;

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        ("integer", json!({"type": "integer"})),
        ("enum", json!({"enum": ["red", "green", "blue"]})),
        (
            "flat object",
            json!({"type": "object", "properties": {
            "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
            "required": ["name", "age"]}),
        ),
        (
            "optional fields",
            json!({"type": "object", "properties": {
            "id": {"type": "integer"}, "nickname": {"type": "string", "maxLength": 8},
            "email": {"type": "string", "format": "email"}}, "required": ["id"]}),
        ),
        (
            "nested, 3 levels",
            json!({"type": "object", "properties": {"user": {"type": "object",
            "properties": {"name": {"type": "string"}, "address": {"type": "object", "properties": {
                "city": {"type": "string"}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                "required": ["city", "zip"]}}, "required": ["name", "address"]}},
            "required": ["user"]}),
        ),
        (
            "array of objects",
            json!({"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "[A-Z]{3}-[0-9]{3}"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["sku", "qty"]},
            "maxItems": 5}),
        ),
        (
            "pydantic $defs",
            json!({"$defs": {"Pet": {"type": "object", "properties": {
            "kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer"}}, "required": ["kind", "age"]}},
            "type": "object", "properties": {"pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}}},
            "required": ["pets"]}),
        ),
        ("json_object (any object)", json!({"type": "object"})),
    ]
}

fn request(id: u64, tokens: u32, grammar: &str, blocks: &mut u32) -> pb::Request {
    let prompt = format!("Request {id}: describe a user of the service as JSON.");
    let n = (64 + tokens).div_ceil(16);
    let first = *blocks;
    *blocks += n;
    pb::Request {
        id,
        inputs: prompt,
        add_special_tokens: true,
        parameters: Some(pb::NextTokenChooserParameters {
            repetition_penalty: 1.0,
            do_sample: true,
            temperature: 1.0,
            seed: id + 1,
            grammar: grammar.into(),
            grammar_type: if grammar.is_empty() {
                pb::GrammarType::None
            } else {
                pb::GrammarType::Regex
            } as i32,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: tokens,
            ignore_eos_token: true,
            ..Default::default()
        }),
        blocks: (first..first + n).collect(),
        ..Default::default()
    }
}

/// Decodes a batch to the end; seconds per decode step (prefill excluded) and steps taken.
fn decode_time(runner: &mut Runner, batch: usize, tokens: u32, grammar: &str) -> (f64, usize) {
    let mut blocks = 1;
    let requests = (0..batch as u64)
        .map(|i| request(i, tokens, grammar, &mut blocks))
        .collect::<Vec<_>>();
    let b = pb::Batch {
        id: 1,
        size: requests.len() as u32,
        requests,
        ..Default::default()
    };
    let mut step = runner.prefill(&b, None).expect("prefill");
    let (start, mut steps) = (Instant::now(), 0);
    while let Some(c) = step.batch.take() {
        step = runner.decode(&[c]).expect("decode");
        steps += 1;
    }
    (start.elapsed().as_secs_f64() / steps.max(1) as f64, steps)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "models/SmolLM2-135M-Instruct".into()),
    );
    let batch: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let tokens: u32 = args.get(3).map_or(Ok(64), |s| s.parse())?;
    let mut runner = Runner::load(&dir, None, Device::Cpu)?;
    let eos: Vec<u32> = runner.eos_token_ids().iter().copied().collect();
    let main_eos = *eos.iter().min().ok_or("no EOS")?;
    let stop: HashSet<u32> = eos.iter().copied().collect();
    let vocab = vocabulary(&runner.tokenizer, main_eos, &stop)?;
    println!("vocabulary: {} tokens", vocab.len());
    println!("\n| schema | regex chars | router check (ms) | shard index (ms) | states |");
    println!("|---|---:|---:|---:|---:|");
    for (name, schema) in schemas() {
        let t = Instant::now();
        let regex = tessera_router::grammar::schema_regex(&schema)?;
        tessera_router::grammar::check_regex(&regex)?;
        let check = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let g = Grammar::compile(&regex, &vocab)?;
        let index = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "| {name} | {} | {check:.1} | {index:.0} | {} |",
            regex.len(),
            g.states()
        );
    }
    // The timed grammar: records of a flat object, at least 100 of them, so that no sequence
    // can finish early and both runs decode the same full batch for the same number of steps.
    let records = json!({"type": "array", "minItems": 100, "items": schemas()[2].1});
    let flat = tessera_router::grammar::schema_regex(&records)?;
    runner.allocate_pool(batch * (64 + tokens as usize).div_ceil(16) + 8)?;
    // Warm both paths (and compile the grammar) before timing.
    decode_time(&mut runner, batch, 8, "");
    decode_time(&mut runner, batch, 8, &flat);
    let (mut plain, mut constrained) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        plain.push(decode_time(&mut runner, batch, tokens, "").0);
        constrained.push(decode_time(&mut runner, batch, tokens, &flat).0);
    }
    let median = tessera_benchmark::median;
    let (p, c) = (median(&plain), median(&constrained));
    println!(
        "\ndecode, batch {batch}, {tokens} tokens, sampled: {:.2} ms/step without a grammar, {:.2} ms/step with a JSON grammar: {:+.1}% ({:.3}x)",
        p * 1e3,
        c * 1e3,
        (c / p - 1.0) * 100.0,
        c / p
    );
    Ok(())
}
