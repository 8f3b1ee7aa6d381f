//! The launcher's command line: TGI's flag names, env vars and defaults. Flags for features
//! Tessera does not have yet are still parsed, so that a TGI deployment's command line is
//! understood, but setting one is an error that names it: a deployment never silently loses a
//! setting. `docs/cli.md` is generated from `--help`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Dtype {
    #[value(name = "float32")]
    Float32,
    #[value(name = "float16")]
    Float16,
    #[value(name = "bfloat16")]
    Bfloat16,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Quantization {
    Awq,
    CompressedTensors,
    Eetq,
    Exl2,
    Gptq,
    Marlin,
    Bitsandbytes,
    BitsandbytesNf4,
    BitsandbytesFp4,
    Fp8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KvCacheDtype {
    #[value(name = "fp8_e4m3fn")]
    Fp8E4m3fn,
    #[value(name = "fp8_e5m2")]
    Fp8E5m2,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RopeScaling {
    Linear,
    Dynamic,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum UsageStats {
    On,
    Off,
    NoStack,
}

#[derive(Parser, Debug)]
#[command(
    name = "tessera-launcher",
    version,
    about = "Start, supervise and stop Tessera's shards and router (TGI-compatible flags)"
)]
pub struct Args {
    /// The model to serve: a local folder with config.json, tokenizer.json and *.safetensors, or
    /// a Hub id (`org/name`), downloaded into the Hub cache (HF_HOME, HUGGINGFACE_HUB_CACHE;
    /// HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE=1 are honoured).
    #[arg(long, env)]
    pub model_id: String,
    /// The Hub revision (branch, tag or commit) of `--model-id`.
    #[arg(long, env)]
    pub revision: Option<String>,
    /// Run dtype. Defaults to the checkpoint's own dtype, except on a CPU without native bf16
    /// arithmetic (AVX-512 BF16), where 16-bit checkpoints run as float32 (the faster there).
    /// float16 runs as bfloat16 on CPU.
    #[arg(long, env, value_enum)]
    pub dtype: Option<Dtype>,
    /// Where the shards run: `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    /// A Tessera extension; TGI picks the device from the environment.
    #[arg(long, env, default_value = "auto")]
    pub device: String,
    /// Number of tensor-parallel shards: one process per rank, each holding a slice of the
    /// model. On CPU they talk through shared memory; on GPUs through NCCL, rank r on the r-th
    /// GPU from `--device`.
    /// Head counts must divide by it (SmolLM2's 9 heads: 1, 3 or 9).
    #[arg(long, env)]
    pub num_shard: Option<usize>,
    /// The port the HTTP server listens on.
    #[arg(short, long, env, default_value_t = 3000)]
    pub port: u16,
    /// The address the HTTP server binds.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,
    /// Base path of the shards' Unix sockets (`{path}-{rank}`); make it unique to run
    /// several instances side by side. By default `tessera-<uid>/server` in the temporary
    /// folder, a folder only this user may enter (created with mode 0700, refused if anyone
    /// else could write to it).
    #[arg(long, env, default_value = "", hide_default_value = true)]
    pub shard_uds_path: String,
    /// Requests in flight at once; more get 429 at once (each `n` / `best_of` sequence counts).
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Largest `best_of` a request may ask for.
    #[arg(long, env, default_value_t = 2)]
    pub max_best_of: usize,
    /// Most stop sequences per request.
    #[arg(long, env, default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// Largest `top_n_tokens` (and `top_logprobs`) a request may ask for.
    #[arg(long, env, default_value_t = 5)]
    pub max_top_n_tokens: u32,
    /// Longest prompt in tokens. Defaults to what the model and the prefill budget allow.
    #[arg(long, env)]
    pub max_input_tokens: Option<usize>,
    /// Longest prompt plus generation in tokens. Defaults to the model's context length.
    #[arg(long, env)]
    pub max_total_tokens: Option<usize>,
    /// Most prompt tokens one prefill may process.
    #[arg(long, env)]
    pub max_batch_prefill_tokens: Option<u32>,
    /// Most KV tokens the running batch may hold. Defaults to what warmup measures.
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<u32>,
    /// Decode steps a waiting request may be held back to let a bigger group form.
    #[arg(long, env, default_value_t = 20)]
    pub max_waiting_tokens: usize,
    /// Admit waiting requests into the running batch only when at least this fraction of its
    /// size can join (unless --max-waiting-tokens steps have passed).
    #[arg(long, env, default_value_t = 0.3)]
    pub waiting_served_ratio: f32,
    /// Reuse the KV cache of prompts that share a prefix (radix prefix cache). TGI reads the
    /// same PREFIX_CACHING variable.
    #[arg(long, env, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
    /// Most requests in the running batch.
    #[arg(long, env)]
    pub max_batch_size: Option<usize>,
    /// Most prompts in one /v1/completions request.
    #[arg(long, env, default_value_t = 4)]
    pub max_client_batch_size: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env, default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// Fraction of free memory (device memory on CUDA, RAM on CPU) the KV cache may use.
    #[arg(long, env, default_value_t = 0.5)]
    pub cuda_memory_fraction: f64,
    /// Seconds to wait for a child to stop after SIGTERM before killing it.
    #[arg(short, long, env, default_value_t = 90)]
    pub graceful_termination_timeout: u64,
    /// How many times in a row a crashed shard is restarted before the launcher gives up
    /// (beyond TGI, which stops the whole service on the first crash). 0 disables restarts.
    #[arg(long, env, default_value_t = 3)]
    pub max_restarts: u32,
    /// Seconds before the first restart of a crashed shard; each further one in a row waits
    /// twice as long (at most 32 times this).
    #[arg(long, env, default_value_t = 1.0)]
    pub restart_backoff: f64,
    /// Seconds a running shard may go without answering a liveness probe (an Info call, which
    /// does not wait for the model) before it is taken for hung, killed and restarted like a
    /// crashed one (beyond TGI, where a hung shard hangs the service). 0 disables the probe.
    #[arg(long, env, default_value_t = 30.0)]
    pub shard_hang_timeout: f64,
    /// Log as JSON lines (passed on to the router and shards).
    #[arg(long, env)]
    pub json_output: bool,
    /// Require `Authorization: Bearer <key>` on every route but health probes and metrics.
    #[arg(long, env)]
    pub api_key: Option<String>,
    /// Allowed CORS origins (repeat the flag); any origin when unset.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Refused: Tessera never runs code from a model repository.
    #[arg(long, env)]
    pub trust_remote_code: bool,
    /// Not supported yet: quantized weights (an error when set, or when config.json asks for it).
    #[arg(long, env, value_enum)]
    pub quantize: Option<Quantization>,
    /// Not supported yet: speculative decoding.
    #[arg(long, env)]
    pub speculate: Option<usize>,
    /// Not supported yet: an fp8 KV cache.
    #[arg(long, env, value_enum)]
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// The Hub cache folder (default: $HF_HOME/hub).
    #[arg(long, env)]
    pub huggingface_hub_cache: Option<PathBuf>,
    /// Not supported: weights are always read from the model folder or the Hub cache.
    #[arg(long, env)]
    pub weights_cache_override: Option<String>,
    /// Runs every op on libtorch, without the shard's hand-written CPU decode kernels (for
    /// comparison, or should one misbehave on a CPU): slower decode.
    #[arg(long, env)]
    pub disable_custom_kernels: bool,
    /// Override the model's RoPE scaling (as TGI): `--rope-factor 2.0` alone is linear scaling by
    /// 2; `--rope-scaling dynamic` alone is dynamic scaling with factor 1.
    #[arg(long, env, value_enum)]
    pub rope_scaling: Option<RopeScaling>,
    /// The RoPE scaling factor (see --rope-scaling).
    #[arg(long, env)]
    pub rope_factor: Option<f32>,
    /// Not supported yet: LoRA adapters.
    #[arg(long, env)]
    pub lora_adapters: Option<String>,
    /// A tokenizer_config.json (with the chat template) to use instead of the model's.
    #[arg(long, env)]
    pub tokenizer_config_path: Option<PathBuf>,
    /// Shard the model (TGI semantics; needs --num-shard, as Tessera does not count GPUs).
    #[arg(long, env)]
    pub sharded: Option<bool>,
    /// Address and port for the shards' rendezvous (passed to them as MASTER_ADDR/MASTER_PORT).
    #[arg(long, env, default_value = "localhost")]
    pub master_addr: String,
    /// See --master-addr.
    #[arg(long, env, default_value_t = 29500)]
    pub master_port: u16,
    /// Not supported yet: CUDA graphs. `0` (disabled) is accepted.
    #[arg(long, env, value_delimiter = ',')]
    pub cuda_graphs: Option<Vec<usize>>,
    /// Legacy name of --max-input-tokens.
    #[arg(long, env)]
    pub max_input_length: Option<usize>,
    /// Tokenizer worker threads in the router (must be > 0).
    #[arg(long, env, default_value_t = 2)]
    pub validation_workers: usize,
    /// Refuse grammars, `response_format` and tools (structured output) with a 422.
    #[arg(long, env)]
    pub disable_grammar_support: bool,
    /// Accepted: prompt logprobs are always returned when a request asks for them.
    #[arg(long, env)]
    pub enable_prefill_logprobs: bool,
    /// Also serve /metrics on this port (TGI serves it on 9000 by default; Tessera only when
    /// asked, so that several instances can share a host).
    #[arg(long, env)]
    pub prometheus_port: Option<u16>,
    /// Not supported: ngrok tunnelling.
    #[arg(long, env)]
    pub ngrok: bool,
    /// Not supported (see --ngrok).
    #[arg(long, env)]
    pub ngrok_authtoken: Option<String>,
    /// Not supported (see --ngrok).
    #[arg(long, env)]
    pub ngrok_edge: Option<String>,
    /// Export OpenTelemetry traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317),
    /// from the router and every shard, in one trace per request.
    #[arg(long, env)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the router's spans. The shards report `<name>.shard` (with a trailing
    /// `.router` replaced), so router and shard spans can be told apart (TGI gives both the same name).
    #[arg(long, env, default_value = "text-generation-inference.router")]
    pub otlp_service_name: String,
    /// Accepted for compatibility: Tessera never sends usage statistics.
    #[arg(long, env, value_enum, default_value = "on")]
    pub usage_stats: UsageStats,
    /// Accepted for compatibility: Tessera never sends usage statistics.
    #[arg(long, env)]
    pub disable_usage_stats: bool,
    /// Watermark green-list fraction for requests with `watermark: true` (Kirchenbauer et al.; default 0.5).
    #[arg(long, env)]
    pub watermark_gamma: Option<f32>,
    /// Watermark logit bias of green-list tokens (default 2.0).
    #[arg(long, env)]
    pub watermark_delta: Option<f32>,
    /// Intra-op threads of each CPU shard (default: the host's cores divided by the number of
    /// shards, so that ranks do not oversubscribe the cores; each shard is also pinned to its
    /// own cores).
    #[arg(long, env)]
    pub threads_per_shard: Option<usize>,
    /// Do not serve the built-in web playground and live dashboard at /ui.
    #[arg(long, env)]
    pub disable_ui: bool,
    /// Print the runtime environment (versions, GPUs) at startup.
    #[arg(short, long)]
    pub env: bool,
    /// Where the tessera-shard and tessera-router binaries are (defaults to the launcher's folder, then PATH).
    #[arg(long, env = "TESSERA_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
}

impl Args {
    /// The number of shard processes (tensor-parallel ranks); `validate` has checked it.
    pub fn world_size(&self) -> usize {
        self.num_shard.unwrap_or(1).max(1)
    }

    /// TGI's argument checks ("Invalid argument: ...") and the refusals of features Tessera
    /// does not have yet, before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        let d = self.device.as_str();
        let cuda_n = d
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
        if !matches!(d, "auto" | "cpu" | "cuda") && !cuda_n {
            bail!("Invalid argument: `--device` must be auto, cpu, cuda or cuda:N, got `{d}`");
        }
        let unsupported = [
            (self.quantize.is_some(), "--quantize (quantized weights)"),
            (
                self.speculate.is_some_and(|s| s > 0),
                "--speculate (speculative decoding)",
            ),
            (
                self.kv_cache_dtype.is_some(),
                "--kv-cache-dtype (an fp8 KV cache)",
            ),
            (
                self.weights_cache_override.is_some(),
                "--weights-cache-override",
            ),
            (self.lora_adapters.is_some(), "--lora-adapters (LoRA)"),
            (
                self.cuda_graphs
                    .as_ref()
                    .is_some_and(|g| g.iter().any(|&b| b != 0)),
                "--cuda-graphs (use 0 or leave it unset)",
            ),
            (
                self.ngrok || self.ngrok_authtoken.is_some() || self.ngrok_edge.is_some(),
                "--ngrok",
            ),
        ];
        if let Some((_, flag)) = unsupported.iter().find(|(set, _)| *set) {
            bail!("{flag} is not supported by this version of Tessera");
        }
        if self.trust_remote_code {
            bail!("`--trust-remote-code` is not supported: Tessera runs only its own model code");
        }
        if let (Some(a), Some(b)) = (self.max_input_tokens, self.max_input_length) {
            bail!(
                "Invalid argument: Both `max_input_tokens` ({a}) and `max_input_length` ({b}) are set. Please define only \
                 `max_input_tokens` as `max_input_length is deprecated for naming consistency."
            );
        }
        let num_shard = match (self.sharded, self.num_shard) {
            (Some(true), None) => bail!(
                "`sharded` is true but `num_shard` is not set (Tessera does not count GPUs yet)"
            ),
            (Some(true), Some(n)) if n <= 1 => bail!("`sharded` is true but `num_shard` <= 1"),
            (_, Some(n)) => n,
            (_, None) => 1,
        };
        if num_shard < 1 {
            bail!("`num_shard` cannot be < 1");
        }
        if num_shard > 64 {
            bail!("Invalid argument: `--num-shard` {num_shard}: at most 64 shards");
        }
        if let (Some(i), Some(t)) = (self.max_input_tokens(), self.max_total_tokens) {
            if i >= t {
                bail!(
                    "Invalid argument: `max_input_tokens`({i}) must be < `max_total_tokens`({t})"
                );
            }
        }
        if self.validation_workers == 0 {
            bail!("Invalid argument: `validation_workers` must be > 0");
        }
        if let (Some(t), Some(b)) = (self.max_total_tokens, self.max_batch_total_tokens) {
            if t > b as usize {
                bail!("Invalid argument: `max_total_tokens` must be <= `max_batch_total_tokens`. Given: {t} and {b}");
            }
        }
        if !(self.cuda_memory_fraction > 0.0 && self.cuda_memory_fraction <= 1.0) {
            bail!("Invalid argument: `cuda_memory_fraction` must be in (0, 1]");
        }
        Ok(())
    }

    /// `--max-input-tokens`, or its legacy name.
    pub fn max_input_tokens(&self) -> Option<usize> {
        self.max_input_tokens.or(self.max_input_length)
    }
}
