//! Tensor parallelism on CPU: two ranks (threads here, each with its own slice of the model and
//! the shared-memory collectives the shard processes use) give the same greedy tokens as one
//! rank and as transformers, on every architecture, and the same logits within 1e-4 in f32.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tch::Device;
use tessera_shard::comm::shm::ShmComm;
use tessera_shard::Runner;

fn load_ranks(model: &str, world: usize) -> Vec<Runner> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = PathBuf::from(format!(
        "/dev/shm/tessera-tp-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let dir = root().join("models/tiny").join(model);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (path, dir) = (&path, &dir);
                s.spawn(move || {
                    let comm = ShmComm::new(path, rank, world, 1 << 20, Duration::from_secs(60))
                        .expect("collectives");
                    Runner::load_rank(dir, Some("float32"), Device::Cpu, Some(Box::new(comm)))
                        .expect("load rank")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    })
}

/// Runs `f` on every rank at once (collectives need all of them) and returns rank 0's result,
/// after checking that every rank computed the same.
fn on_all<T: Send + PartialEq + std::fmt::Debug>(
    ranks: &mut [Runner],
    f: impl Fn(&mut Runner) -> T + Sync,
) -> T {
    let mut results: Vec<T> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .map(|r| {
                let f = &f;
                s.spawn(move || {
                    tch::set_num_threads(1);
                    f(r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    for other in &results[1..] {
        assert_eq!(other, &results[0], "ranks disagree");
    }
    results.swap_remove(0)
}

#[test]
fn two_ranks_match_one_rank_and_transformers_on_every_architecture() {
    for model in MODELS {
        let r = refs(model);
        let cases = cases(&r);
        let mut ranks = load_ranks(model, 2);
        for rank in ranks.iter_mut() {
            rank.allocate_pool(256).expect("pool");
        }
        let tokens = on_all(&mut ranks, |runner| {
            let mut blocks = Blocks::default();
            let requests = (0..cases.len())
                .map(|i| request(i as u64, &cases[i], 20, &mut blocks))
                .collect();
            let out = generate(runner, requests);
            (0..cases.len())
                .map(|i| out.get(i as u64).to_vec())
                .collect::<Vec<_>>()
        });
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(
                tokens[i],
                ids(&c["greedy"]["ids"]),
                "{model}: greedy tokens, case {i}"
            );
        }
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
        let sharded = on_all(&mut ranks, |runner| {
            last_logits(runner, &prompts)
                .into_iter()
                .map(|row| row.into_iter().map(f32::to_bits).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        });
        let single = last_logits(&load(model, "float32", 2), &prompts);
        let mut worst = 0f32;
        for (a, b) in sharded.iter().zip(&single) {
            assert_eq!(a.len(), b.len(), "{model}: vocabulary size");
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((f32::from_bits(*x) - y).abs());
            }
        }
        eprintln!("{model}: 2 ranks vs 1, max abs logit difference {worst:.2e}");
        assert!(worst < 1e-4, "{model}: {worst}");
    }
}

#[test]
fn head_counts_that_do_not_divide_fail_at_load_with_the_numbers() {
    // tiny-llama has 4 attention heads: 3 ranks cannot split them.
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = PathBuf::from(format!(
        "/dev/shm/tessera-tp-bad-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let dir = root().join("models/tiny/tiny-llama");
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let (path, dir) = (&path, &dir);
                s.spawn(move || {
                    let comm = ShmComm::new(path, rank, 3, 4096, Duration::from_secs(60))
                        .expect("collectives");
                    match Runner::load_rank(dir, Some("float32"), Device::Cpu, Some(Box::new(comm)))
                    {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    for e in errors {
        assert!(
            e.contains("4 attention heads") && e.contains("3 shards"),
            "{e}"
        );
    }
}
