//! Models from the Hugging Face Hub: `--model-id org/name` is resolved to a local snapshot
//! folder in the standard Hub cache, downloading what is missing (safetensors weights, config
//! and tokenizer files only).
//!
//! The `hf-hub` crate does the HTTP work (HF_ENDPOINT, resumable downloads into
//! `blobs/*.incomplete`, the cache layout). This module decides which files a model needs, logs
//! progress, honours HF_TOKEN and HF_HUB_OFFLINE, and turns failures into one clear line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

/// Files a served model needs besides its weights; missing optional ones are fine.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

/// `--huggingface-hub-cache` (clap also reads HUGGINGFACE_HUB_CACHE), else HF_HUB_CACHE, else
/// `$HF_HOME/hub`.
fn cache(dir: Option<&Path>) -> Cache {
    match dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var("HF_HUB_CACHE").ok().map(PathBuf::from))
    {
        Some(dir) => Cache::new(dir),
        None => Cache::from_env(),
    }
}

fn repo(model_id: &str, revision: Option<&str>) -> Repo {
    Repo::with_revision(
        model_id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    )
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "True" | "yes"))
}

/// Logs a line at every 10% of a file.
struct LogProgress {
    name: String,
    size: usize,
    done: usize,
    next_report: usize,
    start: Instant,
}

impl Progress for LogProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.name = filename.to_string();
        self.size = size;
        self.next_report = size / 10;
    }

    fn update(&mut self, size: usize) {
        self.done += size;
        if self.done >= self.next_report && self.done < self.size {
            tracing::info!(
                "Downloading {}: {}%",
                self.name,
                self.done * 100 / self.size.max(1)
            );
            self.next_report += (self.size / 10).max(1);
        }
    }

    fn finish(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        tracing::info!(
            "Downloaded {} ({} bytes) in {secs:.1}s",
            self.name,
            self.size
        );
    }
}

fn describe(e: hf_hub::api::sync::ApiError, model_id: &str) -> anyhow::Error {
    let text = e.to_string();
    if text.contains("404") {
        anyhow!("model `{model_id}` was not found on the Hub (HTTP 404): check the id and --revision, or HF_TOKEN for a private model")
    } else if text.contains("401") || text.contains("403") {
        anyhow!(
            "access to `{model_id}` was refused ({text}): set HF_TOKEN to a token that can read it"
        )
    } else {
        anyhow!("cannot download `{model_id}`: {text}")
    }
}

/// The cached copy of `file` for this revision, or a fresh download of it.
fn fetch(
    api: &ApiRepo,
    cached: &CacheRepo,
    cache_root: &Path,
    file: &str,
    model_id: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = cached.get(file) {
        return Ok(path);
    }
    let progress = LogProgress {
        name: file.into(),
        size: 0,
        done: 0,
        next_report: 0,
        start: Instant::now(),
    };
    api.download_with_progress(file, progress)
        .map_err(|e| match e {
            hf_hub::api::sync::ApiError::IoError(io)
                if io.kind() == std::io::ErrorKind::StorageFull =>
            {
                anyhow!(
                    "the disk holding the Hub cache ({}) is full ({io}) while downloading `{file}` of `{model_id}`: free some space or set --huggingface-hub-cache to a larger disk; what was downloaded is kept, and the next start resumes from there",
                    cache_root.display()
                )
            }
            e => describe(e, model_id),
        })
}

/// One part of a Hub id or revision: what the Hub allows, which can never name a parent folder.
fn hub_name(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A local folder for `model_id`: the folder itself when it exists, else the Hub snapshot.
pub fn resolve(
    model_id: &str,
    revision: Option<&str>,
    cache_dir: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let local = Path::new(model_id);
    if local.is_dir() {
        if revision.is_some() {
            bail!("`--revision` applies to Hub models, but `{model_id}` is a local folder");
        }
        return Ok(local.to_path_buf());
    }
    // `models/typo` names a folder that exists locally: a typo of a local path, not a Hub id.
    let parent_exists = local
        .parent()
        .is_some_and(|p| !p.as_os_str().is_empty() && p.is_dir());
    if model_id.split('/').count() != 2
        || model_id.starts_with('.')
        || model_id.starts_with('/')
        || parent_exists
    {
        bail!("model `{model_id}` not found: it is neither a local folder nor a Hub id like `org/name`");
    }
    // Both go into cache paths: nothing that could climb out of the cache.
    if !model_id.split('/').all(hub_name) {
        bail!("`{model_id}` is not a valid Hub id: each part must be letters, digits, `-`, `_` or `.`, and not `.` or `..`");
    }
    if let Some(rev) = revision.filter(|r| !r.split('/').all(hub_name)) {
        bail!("`{rev}` is not a valid revision");
    }
    let cached = cache(cache_dir).repo(repo(model_id, revision));
    if offline() {
        let config = cached.get("config.json").ok_or_else(|| {
            anyhow!("HF_HUB_OFFLINE is set and `{model_id}` is not in the Hub cache")
        })?;
        let dir = config
            .parent()
            .map(Path::to_path_buf)
            .context("cache layout")?;
        tracing::info!(
            "Using the cached `{model_id}` at {} (offline)",
            dir.display()
        );
        return Ok(dir);
    }
    let token = std::env::var("HF_TOKEN")
        .or_else(|_| std::env::var("HF_API_TOKEN"))
        .ok();
    let api = ApiBuilder::from_cache(cache(cache_dir))
        .with_progress(false)
        .with_token(token)
        .with_endpoint(
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()),
        )
        .build()
        .map_err(|e| anyhow!("cannot set up the Hub client: {e}"))?
        .repo(repo(model_id, revision));
    let info = api.info().map_err(|e| describe(e, model_id))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let weights: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
        .collect();
    if weights.is_empty() {
        bail!(
            "`{model_id}` has no .safetensors weights (only safetensors are loaded, never pickles)"
        );
    }
    for required in REQUIRED {
        if !files.iter().any(|f| f == required) {
            bail!("`{model_id}` has no {required}");
        }
    }
    let start = Instant::now();
    let mut dir = None;
    let wanted = REQUIRED
        .iter()
        .chain(OPTIONAL)
        .filter(|f| files.iter().any(|x| x == *f))
        .map(|f| f.to_string());
    for file in wanted.chain(weights.into_iter().cloned()) {
        let path = fetch(&api, &cached, cache(cache_dir).path(), &file, model_id)?;
        // The snapshot folder is named by the commit the server reports: make sure a hostile
        // mirror could not have placed a file outside the cache.
        let root = cache(cache_dir)
            .path()
            .canonicalize()
            .context("the Hub cache")?;
        if !path.canonicalize().is_ok_and(|p| p.starts_with(&root)) {
            bail!(
                "`{file}` of `{model_id}` landed outside the Hub cache ({}): refusing it",
                path.display()
            );
        }
        dir = dir.or_else(|| path.parent().map(Path::to_path_buf));
    }
    let dir = dir.context("nothing downloaded")?;
    tracing::info!(
        "`{model_id}` ready at {} in {:.1}s",
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(dir)
}
