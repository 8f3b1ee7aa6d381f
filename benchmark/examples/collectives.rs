//! Latency of the shared-memory all-reduce between two ranks, for hidden-size vectors (one
//! decode token's activation) and small batches of them, against a baseline measured in the
//! same run: the same bytes copied and added by one thread (what an all-reduce must at least
//! do), so the ratio is the synchronisation overhead.
//!
//! Two threads stand in for the two rank processes (the segment and the protocol are the same;
//! threads only make the benchmark self-contained). On a 2-core machine each rank has a core.
//!
//! Usage: cargo run --release -p tessera-benchmark --example collectives [iterations]

use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tessera_benchmark::median;
use tessera_shard::comm::shm::ShmComm;
use tessera_shard::comm::Communicator;

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    tch::set_num_threads(1);
    println!("| elements | dtype | all-reduce median | copy+add baseline | ratio |");
    println!("|---|---|---|---|---|");
    for kind in [Kind::Float, Kind::BFloat16] {
        for n in [576i64, 2048, 4096, 8 * 576, 32 * 576] {
            let path = std::path::PathBuf::from(format!(
                "/dev/shm/tessera-bench-{}-{n}-{kind:?}",
                std::process::id()
            ));
            let times: Vec<Vec<f64>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|rank| {
                        let path = &path;
                        s.spawn(move || {
                            // One intra-op thread per rank (OpenMP's count is per thread): two
                            // ranks of two threads each would fight over two cores.
                            tch::set_num_threads(1);
                            let _ = tessera_shard::comm::pin_to_cores(rank, rank);
                            let mut comm =
                                ShmComm::new(path, rank, 2, 1 << 20, Duration::from_secs(30))
                                    .expect("set-up");
                            let x = Tensor::ones([n], (kind, Device::Cpu));
                            let mut t = Vec::with_capacity(iterations);
                            for i in 0..iterations + 100 {
                                let start = Instant::now();
                                let y = comm.all_reduce_sum(&x).expect("all-reduce");
                                if i >= 100 {
                                    t.push(start.elapsed().as_secs_f64());
                                }
                                drop(y);
                            }
                            t
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank"))
                    .collect()
            });
            let reduce = median(&times.into_iter().flatten().collect::<Vec<_>>());
            // Baseline: publish (copy in) and sum two contributions, in one thread.
            let a = Tensor::ones([n], (kind, Device::Cpu));
            let b = Tensor::ones([n], (kind, Device::Cpu));
            let slot = Tensor::zeros([n], (kind, Device::Cpu));
            let acc = Kind::Float;
            let mut base = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let start = Instant::now();
                let mut slot = slot.shallow_clone();
                let _ = slot.copy_(&a);
                let mut total = slot.to_kind(acc).copy();
                total += b.to_kind(acc);
                let _ = total.to_kind(kind);
                base.push(start.elapsed().as_secs_f64());
            }
            let base = median(&base);
            println!(
                "| {n} | {kind:?} | {:.1} µs | {:.1} µs | {:.1}x |",
                reduce * 1e6,
                base * 1e6,
                reduce / base
            );
        }
    }
}
