//! A tensor-parallel group of real shard processes when a call reaches one rank and not the
//! other (as when the launcher restarts the group and one new rank serves before the other).
//! The rank that got it waits in its first collective; the peer's next call meets it there.
//! Both must see that they are in different steps and exit (code 3), so that the launcher
//! restarts the group, rather than sum unrelated tensors and answer with garbage.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use tessera_proto as pb;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use tonic::transport::Channel;

/// A rank process never outlives its test, whatever assertion fails first.
struct Rank(Child);

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_rank(base: &str, rank: usize) -> Rank {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny/tiny-llama");
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-shard"))
        .arg("serve")
        .arg(model)
        .args(["--uds-path", base, "--dtype", "float32", "--threads", "1"])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        // Far longer than the test waits: the ranks must notice, not time out.
        .env("TESSERA_COLLECTIVE_TIMEOUT", "600")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tessera-shard");
    Rank(child)
}

async fn connect(path: PathBuf) -> TextGenerationServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::connect_uds(path).await
}

fn batch(id: u64, inputs: &str, blocks: Vec<u32>) -> pb::Batch {
    pb::Batch {
        id,
        requests: vec![pb::Request {
            id,
            inputs: inputs.into(),
            add_special_tokens: true,
            blocks,
            parameters: Some(pb::NextTokenChooserParameters {
                repetition_penalty: 1.0,
                ..Default::default()
            }),
            stopping_parameters: Some(pb::StoppingCriteriaParameters {
                max_new_tokens: 4,
                stop_sequences: vec![],
                ignore_eos_token: true,
            }),
            ..Default::default()
        }],
        size: 1,
        ..Default::default()
    }
}

/// Waits for a rank to exit; its exit code.
fn exit_code(rank: &mut Rank, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = rank.0.try_wait().expect("wait") {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_reached_one_rank_breaks_the_group_instead_of_mixing_steps() {
    let dir = std::env::temp_dir().join(format!("tessera-group-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let base = dir.join("shard").display().to_string();
    let mut ranks = [spawn_rank(&base, 0), spawn_rank(&base, 1)];
    let clients = [
        connect(PathBuf::from(format!("{base}-0"))).await,
        connect(PathBuf::from(format!("{base}-1"))).await,
    ];
    let warmup = pb::WarmupRequest {
        batch: Some(batch(0, &"word ".repeat(20), vec![0, 1])),
        max_input_tokens: None,
        max_prefill_tokens: 32,
        max_total_tokens: Some(64),
    };
    let (mut c0, mut c1) = (clients[0].clone(), clients[1].clone());
    let warmed = tokio::join!(c0.warmup(warmup.clone()), c1.warmup(warmup));
    assert!(warmed.0.is_ok() && warmed.1.is_ok(), "{warmed:?}");

    // Both ranks run a call together: the group works.
    let prefill = |mut c: TextGenerationServiceClient<Channel>, b: pb::Batch| async move {
        c.prefill(pb::PrefillRequest {
            batch: Some(b),
            cached_batch: None,
        })
        .await
    };
    let first = || batch(1, "The capital of France is", vec![2]);
    let both = tokio::join!(
        prefill(clients[0].clone(), first()),
        prefill(clients[1].clone(), first())
    );
    assert!(both.0.is_ok() && both.1.is_ok(), "{both:?}");

    // Batch 2 reaches rank 0 only; batch 3 then reaches rank 1.
    let orphan = tokio::spawn(prefill(
        clients[0].clone(),
        batch(2, "Hello there", vec![3]),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = prefill(clients[1].clone(), batch(3, "Once upon a time", vec![4])).await;
    let orphan = orphan.await.expect("task");
    assert!(
        next.is_err(),
        "rank 1 answered from mixed collectives: {next:?}"
    );
    assert!(
        orphan.is_err(),
        "rank 0 answered from mixed collectives: {orphan:?}"
    );
    for (r, rank) in ranks.iter_mut().enumerate() {
        assert_eq!(
            exit_code(rank, Duration::from_secs(30)),
            Some(3),
            "rank {r} should exit so that the launcher restarts the group"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
