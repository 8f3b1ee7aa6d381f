//! The model runner: turns protocol batches into forward passes and forward passes into
//! `Generation`s. It owns the model, the tokenizer, the KV pool and the cached batches; the gRPC
//! layer only hands it requests one at a time.
//!
//! A step lays the batch out as prompt chunks first and single-token decodes last, so the
//! model sees the decodes as one contiguous group it can attend in a single batched call.
//! Prompts longer than the prefill budget advance one chunk per step (TGI's pacing: older
//! requests first, every running request keeps a token of budget).

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tessera_proto as pb;
use tokenizers::Tokenizer;

use crate::batch::{Batch, BatchRegistry};
use crate::config::{token_ids, ModelConfig};
use crate::detokenizer::Finish;
use crate::error::{Result, ShardError};
use crate::grammar::Grammars;
use crate::kv_cache::KvPool;
use crate::model::{DecodeSpan, ForwardInput, PrefillSpan, Transformer};
use crate::sampler::{self, Choice};
use crate::sequence::Sequence;

/// Tokens per KV block (what `Info.block_size` reports and the router allocates in).
pub const BLOCK_SIZE: usize = 16;

pub struct Runner {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    eos: HashSet<u32>,
    /// Compiled grammars and their masks (structured output).
    grammars: Grammars,
    special: HashSet<u32>,
    batches: BatchRegistry,
    pool: Option<KvPool>,
    /// Prompt tokens one forward pass may take (from warmup); paces chunked prompts.
    max_prefill_tokens: usize,
}

/// Where one sequence's rows sit in a step.
struct RowPlan {
    seq: usize,
    /// Its first row in the logits.
    first_row: usize,
    /// Rows giving prompt-token logprobs (before the sampling row).
    prompt_rows: usize,
    /// Whether its last logits row picks a new token.
    sample: bool,
}

/// What one Prefill or Decode call produced.
pub struct StepOutput {
    pub generations: Vec<pb::Generation>,
    pub batch: Option<pb::CachedBatch>,
    pub forward_ns: u64,
    pub decode_ns: u64,
    /// Time spent merging batches, when this call merged any (TGI reports it only then).
    pub concat_ns: Option<u64>,
}

/// Parses a `--dtype` value (TGI spelling) or the checkpoint's `torch_dtype`.
pub fn parse_kind(name: &str) -> Option<Kind> {
    match name {
        "float32" | "f32" | "fp32" => Some(Kind::Float),
        "bfloat16" | "bf16" => Some(Kind::BFloat16),
        "float16" | "f16" | "fp16" | "half" => Some(Kind::Half),
        _ => None,
    }
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "unknown",
    }
}

/// The run dtype when `--dtype` is not given, from the checkpoint's. On a CPU without native
/// bf16 arithmetic (AVX-512 BF16 on x86), a 16-bit checkpoint runs in f32: libtorch emulates
/// bf16 matmuls there (a 1024² bf16 matmul runs at 0.8 GFLOP/s against 57 in f32 on the Zen 3
/// VM; a 4096-token warmup of SmolLM2-135M took 70 s in bf16, 20 s in f32).
pub fn default_kind(checkpoint: Kind, device: Device) -> Kind {
    let reduced = matches!(checkpoint, Kind::BFloat16 | Kind::Half);
    if device == Device::Cpu && reduced && !cpu_has_native_bf16() {
        tracing::info!(
            "this CPU has no native bf16 arithmetic: running the {} checkpoint in float32 \
             (--dtype bfloat16 forces bf16)",
            kind_name(checkpoint)
        );
        return Kind::Float;
    }
    checkpoint
}

/// Whether this CPU computes bf16 natively. Outside x86 the checkpoint's dtype is trusted.
pub fn cpu_has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// The id of tokenizer_config.json's `eos_token`.
fn tokenizer_eos(dir: &Path, tokenizer: &Tokenizer) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let eos = config.get("eos_token")?;
    tokenizer.token_to_id(eos.as_str().or_else(|| eos.get("content")?.as_str())?)
}

/// The EOS ids, the main one first: generation_config.json's list wins (as in transformers), then config.json, then
/// the tokenizer's `eos_token`.
fn eos_ids(dir: &Path, config: &ModelConfig, tokenizer: &Tokenizer) -> Vec<u32> {
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
    };
    let mut ids = read("generation_config.json")
        .map(|g| token_ids(g.get("eos_token_id")))
        .unwrap_or_default();
    if ids.is_empty() {
        ids = config.eos_token_ids.clone();
    }
    if ids.is_empty() {
        ids.extend(tokenizer_eos(dir, tokenizer));
    }
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

impl Runner {
    /// Loads the checkpoint in `dir`. `dtype` overrides the checkpoint's own dtype.
    pub fn load(dir: &Path, dtype: Option<&str>, device: Device) -> Result<Self> {
        Self::load_rank(dir, dtype, device, None)
    }

    /// Loads one tensor-parallel rank's slice of the checkpoint (`comm` says which rank); the
    /// whole model without one.
    pub fn load_rank(
        dir: &Path,
        dtype: Option<&str>,
        device: Device,
        comm: Option<Box<dyn crate::comm::Communicator>>,
    ) -> Result<Self> {
        if device == Device::Cpu {
            crate::allocator::keep_freed_memory();
        }
        let config = ModelConfig::from_dir(dir)?;
        let kind = match dtype {
            Some(d) => {
                let kind = parse_kind(d)
                    .ok_or_else(|| ShardError::Request(format!("unknown dtype `{d}`")))?;
                if device == Device::Cpu && kind != Kind::Float && !cpu_has_native_bf16() {
                    tracing::warn!(
                        "--dtype {d} on a CPU without native bf16: libtorch emulates it, and its \
                         matmuls run about 100 times slower than float32 here"
                    );
                }
                kind
            }
            None => default_kind(
                config
                    .torch_dtype
                    .as_deref()
                    .and_then(parse_kind)
                    .unwrap_or(Kind::Float),
                device,
            ),
        };
        // f16 matmuls are unusably slow on CPU; bf16 has the same size and range enough.
        let kind = if kind == Kind::Half && device == Device::Cpu {
            Kind::BFloat16
        } else {
            kind
        };
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ShardError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let weights = crate::weights::Weights::open(dir, kind, device)?;
        let eos_list = eos_ids(dir, &config, &tokenizer);
        let eos: HashSet<u32> = eos_list.iter().copied().collect();
        // A grammar ends on one EOS: the tokenizer's own (Llama 3 Instruct's `<|eot_id|>`, the
        // token the model ends a turn with) when it stops generation, else the first listed.
        let chat_eos = tokenizer_eos(dir, &tokenizer).filter(|id| eos.contains(id));
        let grammars = match chat_eos.or(eos_list.first().copied()) {
            Some(main) => Grammars::new(&tokenizer, main, &eos, config.vocab_size as i64),
            None => Grammars::unavailable("the model has no EOS token to end an output with"),
        };
        let special = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let mut model = {
            let _guard = tch::no_grad_guard();
            let model = crate::model::load(config, &weights, kind, device)?;
            match comm {
                Some(comm) if comm.world_size() > 1 => {
                    model.shard(crate::model::parallel::Parallel::new(comm))?
                }
                _ => model,
            }
        };
        if device == Device::Cpu {
            crate::allocator::pack_in_huge_pages(model.product_weights());
        }
        Ok(Self {
            model,
            tokenizer,
            eos,
            grammars,
            special,
            batches: BatchRegistry::default(),
            pool: None,
            max_prefill_tokens: 4096,
        })
    }

    pub fn eos_token_ids(&self) -> &HashSet<u32> {
        &self.eos
    }

    /// (Re)allocates the KV pool with `num_blocks` blocks. Running batches are dropped: their
    /// K/V lived in the old pool.
    pub fn allocate_pool(&mut self, num_blocks: usize) -> Result<()> {
        self.batches.clear(None);
        self.pool = None;
        self.pool = Some(KvPool::new(self.model.kv_layout(), BLOCK_SIZE, num_blocks)?);
        Ok(())
    }

    pub fn free_pool(&mut self) {
        self.batches.clear(None);
        self.pool = None;
    }

    pub fn pool(&self) -> Option<&KvPool> {
        self.pool.as_ref()
    }

    pub fn set_max_prefill_tokens(&mut self, tokens: usize) {
        self.max_prefill_tokens = tokens.max(1);
    }

    fn pool_ref(&self) -> Result<&KvPool> {
        self.pool.as_ref().ok_or_else(|| {
            ShardError::Request("the KV cache is not allocated yet: call Warmup first".into())
        })
    }

    /// Prefill of a new batch, folded into one forward pass with a step of `cached` when given
    /// (its decodes and its next prompt chunks). The result keeps the cached batch's id.
    pub fn prefill(
        &mut self,
        batch: &pb::Batch,
        cached: Option<&pb::CachedBatch>,
    ) -> Result<StepOutput> {
        let pool = self.pool_ref()?;
        let positions = self.model.config.max_position_embeddings;
        let new = batch
            .requests
            .iter()
            .map(|r| {
                crate::admission::new_sequence(&self.tokenizer, &self.grammars, pool, positions, r)
            })
            .collect::<Result<Vec<_>>>()?;
        let concat = Instant::now();
        let (merged, concat_ns) = match cached {
            Some(c) => {
                let mut old = self.batches.take(c.id)?;
                old.seqs.extend(new);
                (old, Some(concat.elapsed().as_nanos() as u64))
            }
            None => (
                Batch {
                    id: batch.id,
                    seqs: new,
                },
                None,
            ),
        };
        let out = self.step(merged)?;
        Ok(StepOutput { concat_ns, ..out })
    }

    pub fn decode(&mut self, batches: &[pb::CachedBatch]) -> Result<StepOutput> {
        let ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
        let concat = Instant::now();
        let batch = self.batches.take_concat(&ids)?;
        let concat_ns = (ids.len() > 1).then(|| concat.elapsed().as_nanos() as u64);
        let out = self.step(batch)?;
        Ok(StepOutput { concat_ns, ..out })
    }

    pub fn filter(&mut self, id: u64, request_ids: &[u64]) -> Result<Option<pb::CachedBatch>> {
        self.batches.filter(id, request_ids)
    }

    pub fn clear(&mut self, id: Option<u64>) {
        self.batches.clear(id)
    }

    /// Whether this rank's tensor-parallel group broke (a collective failed): the shard can
    /// only exit, so that the launcher restarts the group.
    pub fn group_broken(&self) -> bool {
        self.model.parallel.as_ref().is_some_and(|p| p.broken())
    }

    /// Builds the forward input: prompt chunks first, then single-token steps.
    fn layout(&self, batch: &Batch) -> Result<(Option<ForwardInput>, Vec<RowPlan>)> {
        let device = self.model.device();
        let mut order: Vec<usize> = Vec::with_capacity(batch.seqs.len());
        let active = |s: &Sequence| s.finished.is_none();
        order.extend(
            (0..batch.seqs.len()).filter(|&i| active(&batch.seqs[i]) && batch.seqs[i].chunk > 1),
        );
        order.extend(
            (0..batch.seqs.len()).filter(|&i| active(&batch.seqs[i]) && batch.seqs[i].chunk == 1),
        );
        if order.is_empty() {
            return Ok((None, Vec::new()));
        }
        let (mut ids, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let mut prefills = Vec::new();
        let (mut decode_lens, mut decode_ctx): (Vec<i64>, Vec<&[i64]>) = (Vec::new(), Vec::new());
        let mut decode_start = None;
        let mut logit_rows: Vec<i64> = Vec::new();
        let mut plans = Vec::with_capacity(order.len());
        for i in order {
            let s = &batch.seqs[i];
            let (past, n) = (s.cached, s.chunk);
            let base = ids.len() as i64;
            ids.extend(s.pending().iter().map(|&t| t as i64));
            positions.extend((past..past + n).map(|p| p as i64));
            slots.extend_from_slice(&s.slots[past..past + n]);
            if n > 1 {
                prefills.push(PrefillSpan {
                    start: base,
                    len: n as i64,
                    past: past as i64,
                    context: (past > 0)
                        .then(|| Tensor::from_slice(&s.slots[..past + n]).to_device(device)),
                });
            } else {
                decode_start.get_or_insert(base);
                decode_lens.push(past as i64 + 1);
                decode_ctx.push(&s.slots[..past + 1]);
            }
            let first_row = logit_rows.len();
            // Prompt logprobs: row p predicts token p + 1, for every p whose successor is in the prompt.
            if s.prefill_logprobs && s.prefilling() {
                let end = (past + n).min(s.prompt_len - 1);
                logit_rows.extend((0..end.saturating_sub(past) as i64).map(|r| base + r));
            }
            let prompt_rows = logit_rows.len() - first_row;
            let sample = s.yields_token();
            if sample {
                logit_rows.push(base + n as i64 - 1);
            }
            plans.push(RowPlan {
                seq: i,
                first_row,
                prompt_rows,
                sample,
            });
        }
        let decode = decode_start.map(|start| {
            let width = decode_lens.iter().copied().max().unwrap_or(1) as usize;
            let mut ctx = vec![0i64; decode_ctx.len() * width];
            for (row, c) in decode_ctx.iter().enumerate() {
                ctx[row * width..row * width + c.len()].copy_from_slice(c);
            }
            DecodeSpan {
                start,
                context: Tensor::from_slice(&ctx)
                    .view([decode_ctx.len() as i64, width as i64])
                    .to_device(device),
                context_cpu: ctx,
                lens: decode_lens,
            }
        });
        let input = ForwardInput {
            input_ids: Tensor::from_slice(&ids).to_device(device),
            positions: Tensor::from_slice(&positions).to_device(device),
            slots: Tensor::from_slice(&slots).to_device(device),
            prefills,
            decode,
            logit_rows: Tensor::from_slice(&logit_rows).to_device(device),
        };
        Ok((Some(input), plans))
    }

    /// One forward pass over every unfinished sequence of `batch`, then token choice.
    fn step(&mut self, mut batch: Batch) -> Result<StepOutput> {
        let start = Instant::now();
        let (input, plans) = self.layout(&batch)?;
        let Some(input) = input else {
            let summary = self.batches.store(batch);
            return Ok(StepOutput {
                generations: Vec::new(),
                batch: summary,
                forward_ns: 0,
                decode_ns: 0,
                concat_ns: None,
            });
        };
        let logits = {
            let _span = tracing::info_span!(
                "forward",
                sequences = batch.seqs.len(),
                tokens = input.input_ids.size()[0]
            )
            .entered();
            let _guard = tch::no_grad_guard();
            let pool = self
                .pool
                .as_mut()
                .ok_or_else(|| ShardError::Request("the KV cache is not allocated".into()))?;
            for p in &plans {
                let s = &batch.seqs[p.seq];
                pool.mark_written(&s.slots[s.cached..s.cached + s.chunk]);
            }
            if let Some(group) = &self.model.parallel {
                group.begin_step(batch.step_tag());
            }
            let logits = self.model.forward(&input, pool);
            // A GPU runs the pass asynchronously: wait for it, so that the forward time (the
            // metric and the trace span) is the pass's, not its launches'. Sampling would wait
            // for it a few microseconds later anyway.
            if let Device::Cuda(i) = self.model.device() {
                tch::Cuda::synchronize(i as i64);
            }
            logits
        };
        let forward_ns = start.elapsed().as_nanos() as u64;
        let decode_start = Instant::now();
        let _span = tracing::info_span!("sample", sequences = plans.len()).entered();
        let _guard = tch::no_grad_guard();
        self.prompt_logprobs(&mut batch, &plans, &logits)?;
        let sample_plans: Vec<&RowPlan> = plans.iter().filter(|p| p.sample).collect();
        let rows: Vec<i64> = sample_plans
            .iter()
            .map(|p| (p.first_row + p.prompt_rows) as i64)
            .collect();
        let choices = if rows.is_empty() {
            Vec::new()
        } else {
            // In row order, which is not the batch's order: prompt chunks come first, so when a
            // prefill joins running decodes its rows lead.
            let mut by_index: Vec<Option<&mut Sequence>> =
                batch.seqs.iter_mut().map(Some).collect();
            let mut seqs: Vec<&mut Sequence> = Vec::with_capacity(rows.len());
            for p in &sample_plans {
                seqs.push(by_index[p.seq].take().ok_or_else(|| {
                    ShardError::Request(format!("sequence {} planned twice", p.seq))
                })?);
            }
            match sampler::choose_greedy(&logits, &rows, &seqs) {
                Some(choices) => choices,
                None => {
                    let scores = logits
                        .index_select(0, &Tensor::from_slice(&rows).to_device(logits.device()));
                    let constraints = seqs
                        .iter_mut()
                        .map(|s| {
                            let budget = s.budget();
                            (s.constraint.as_mut(), budget)
                        })
                        .collect();
                    let mask = self.grammars.batch_mask(constraints, scores.device())?;
                    sampler::choose_batch(&scores, &mut seqs, mask.as_ref())?
                }
            }
        };
        for p in &plans {
            let s = &mut batch.seqs[p.seq];
            s.cached += s.chunk;
        }
        let mut generations = Vec::with_capacity(choices.len());
        for (p, choice) in sample_plans.iter().zip(choices) {
            generations.push(self.next_token(&mut batch.seqs[p.seq], choice)?);
        }
        self.pace_chunks(&mut batch);
        let summary = self.batches.store(batch);
        Ok(StepOutput {
            generations,
            batch: summary,
            forward_ns,
            decode_ns: decode_start.elapsed().as_nanos() as u64,
            concat_ns: None,
        })
    }

    /// Sizes every sequence's next input: 1 token once decoding; for prompts still running,
    /// the next chunk from the prefill budget (older requests first, at least one token each).
    fn pace_chunks(&self, batch: &mut Batch) {
        let live = batch.seqs.iter().filter(|s| s.finished.is_none()).count();
        let mut budget = self
            .max_prefill_tokens
            .saturating_sub(live.saturating_sub(1));
        for s in batch.seqs.iter_mut().filter(|s| s.finished.is_none()) {
            s.chunk = if s.prefilling() {
                let next = (s.prompt_len - s.cached).min(budget).max(1);
                budget = budget.saturating_sub(next);
                next
            } else {
                1
            };
        }
    }

    /// Log-probabilities of the prompt tokens this step covered, for requests that asked.
    fn prompt_logprobs(&self, batch: &mut Batch, plans: &[RowPlan], logits: &Tensor) -> Result<()> {
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for p in plans.iter().filter(|p| p.prompt_rows > 0) {
            let s = &batch.seqs[p.seq];
            rows.extend((p.first_row..p.first_row + p.prompt_rows).map(|r| r as i64));
            targets.extend((0..p.prompt_rows).map(|r| s.tokens[s.cached + r + 1] as i64));
        }
        if rows.is_empty() {
            return Ok(());
        }
        let device = logits.device();
        let picked = logits
            .index_select(0, &Tensor::from_slice(&rows).to_device(device))
            .log_softmax(-1, Kind::Float)
            .gather(
                1,
                &Tensor::from_slice(&targets).to_device(device).unsqueeze(1),
                false,
            )
            .to_device(Device::Cpu);
        let values = Vec::<f32>::try_from(picked.reshape([-1]))?;
        let mut at = 0;
        for p in plans.iter().filter(|p| p.prompt_rows > 0) {
            let s = &mut batch.seqs[p.seq];
            s.prompt_logprobs
                .extend_from_slice(&values[at..at + p.prompt_rows]);
            at += p.prompt_rows;
        }
        Ok(())
    }

    fn token_texts(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter()
            .map(|&id| {
                self.tokenizer
                    .decode(&[id], false)
                    .map_err(|e| ShardError::Tokenizer(e.to_string()))
            })
            .collect()
    }

    fn tokens(&self, ids: Vec<u32>, logprobs: Vec<f32>) -> Result<pb::Tokens> {
        Ok(pb::Tokens {
            texts: self.token_texts(&ids)?,
            is_special: ids.iter().map(|i| self.special.contains(i)).collect(),
            logprobs,
            ids,
        })
    }

    fn next_token(&self, seq: &mut Sequence, choice: Choice) -> Result<pb::Generation> {
        // Prompt tokens with their logprobs go out once, with the first generated token.
        let prefill_tokens = if seq.prefill_logprobs && seq.generated() == 0 {
            let ids = seq.tokens[..seq.prompt_len].to_vec();
            let mut logprobs = std::mem::take(&mut seq.prompt_logprobs);
            logprobs.resize(ids.len(), f32::NAN);
            Some(self.tokens(ids, logprobs)?)
        } else {
            None
        };
        seq.tokens.push(choice.token);
        let text = seq.decoder.next(&self.tokenizer, &seq.tokens)?;
        // A grammar ends on its EOS (even with `ignore_eos_token`, which would only run on past
        // the end of the document); `length` when the token budget had to steer it there.
        let grammar_done = match seq.constraint.as_mut() {
            Some(c) => c.advance(choice.token)?.then_some(if c.forced {
                Finish::Length
            } else {
                Finish::EosToken
            }),
            None => None,
        };
        let finish = grammar_done.or_else(|| {
            seq.stopping
                .check(seq.generated(), self.eos.contains(&choice.token), &text)
        });
        let top_tokens = if seq.top_n_tokens > 0 {
            let (ids, logprobs) = choice.top.into_iter().unzip();
            vec![self.tokens(ids, logprobs)?]
        } else {
            Vec::new()
        };
        let generated_text = match finish {
            Some(reason) => {
                seq.finished = Some(reason);
                let text = self
                    .tokenizer
                    .decode(seq.generated_ids(), true)
                    .map_err(|e| ShardError::Tokenizer(e.to_string()))?;
                let params = seq.sampler.params();
                Some(pb::GeneratedText {
                    text,
                    generated_tokens: seq.generated() as u32,
                    finish_reason: match reason {
                        Finish::Length => pb::FinishReason::Length,
                        Finish::EosToken => pb::FinishReason::EosToken,
                        Finish::StopSequence => pb::FinishReason::StopSequence,
                    } as i32,
                    seed: params.sampling().then_some(params.seed),
                })
            }
            None => None,
        };
        Ok(pb::Generation {
            request_id: seq.id,
            prefill_tokens,
            tokens: Some(pb::Tokens {
                ids: vec![choice.token],
                logprobs: vec![choice.logprob],
                texts: vec![text],
                is_special: vec![self.special.contains(&choice.token)],
            }),
            generated_text,
            top_tokens,
        })
    }

    /// Tokens the cached batches may still grow to (for memory accounting).
    pub fn reserved_tokens(&self) -> usize {
        self.batches.cached_tokens()
    }
}
