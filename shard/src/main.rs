//! `tessera-shard serve MODEL_DIR --uds-path PATH`: load a checkpoint and serve the shard
//! protocol on `PATH-{RANK}`. The launcher starts one per tensor-parallel rank; RANK and
//! WORLD_SIZE come from the environment, as in TGI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tch::Device;
use tessera_proto::telemetry::TelemetryConfig;
use tessera_shard::service::{socket_path, ShardService};
use tessera_shard::Runner;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Parser)]
#[command(
    name = "tessera-shard",
    version,
    about = "Tessera model shard (gRPC over a Unix socket)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a model and serve it.
    Serve(ServeArgs),
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// A local folder with config.json, tokenizer.json and *.safetensors.
    model_dir: PathBuf,
    /// Base path of the sockets; this rank listens on `{uds_path}-{rank}`.
    #[arg(long, default_value = "/tmp/tessera-server")]
    uds_path: String,
    /// Run dtype (float32, bfloat16, float16). Defaults to the checkpoint's dtype (float32 on
    /// a CPU without native bf16).
    #[arg(long)]
    dtype: Option<String>,
    /// auto, cpu, cuda or cuda:N. Defaults to CUDA when available.
    #[arg(long)]
    device: Option<String>,
    /// Fraction of available memory the KV cache may use.
    #[arg(long, env = "MEMORY_FRACTION", default_value_t = 0.5)]
    memory_fraction: f64,
    #[arg(long, env = "RANK", default_value_t = 0)]
    rank: usize,
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    world_size: usize,
    /// Log as JSON lines.
    #[arg(long)]
    json_output: bool,
    /// Intra-op threads (libtorch's default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Pin this process to these cores (`first-last`), so tensor-parallel ranks on one host
    /// each keep their own cores.
    #[arg(long)]
    cores: Option<String>,
    /// Export traces over OTLP/gRPC to this collector.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// `service.name` of the shard's spans.
    #[arg(long, default_value = "tessera.shard")]
    otlp_service_name: String,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutdown signal received");
}

/// The device of `rank`: on GPUs, each rank of a group takes its own, counting from the one
/// asked for (`cuda` is `cuda:0`), as TGI's ranks do.
fn rank_device(device: Device, rank: usize, world_size: usize) -> anyhow::Result<Device> {
    match device {
        Device::Cuda(base) if world_size > 1 => {
            let count = tch::Cuda::device_count().max(0) as usize;
            if base + world_size > count {
                anyhow::bail!(
                    "--num-shard {world_size} from cuda:{base} needs GPUs {base} to {}, and libtorch sees {count}",
                    base + world_size - 1
                );
            }
            Ok(Device::Cuda(base + rank))
        }
        other => Ok(other),
    }
}

/// Pins the process to cores `first-last`; a bad range is an error, a refusal by the kernel
/// only a warning.
fn pin(cores: &str) -> anyhow::Result<()> {
    let (first, last) = cores
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|(a, b)| a <= b)
        .ok_or_else(|| anyhow::anyhow!("--cores must be FIRST-LAST, got `{cores}`"))?;
    if let Err(e) = tessera_shard::comm::pin_to_cores(first, last) {
        eprintln!("warning: cannot pin to cores {cores}: {e}");
    }
    Ok(())
}

/// The collectives of a tensor-parallel group: NCCL between GPU ranks, shared memory between
/// the CPU shard processes of this host.
fn communicator(
    args: &ServeArgs,
    device: Device,
) -> anyhow::Result<Option<Box<dyn tessera_shard::comm::Communicator>>> {
    use tessera_shard::comm::nccl;
    if args.world_size <= 1 {
        return Ok(None);
    }
    if device.is_cuda() {
        let id = nccl::id_path(&args.uds_path);
        let comm = nccl::NcclComm::new(
            &id,
            args.rank,
            args.world_size,
            device,
            std::time::Duration::from_secs(300),
        )?;
        tracing::info!(
            "rank {} of {} joined the NCCL group on {device:?} (NCCL {})",
            args.rank,
            args.world_size,
            nccl::version()?
        );
        return Ok(Some(Box::new(comm)));
    }
    let port: u16 = std::env::var("MASTER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(29500);
    let timeout = std::env::var("TESSERA_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(120.0);
    let path = tessera_shard::comm::shm::ShmComm::segment_path(&args.uds_path, port);
    let comm = tessera_shard::comm::shm::ShmComm::new(
        &path,
        args.rank,
        args.world_size,
        16 << 20,
        std::time::Duration::from_secs(300),
    )?
    .with_timeout(std::time::Duration::from_secs_f64(timeout));
    Ok(Some(Box::new(comm)))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.world_size == 0 || args.rank >= args.world_size {
        anyhow::bail!(
            "RANK {} is outside WORLD_SIZE {}",
            args.rank,
            args.world_size
        );
    }
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads.max(1) as i32);
    }
    if !(0.0..=1.0).contains(&args.memory_fraction) || args.memory_fraction == 0.0 {
        anyhow::bail!(
            "--memory-fraction must be in (0, 1], got {}",
            args.memory_fraction
        );
    }
    let device = rank_device(
        tessera_shard::device::parse_device(args.device.as_deref())?,
        args.rank,
        args.world_size,
    )?;
    let start = std::time::Instant::now();
    let dir = args.model_dir.clone();
    let dtype = args.dtype.clone();
    let record = tessera_shard::warmup::pool_record_path(&args.uds_path, args.rank);
    let restore = record.clone();
    // Joining the group blocks until every rank is there.
    let group = args.clone();
    let comm = tokio::task::spawn_blocking(move || communicator(&group, device)).await??;
    let (runner, restored) = tokio::task::spawn_blocking(move || {
        let mut runner = Runner::load_rank(&dir, dtype.as_deref(), device, comm)?;
        let restored = tessera_shard::warmup::restore_pool(&restore, &mut runner)?;
        Ok::<_, tessera_shard::ShardError>((runner, restored))
    })
    .await??;
    if restored {
        tracing::info!(
            "KV pool of {} blocks restored from {} (restart after a crash)",
            runner.pool().map_or(0, |p| p.num_blocks()),
            record.display()
        );
    }
    tracing::info!(
        model = %args.model_dir.display(),
        dtype = tessera_shard::runner::kind_name(runner.model.kind()),
        ?device,
        "model loaded in {:.2}s",
        start.elapsed().as_secs_f64()
    );
    let path = socket_path(&args.uds_path, args.rank);
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    // Only this user may talk to the shard: the socket accepts unauthenticated model calls.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| anyhow::anyhow!("cannot restrict {}: {e}", path.display()))?;
    }
    tracing::info!("serving on unix://{}", path.display());
    let service = ShardService::new(
        runner,
        &args.uds_path,
        args.world_size,
        args.memory_fraction,
    )
    .with_pool_record(record.clone());
    let group_failed = service.group_failure();
    let server = tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal());
    let result = tokio::select! {
        // A broken group wins over a stop signal that came at the same time: either way the
        // process ends, but only this exit tells the launcher why.
        biased;
        () = group_failed.notified() => {
            let _ = std::fs::remove_file(&path);
            // Not a graceful stop: other calls may wait on collectives that will never
            // complete, and waiting for them would hold the group's restart.
            tracing::error!(
                "the tensor-parallel group broke (a collective failed); exiting so that the \
                 launcher restarts the group"
            );
            std::process::exit(3);
        }
        result = server => result,
    };
    let _ = std::fs::remove_file(&path);
    // The record stays: the launcher may restart this shard with its group after a peer's
    // crash; the launcher removes the records when it starts and when it stops for good.
    result?;
    tracing::info!("shard stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Serve(args) = cli.command;
    // Before any thread exists, so that every thread (tokio's, libtorch's) inherits the cores.
    if let Some(cores) = &args.cores {
        if let Err(e) = pin(cores) {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _runtime = rt.enter();
        tessera_proto::telemetry::init(&TelemetryConfig {
            json: args.json_output,
            stderr: true,
            otlp_endpoint: args.otlp_endpoint.clone(),
            service_name: args.otlp_service_name.clone(),
            resource: vec![("tessera.rank", args.rank.to_string())],
        })
    };
    let _telemetry = match telemetry {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
