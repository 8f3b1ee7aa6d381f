//! `tessera-launcher`: checks the model and the flags, starts the shard and waits until its
//! socket is up, starts the router, and supervises both. Ctrl-C / SIGTERM stop everything in
//! order (router first, so no request reaches a stopped shard) and exit 0. A child that dies or
//! hangs is restarted (`supervise`); when restarts cannot mend it, the rest are stopped and the
//! launcher exits non-zero, naming the child and its last words.

mod args;
mod health;
mod hub;
mod process;
mod supervise;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use args::Args;
use process::Supervised;
use supervise::{start_shards, supervise};

fn init_logging(json: bool) {
    // As the router and shards (tessera_proto::telemetry): LOG_LEVEL, else RUST_LOG, else info.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.compact().init();
    }
}

/// Checks the (resolved, existing) model folder before anything starts, so a broken file costs
/// one line, not a crash.
fn check_model(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("malformed {}", config_path.display()))?;
    if !config.is_object() {
        bail!(
            "malformed {}: expected a JSON object",
            config_path.display()
        );
    }
    for file in ["tokenizer.json"] {
        if !dir.join(file).is_file() {
            bail!("model `{}` has no {file}", dir.display());
        }
    }
    Ok(config)
}

/// `--env`: what an issue report needs about this machine.
fn print_env() {
    let nvidia = Command::new("nvidia-smi")
        .output()
        .ok()
        .filter(|o| o.status.success());
    let gpus = nvidia
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "N/A".into());
    println!(
        "Runtime environment:\nTessera version: {}\nTarget: {}-{}\nCPU cores: {}\nnvidia-smi:\n{gpus}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
}

fn binary(args: &Args, name: &str) -> PathBuf {
    let dirs = args.bin_dir.clone().into_iter().chain(
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf)),
    );
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from(name) // resolved through PATH
}

/// Rank `rank`'s threads and cores: the host's cores split evenly (or `--threads-per-shard`
/// each), so that ranks neither oversubscribe the cores nor wait on each other's time slices.
fn core_budget(args: &Args, rank: usize) -> (usize, String) {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let world = args.world_size();
    let per = args
        .threads_per_shard
        .unwrap_or_else(|| (cores / world).max(1))
        .max(1);
    let first = (rank * per) % cores;
    let last = (first + per - 1).min(cores - 1);
    (per, format!("{first}-{last}"))
}

fn shard_command(args: &Args, model_dir: &Path, rank: usize) -> Command {
    let mut cmd = Command::new(binary(args, "tessera-shard"));
    cmd.arg("serve")
        .arg(model_dir)
        .arg("--uds-path")
        .arg(&args.shard_uds_path);
    if let Some(d) = args.dtype {
        cmd.arg("--dtype").arg(d.as_str());
    }
    if args.device != "auto" {
        cmd.arg("--device").arg(&args.device);
    }
    // TGI's spelling: `--rope-factor` alone means linear scaling.
    match (args.rope_scaling, args.rope_factor) {
        (None, None) => {}
        (kind, factor) => {
            let kind = match kind {
                Some(crate::args::RopeScaling::Dynamic) => "dynamic",
                _ => "linear",
            };
            cmd.env("ROPE_SCALING", kind)
                .env("ROPE_FACTOR", factor.unwrap_or(1.0).to_string());
        }
    }
    if let Some(g) = args.watermark_gamma {
        cmd.env("WATERMARK_GAMMA", g.to_string());
    }
    if let Some(d) = args.watermark_delta {
        cmd.env("WATERMARK_DELTA", d.to_string());
    }
    if args.json_output {
        cmd.arg("--json-output");
    }
    if args.disable_custom_kernels {
        cmd.env("TESSERA_NO_KERNELS", "1");
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        cmd.arg("--otlp-endpoint").arg(endpoint);
        cmd.arg("--otlp-service-name")
            .arg(shard_service_name(&args.otlp_service_name));
    }
    cmd.env("MASTER_ADDR", &args.master_addr)
        .env("MASTER_PORT", args.master_port.to_string());
    cmd.env("RANK", rank.to_string())
        .env("WORLD_SIZE", args.world_size().to_string())
        .env("MEMORY_FRACTION", args.cuda_memory_fraction.to_string());
    if args.world_size() > 1 || args.threads_per_shard.is_some() {
        let (threads, cores) = core_budget(args, rank);
        cmd.arg("--threads").arg(threads.to_string());
        // OpenMP reads its thread count per thread; the environment reaches every one.
        cmd.env("OMP_NUM_THREADS", threads.to_string());
        if args.world_size() > 1 {
            cmd.arg("--cores").arg(cores);
        }
    }
    cmd
}

fn router_command(args: &Args, model_dir: &Path, max_batch_prefill_tokens: u32) -> Command {
    let mut cmd = Command::new(binary(args, "tessera-router"));
    let mut opt = |flag: &str, value: String| {
        cmd.arg(flag).arg(value);
    };
    opt("--tokenizer-name", model_dir.display().to_string());
    opt("--model-id", args.model_id.clone());
    opt(
        "--master-shard-uds-path",
        format!("{}-0", args.shard_uds_path),
    );
    opt("--hostname", args.hostname.clone());
    opt("--port", args.port.to_string());
    opt(
        "--max-concurrent-requests",
        args.max_concurrent_requests.to_string(),
    );
    opt("--max-best-of", args.max_best_of.to_string());
    opt("--max-stop-sequences", args.max_stop_sequences.to_string());
    opt("--max-top-n-tokens", args.max_top_n_tokens.to_string());
    opt(
        "--max-batch-prefill-tokens",
        max_batch_prefill_tokens.to_string(),
    );
    opt("--max-waiting-tokens", args.max_waiting_tokens.to_string());
    opt("--prefix-caching", args.prefix_caching.to_string());
    opt(
        "--waiting-served-ratio",
        args.waiting_served_ratio.to_string(),
    );
    opt(
        "--max-client-batch-size",
        args.max_client_batch_size.to_string(),
    );
    opt("--payload-limit", args.payload_limit.to_string());
    opt("--validation-workers", args.validation_workers.to_string());
    if let Some(path) = &args.tokenizer_config_path {
        opt("--tokenizer-config-path", path.display().to_string());
    }
    if let Some(port) = args.prometheus_port {
        opt("--prometheus-port", port.to_string());
    }
    if let Some(v) = args.max_input_tokens() {
        opt("--max-input-tokens", v.to_string());
    }
    if let Some(v) = args.max_total_tokens {
        opt("--max-total-tokens", v.to_string());
    }
    if let Some(v) = args.max_batch_total_tokens {
        opt("--max-batch-total-tokens", v.to_string());
    }
    if let Some(v) = args.max_batch_size {
        opt("--max-batch-size", v.to_string());
    }
    for origin in &args.cors_allow_origin {
        cmd.arg("--cors-allow-origin").arg(origin);
    }
    if let Some(key) = &args.api_key {
        // Through the environment, so the key does not show up in `ps`.
        cmd.env("API_KEY", key);
    }
    if args.json_output {
        cmd.arg("--json-output");
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        cmd.arg("--otlp-endpoint").arg(endpoint);
    }
    cmd.arg("--otlp-service-name").arg(&args.otlp_service_name);
    if args.disable_ui {
        cmd.arg("--disable-ui");
    }
    if args.disable_grammar_support {
        cmd.arg("--disable-grammar-support");
    }
    cmd
}

/// The shards' `service.name`: the router's with `.router` replaced by `.shard` (or `.shard`
/// appended), so a trace shows which process each span came from.
fn shard_service_name(router: &str) -> String {
    format!("{}.shard", router.strip_suffix(".router").unwrap_or(router))
}

/// Stops children from last to first (the router before the shards), each with the timeout.
fn stop_all(children: &mut [Supervised], timeout: Duration) {
    for child in children.iter_mut().rev() {
        child.terminate(timeout);
    }
}

fn remove_pool_records(args: &Args) {
    for rank in 0..args.world_size() {
        let _ = std::fs::remove_file(format!("{}-{rank}.pool", args.shard_uds_path));
    }
}

/// The shard sockets take unauthenticated model calls, so they live in a folder only this user
/// may enter. The default folder is made private (and refused when someone else owns it or may
/// write to it: in `/tmp` anyone could have made it first); a folder given by the user is
/// created private, and only warned about when it is shared.
fn socket_folder(args: &mut Args) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let uid = nix::unistd::geteuid().as_raw();
    let default = args.shard_uds_path.is_empty();
    if default {
        let dir = std::env::temp_dir().join(format!("tessera-{uid}"));
        args.shard_uds_path = dir.join("server").display().to_string();
    }
    let path = PathBuf::from(&args.shard_uds_path);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the socket folder {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        return Ok(());
    }
    let meta = std::fs::metadata(dir)?;
    let shared = meta.mode() & 0o022 != 0;
    if default && (meta.uid() != uid || shared) {
        bail!(
            "the socket folder {} is not private (owner uid {}, mode {:o}): remove it, or pass --shard-uds-path inside a folder only you can write to",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o777
        );
    }
    if shared {
        tracing::warn!(
            "the shard sockets are in {}, which others may write to; a private folder is safer",
            dir.display()
        );
    }
    Ok(())
}

fn run(mut args: Args, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    args.validate()?;
    socket_folder(&mut args)?;
    if args.env {
        print_env();
    }
    let model_dir = hub::resolve(
        &args.model_id,
        args.revision.as_deref(),
        args.huggingface_hub_cache.as_deref(),
    )?;
    let config = check_model(&model_dir)?;
    if let Some(method) = config
        .pointer("/quantization_config/quant_method")
        .and_then(|m| m.as_str())
    {
        bail!("`{}` is quantized ({method}); quantized checkpoints are not supported by this version of Tessera", args.model_id);
    }
    // Fail before loading anything when the port is taken.
    let addr = format!("{}:{}", args.hostname, args.port);
    std::net::TcpListener::bind(&addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let positions = ["max_position_embeddings", "n_positions", "max_seq_len"]
        .iter()
        .find_map(|k| config.get(*k)?.as_u64())
        .unwrap_or(4096) as u32;
    // TGI's default prefill budget (4096), never beyond the model's context.
    let max_batch_prefill_tokens = args.max_batch_prefill_tokens.unwrap_or_else(|| {
        let default = 4096.min(positions);
        args.max_input_tokens()
            .map_or(default, |i| default.max(i as u32))
    });
    let timeout = Duration::from_secs(args.graceful_termination_timeout);

    // Pool records let a restarted shard group rebuild its KV pools (see the shard's warmup);
    // a fresh launch must not inherit another run's.
    remove_pool_records(&args);
    let Some(mut shards) = start_shards(&args, &model_dir, &stop)? else {
        return Ok(());
    };
    tracing::info!("Starting router");
    let router = match Supervised::spawn(
        "router",
        router_command(&args, &model_dir, max_batch_prefill_tokens),
        args.json_output,
    ) {
        Ok(router) => router,
        Err(e) => {
            stop_all(&mut shards, timeout);
            return Err(e);
        }
    };
    let result = supervise(
        &args,
        &model_dir,
        max_batch_prefill_tokens,
        &stop,
        shards,
        router,
    );
    remove_pool_records(&args);
    result
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.json_output);
    // Set by SIGINT/SIGTERM/SIGHUP; the supervision loop sees it within 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("Error: cannot install signal handler: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(args, stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
