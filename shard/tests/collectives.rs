//! The shared-memory collectives against a single-process reference, under stress, and with
//! a peer that dies or hangs mid-collective (real processes: this test binary re-runs itself
//! as the ranks).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};
use tessera_shard::comm::shm::ShmComm;
use tessera_shard::comm::{CommError, Communicator};

fn segment() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    PathBuf::from(format!(
        "/dev/shm/tessera-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Runs `f(comm)` on `world` threads, one rank each, and returns their results in rank order.
fn on_ranks<T: Send>(world: usize, capacity: usize, f: impl Fn(ShmComm) -> T + Sync) -> Vec<T> {
    let path = segment();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (path, f) = (&path, &f);
                s.spawn(move || {
                    let comm = ShmComm::new(path, rank, world, capacity, Duration::from_secs(30))
                        .expect("set-up");
                    f(comm)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// Rank `rank`'s input for case `case`: deterministic, so every rank can rebuild everyone's.
fn input(case: usize, rank: usize, shape: &[i64], kind: Kind) -> Tensor {
    let mut rng = StdRng::seed_from_u64((case * 1000 + rank) as u64);
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-100.0f32..100.0)).collect();
    let t = Tensor::from_slice(&values).view(shape);
    match kind {
        Kind::Int64 | Kind::Int => t.round().to_kind(kind),
        k => t.to_kind(k),
    }
}

fn reference_sum(case: usize, world: usize, shape: &[i64], kind: Kind) -> Tensor {
    let acc = match kind {
        Kind::BFloat16 | Kind::Half => Kind::Float,
        k => k,
    };
    let mut total = input(case, 0, shape, kind).to_kind(acc);
    for r in 1..world {
        total += input(case, r, shape, kind).to_kind(acc);
    }
    total.to_kind(kind)
}

#[test]
fn all_reduce_and_all_gather_equal_the_single_process_reference() {
    let shapes: &[&[i64]] = &[
        &[1],
        &[7],
        &[576],
        &[3, 576],
        &[2, 5, 64],
        &[4097],
        &[33, 129],
    ];
    let kinds = [
        Kind::Float,
        Kind::BFloat16,
        Kind::Half,
        Kind::Double,
        Kind::Int64,
        Kind::Int,
    ];
    let cases: Vec<(usize, &[i64], Kind)> = shapes
        .iter()
        .flat_map(|s| kinds.iter().map(move |k| (*s, *k)))
        .enumerate()
        .map(|(i, (s, k))| (i, s, k))
        .collect();
    for world in [2, 3, 4] {
        // A small slot, so that most tensors go through in several chunks.
        let checked = on_ranks(world, 4096, |mut comm| {
            for &(case, shape, kind) in &cases {
                let mine = input(case, comm.rank(), shape, kind);
                let sum = comm.all_reduce_sum(&mine).expect("all-reduce");
                let want = reference_sum(case, world, shape, kind);
                assert!(
                    sum.equal(&want),
                    "all-reduce {shape:?} {kind:?} world {world}"
                );
                let dim = (shape.len() - 1) as i64;
                let gathered = comm.all_gather(&mine, dim).expect("all-gather");
                let parts: Vec<Tensor> = (0..world).map(|r| input(case, r, shape, kind)).collect();
                assert!(
                    gathered.equal(&Tensor::cat(&parts, dim)),
                    "all-gather {shape:?} {kind:?}"
                );
            }
            cases.len()
        });
        assert_eq!(checked, vec![cases.len(); world]);
    }
}

#[test]
fn stress_10000_rounds_with_random_sizes() {
    let world = 2;
    let done = on_ranks(world, 1024, |mut comm| {
        // The same seed on both ranks: they agree on every size, as lockstep ranks do.
        let mut rng = StdRng::seed_from_u64(7);
        for i in 0..10_000i64 {
            let n = rng.random_range(1..700i64); // up to 3 chunks of 256 f32
            let mine = Tensor::full(
                [n],
                (comm.rank() as i64 + 1 + i) as f64,
                (Kind::Float, tch::Device::Cpu),
            );
            if i % 2 == 0 {
                let sum = comm.all_reduce_sum(&mine).expect("all-reduce");
                let want = (2 * i + 3) as f64; // (1 + i) + (2 + i)
                assert_eq!(sum.size(), vec![n]);
                assert_eq!(
                    f64::try_from(sum.min()).unwrap_or(f64::NAN),
                    want,
                    "round {i}"
                );
                assert_eq!(
                    f64::try_from(sum.max()).unwrap_or(f64::NAN),
                    want,
                    "round {i}"
                );
            } else {
                let all = comm.all_gather(&mine, 0).expect("all-gather");
                assert_eq!(all.size(), vec![2 * n]);
                let first = f64::try_from(all.get(0)).unwrap_or(f64::NAN);
                let last = f64::try_from(all.get(2 * n - 1)).unwrap_or(f64::NAN);
                assert_eq!((first, last), ((1 + i) as f64, (2 + i) as f64), "round {i}");
            }
        }
        true
    });
    assert_eq!(done, vec![true; world]);
}

/// One rank as a process: all-reduces until told to stop or a collective fails.
#[test]
#[ignore = "a rank process for the fault tests below"]
fn collective_rank_process() {
    let var = |k: &str| std::env::var(k).expect(k);
    let path = PathBuf::from(var("TESSERA_TEST_SEGMENT"));
    let rank: usize = var("TESSERA_TEST_RANK").parse().expect("rank");
    let mut comm = ShmComm::new(&path, rank, 2, 4096, Duration::from_secs(30))
        .expect("set-up")
        .with_timeout(Duration::from_secs(2));
    let x = Tensor::ones([576], (Kind::Float, tch::Device::Cpu));
    // A rank left behind by a crashed parent still stops on its own.
    let give_up = Instant::now() + Duration::from_secs(120);
    for i in 0u64.. {
        if Instant::now() > give_up {
            println!("GAVE_UP");
            std::process::exit(6);
        }
        match comm.all_reduce_sum(&x) {
            Ok(_) if i == 10 => println!("READY"),
            Ok(_) => {}
            Err(e) => {
                println!("COMM_ERROR {}", e);
                let kind = match e {
                    CommError::PeerDied { .. } => 3,
                    CommError::Timeout { .. } => 4,
                    _ => 5,
                };
                std::process::exit(kind);
            }
        }
    }
}

struct Rank {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

/// A rank process never outlives its test, whatever assertion fails first.
impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_rank(segment: &PathBuf, rank: usize) -> Rank {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "collective_rank_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TESSERA_TEST_SEGMENT", segment)
        .env("TESSERA_TEST_RANK", rank.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rank");
    let out = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Rank { child, lines }
}

fn wait_line(rank: &Rank, marker: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rank.lines.recv_timeout(left) {
            // libtest may print "test name ... " in front of the first line.
            Ok(line) if line.contains(marker) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Starts two rank processes, lets them run, then does `fault` to rank 1; rank 0 must fail
/// with a clear error (not hang) and exit with `code`.
fn survivor_reports(fault: libc::c_int, code: i32, message: &str, within: Duration) {
    let segment = segment();
    let mut ranks = [spawn_rank(&segment, 0), spawn_rank(&segment, 1)];
    for r in &ranks {
        assert!(
            wait_line(r, "READY", Duration::from_secs(60)).is_some(),
            "rank never ran"
        );
    }
    let start = Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(ranks[1].child.id() as libc::pid_t, fault) };
    let line =
        wait_line(&ranks[0], "COMM_ERROR", within).expect("rank 0 reported no error in time");
    let status = ranks[0].child.wait().expect("rank 0 exit");
    let elapsed = start.elapsed();
    assert!(line.contains(message), "{line}");
    assert!(line.contains("rank 1"), "{line}");
    assert_eq!(status.code(), Some(code), "{line}");
    assert!(elapsed < within, "took {elapsed:?}");
}

#[test]
fn a_killed_rank_fails_the_collective_at_once() {
    survivor_reports(
        libc::SIGKILL,
        3,
        "exited during all-reduce",
        Duration::from_secs(3),
    );
}

#[test]
fn a_stopped_rank_fails_the_collective_after_the_timeout() {
    survivor_reports(
        libc::SIGSTOP,
        4,
        "did not reach all-reduce",
        Duration::from_secs(8),
    );
}

/// A rank that ran a step its peer never got (a call that reached one rank only) meets the
/// peer's next step in the same round: both fail with `OutOfStep` instead of summing
/// unrelated tensors. Different sizes in one round fail the same way.
#[test]
fn ranks_in_different_steps_fail_instead_of_mixing() {
    let x = || Tensor::ones([64], (Kind::Float, tch::Device::Cpu));
    // Same tag: a normal round.
    let same = on_ranks(2, 4096, |mut comm| {
        comm.begin_step(7);
        comm.all_reduce_sum(&x())
            .map(|t| t.sum(Kind::Float).double_value(&[]))
    });
    assert!(
        same.iter().all(|r| matches!(r, Ok(v) if *v == 128.0)),
        "{same:?}"
    );
    // The orphan step: rank 0 is still in step 7, rank 1 has moved on to step 8.
    // After that, the failed round is half done (each rank arrived and never departed): a
    // later collective must fail at once, not wait for the rank itself (it would until the
    // timeout, and hold the process's exit that long).
    let mixed = on_ranks(2, 4096, |mut comm| {
        comm.begin_step(if comm.rank() == 0 { 7 } else { 8 });
        let first = comm.all_reduce_sum(&x());
        let start = Instant::now();
        let next = comm.all_reduce_sum(&x());
        (first, next, start.elapsed())
    });
    for (rank, (first, next, took)) in mixed.iter().enumerate() {
        match first {
            Err(CommError::OutOfStep { rank: other, .. }) => assert_eq!(*other, 1 - rank),
            other => panic!("rank {rank}: {other:?}"),
        }
        assert!(
            matches!(next, Err(CommError::Broken(_))),
            "rank {rank}: {next:?}"
        );
        assert!(
            *took < Duration::from_secs(1),
            "rank {rank} waited {took:?}"
        );
    }
    let sizes = on_ranks(2, 4096, |mut comm| {
        let n = if comm.rank() == 0 { 64 } else { 32 };
        comm.all_gather(&Tensor::ones([n], (Kind::Float, tch::Device::Cpu)), 0)
    });
    assert!(
        sizes
            .iter()
            .all(|r| matches!(r, Err(CommError::OutOfStep { .. }))),
        "{sizes:?}"
    );
}
