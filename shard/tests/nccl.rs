//! NCCL through the symbols `libtorch_cuda.so` brings into the process. Without a GPU, what
//! needs none is checked: the symbols resolve, the version is NCCL 2, and joining a group fails
//! with a clear error instead of crashing. With GPUs, a group of all of them (one thread per
//! rank, each on its own GPU) must sum and gather like the single-process reference.

use std::time::Duration;

use tch::{Device, Kind, Tensor};
use tessera_shard::comm::nccl::{self, NcclComm};
use tessera_shard::comm::Communicator;

#[test]
fn nccl_is_loaded_with_libtorch() {
    let v = nccl::version().expect("libnccl.so.2, loaded by libtorch_cuda.so");
    assert!((20000..30000).contains(&v), "NCCL version {v}");
}

#[test]
fn a_group_sums_and_gathers_like_the_reference() {
    let dir = std::env::temp_dir().join(format!("tessera-nccl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let id = dir.join("id");
    let gpus = tch::Cuda::device_count().max(0) as usize;
    if gpus == 0 {
        let e = NcclComm::new(&id, 0, 1, Device::Cuda(0), Duration::from_secs(5))
            .err()
            .expect("no GPU: joining must fail");
        assert!(e.to_string().contains("cudaSetDevice failed"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    let ranks: Vec<_> = (0..gpus)
        .map(|rank| {
            let id = id.clone();
            std::thread::spawn(move || {
                let device = Device::Cuda(rank);
                let mut comm = NcclComm::new(&id, rank, gpus, device, Duration::from_secs(60))
                    .expect("join the group");
                let mut results = Vec::new();
                for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                    let mine = Tensor::arange(12, (Kind::Float, device)).view([3, 4])
                        * (rank as f64 + 1.0);
                    let sum = comm.all_reduce_sum(&mine.to_kind(kind)).unwrap();
                    let gathered = comm.all_gather(&mine.to_kind(kind), 1).unwrap();
                    results.push((
                        sum.to_kind(Kind::Float).to(Device::Cpu),
                        gathered.to_kind(Kind::Float).to(Device::Cpu),
                    ));
                }
                results
            })
        })
        .collect();
    let base = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
    let factor = (gpus * (gpus + 1) / 2) as f64;
    let gathered: Vec<Tensor> = (0..gpus).map(|r| &base * (r as f64 + 1.0)).collect();
    let reference_gather = Tensor::cat(&gathered, 1);
    for rank in ranks {
        for (sum, gather) in rank.join().unwrap() {
            assert!(sum.allclose(&(&base * factor), 1e-2, 1e-2, false));
            assert!(gather.allclose(&reference_gather, 1e-2, 1e-2, false));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
