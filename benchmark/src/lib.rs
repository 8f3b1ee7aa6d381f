//! Benchmarks live in `benches/` and `examples/`; see docs/benchmarks.md. This library holds
//! what several of them share.

/// The device a shard benchmark runs on: `TESSERA_BENCH_DEVICE` (any name `--device` takes),
/// CPU when unset. A name that cannot be served stops the run with the shard's own message.
pub fn device() -> tch::Device {
    let name = std::env::var("TESSERA_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    match tessera_shard::device::parse_device(Some(&name)) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("TESSERA_BENCH_DEVICE={name}: {e}");
            std::process::exit(2);
        }
    }
}
