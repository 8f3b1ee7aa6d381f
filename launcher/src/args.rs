//! The launcher's command line: TGI's flag names, env vars and defaults, for the options this
//! version implements. Options that TGI has but Tessera does not support yet are accepted only
//! at their neutral value, so a deployment never silently loses a setting.

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
    /// Run dtype. Defaults to the checkpoint's own dtype (float16 runs as bfloat16 on CPU).
    #[arg(long, env, value_enum)]
    pub dtype: Option<Dtype>,
    /// Number of tensor-parallel shards. Only 1 is supported in this version.
    #[arg(long, env)]
    pub num_shard: Option<usize>,
    /// The port the HTTP server listens on.
    #[arg(short, long, env, default_value_t = 3000)]
    pub port: u16,
    /// The address the HTTP server binds.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,
    /// Base path of the shards' Unix sockets (`{path}-{rank}`); make it unique to run
    /// several instances side by side.
    #[arg(long, env, default_value = "/tmp/tessera-server")]
    pub shard_uds_path: String,
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,
    #[arg(long, env, default_value_t = 2)]
    pub max_best_of: usize,
    #[arg(long, env, default_value_t = 4)]
    pub max_stop_sequences: usize,
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
    #[arg(long, env, default_value_t = 20)]
    pub max_waiting_tokens: usize,
    #[arg(long, env, default_value_t = 0.3)]
    pub waiting_served_ratio: f32,
    #[arg(long, env)]
    pub max_batch_size: Option<usize>,
    #[arg(long, env, default_value_t = 4)]
    pub max_client_batch_size: usize,
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
    /// Where the tessera-shard and tessera-router binaries are (defaults to the launcher's folder, then PATH).
    #[arg(long, env = "TESSERA_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
}
