//! The model runner: turns protocol batches into forward passes and forward passes into
//! `Generation`s. It owns the model, the tokenizer and the cached batches; the gRPC layer only
//! hands it requests one at a time.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tessera_proto as pb;
use tokenizers::Tokenizer;

use crate::batch::{Batch, BatchRegistry};
use crate::config::{token_ids, ModelConfig};
use crate::detokenizer::{Finish, IncrementalDecoder, StoppingCriteria};
use crate::error::{Result, ShardError};
use crate::kv_cache::SeqKvCache;
use crate::model::{ForwardInput, Llama};
use crate::sampler::{top_n, Sampler, SamplingParams};
use crate::sequence::Sequence;

pub struct Runner {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    eos: HashSet<u32>,
    special: HashSet<u32>,
    batches: BatchRegistry,
}

/// What one Prefill or Decode call produced.
pub struct StepOutput {
    pub generations: Vec<pb::Generation>,
    pub batch: Option<pb::CachedBatch>,
    pub forward_ns: u64,
    pub decode_ns: u64,
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

/// The EOS ids: generation_config.json's list wins (as in transformers), then config.json, then
/// the tokenizer's `eos_token`.
fn eos_ids(dir: &Path, config: &ModelConfig, tokenizer: &Tokenizer) -> HashSet<u32> {
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
        let tc = read("tokenizer_config.json");
        let eos = tc
            .as_ref()
            .and_then(|t| t.get("eos_token"))
            .and_then(|e| e.as_str().or_else(|| e.get("content")?.as_str()));
        ids.extend(eos.and_then(|e| tokenizer.token_to_id(e)));
    }
    ids.into_iter().collect()
}

impl Runner {
    /// Loads the checkpoint in `dir`. `dtype` overrides the checkpoint's own dtype.
    pub fn load(dir: &Path, dtype: Option<&str>, device: Device) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let kind = match dtype {
            Some(d) => {
                parse_kind(d).ok_or_else(|| ShardError::Request(format!("unknown dtype `{d}`")))?
            }
            None => config
                .torch_dtype
                .as_deref()
                .and_then(parse_kind)
                .unwrap_or(Kind::Float),
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
        let eos = eos_ids(dir, &config, &tokenizer);
        let special = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let model = {
            let _guard = tch::no_grad_guard();
            Llama::load(config, &weights, kind, device)?
        };
        Ok(Self {
            model,
            tokenizer,
            eos,
            special,
            batches: BatchRegistry::default(),
        })
    }

    pub fn eos_token_ids(&self) -> &HashSet<u32> {
        &self.eos
    }

    fn tokenize(&self, r: &pb::Request) -> Result<Vec<u32>> {
        let text: String = match &r.input_chunks {
            Some(input) if !input.chunks.is_empty() => {
                let mut text = String::new();
                for chunk in &input.chunks {
                    match &chunk.chunk {
                        Some(pb::input_chunk::Chunk::Text(t)) => text.push_str(t),
                        Some(pb::input_chunk::Chunk::Image(_)) => {
                            return Err(ShardError::Request(
                                "this model does not take image inputs".into(),
                            ))
                        }
                        None => {}
                    }
                }
                text
            }
            _ => r.inputs.clone(),
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), r.add_special_tokens)
            .map_err(|e| ShardError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let truncate = r.truncate as usize;
        if truncate > 0 && ids.len() > truncate {
            ids.drain(..ids.len() - truncate);
        }
        Ok(ids)
    }

    fn new_sequence(&self, r: &pb::Request) -> Result<Sequence> {
        let ids = self.tokenize(r)?;
        if ids.is_empty() {
            return Err(ShardError::Request(format!(
                "request {}: the prompt is empty after tokenization",
                r.id
            )));
        }
        let stop = r.stopping_parameters.clone().unwrap_or_default();
        let max_new = (stop.max_new_tokens as usize).max(1);
        let capacity = ids.len() + max_new;
        let limit = self.model.config.max_position_embeddings;
        if capacity > limit {
            return Err(ShardError::Request(format!(
                "request {}: {} prompt tokens + {max_new} new tokens exceed the model's {limit} positions",
                r.id,
                ids.len()
            )));
        }
        let p = r.parameters.clone().unwrap_or_default();
        let params = SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            typical_p: p.typical_p,
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
        };
        Ok(Sequence {
            id: r.id,
            prompt_len: ids.len(),
            decoder: IncrementalDecoder::new(ids.len()),
            tokens: ids,
            sampler: Sampler::new(params),
            stopping: StoppingCriteria::new(max_new, stop.stop_sequences, stop.ignore_eos_token),
            cache: SeqKvCache::new(self.model.kv_layout(), capacity),
            top_n_tokens: r.top_n_tokens as usize,
            prefill_logprobs: r.prefill_logprobs,
            finished: None,
        })
    }

    /// Prefill of a new batch, folded together with one step of `cached` when given.
    pub fn prefill(
        &mut self,
        batch: &pb::Batch,
        cached: Option<&pb::CachedBatch>,
    ) -> Result<StepOutput> {
        let mut seqs = batch
            .requests
            .iter()
            .map(|r| self.new_sequence(r))
            .collect::<Result<Vec<_>>>()?;
        if let Some(c) = cached {
            seqs.extend(self.batches.take(c.id)?.seqs);
        }
        self.step(Batch { id: batch.id, seqs })
    }

    pub fn decode(&mut self, batches: &[pb::CachedBatch]) -> Result<StepOutput> {
        let ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
        let batch = self.batches.take_concat(&ids)?;
        self.step(batch)
    }

    pub fn filter(&mut self, id: u64, request_ids: &[u64]) -> Result<Option<pb::CachedBatch>> {
        self.batches.filter(id, request_ids)
    }

    pub fn clear(&mut self, id: Option<u64>) {
        self.batches.clear(id)
    }

    /// One forward pass over every unfinished sequence of `batch`, then token choice.
    fn step(&mut self, mut batch: Batch) -> Result<StepOutput> {
        let start = Instant::now();
        let device = self.model.device();
        let mut input_ids: Vec<i64> = Vec::new();
        let mut positions: Vec<i64> = Vec::new();
        let mut new_tokens = Vec::new();
        let mut logit_rows: Vec<i64> = Vec::new();
        // For each active sequence: (index in batch, first logit row, number of logit rows).
        let mut active = Vec::new();
        for (i, s) in batch.seqs.iter().enumerate() {
            if s.finished.is_some() {
                continue;
            }
            let past = s.cache.len();
            let pending = s.pending();
            let base = input_ids.len() as i64;
            input_ids.extend(pending.iter().map(|&t| t as i64));
            positions.extend((past..past + pending.len()).map(|p| p as i64));
            new_tokens.push(pending.len());
            // Prompt logprobs need every prompt position's logits, once, at prefill.
            let all_rows = s.prefill_logprobs && past == 0 && s.generated() == 0;
            let first_row = logit_rows.len();
            if all_rows {
                logit_rows.extend(base..base + pending.len() as i64);
            } else {
                logit_rows.push(base + pending.len() as i64 - 1);
            }
            active.push((i, first_row, logit_rows.len() - first_row));
        }
        let logits = if active.is_empty() {
            None
        } else {
            let _guard = tch::no_grad_guard();
            let input = ForwardInput {
                input_ids: Tensor::from_slice(&input_ids).to_device(device),
                positions: Tensor::from_slice(&positions).to_device(device),
                new_tokens,
                logit_rows: Tensor::from_slice(&logit_rows).to_device(device),
            };
            let mut caches: Vec<&mut SeqKvCache> = Vec::with_capacity(active.len());
            let mut pos = 0;
            for (i, s) in batch.seqs.iter_mut().enumerate() {
                if pos < active.len() && active[pos].0 == i {
                    caches.push(&mut s.cache);
                    pos += 1;
                }
            }
            let logits = self
                .model
                .forward(&input, &mut caches)
                .to_device(Device::Cpu);
            Some(Vec::<f32>::try_from(logits.reshape([-1]))?)
        };
        let forward_ns = start.elapsed().as_nanos() as u64;
        let decode_start = Instant::now();
        let vocab = self.model.config.vocab_size;
        let mut generations = Vec::with_capacity(active.len());
        if let Some(mut logits) = logits {
            for (i, first_row, rows) in active {
                let seq = &mut batch.seqs[i];
                let prefill_tokens = if rows > 1 {
                    Some(self.prompt_tokens(
                        seq,
                        &mut logits[first_row * vocab..(first_row + rows - 1) * vocab],
                    )?)
                } else {
                    None
                };
                let row = &mut logits[(first_row + rows - 1) * vocab..(first_row + rows) * vocab];
                generations.push(self.next_token(seq, row, prefill_tokens)?);
            }
        }
        let summary = self.batches.store(batch);
        Ok(StepOutput {
            generations,
            batch: summary,
            forward_ns,
            decode_ns: decode_start.elapsed().as_nanos() as u64,
        })
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

    /// Prompt tokens with their logprobs (the first has none, reported as NaN as TGI does).
    fn prompt_tokens(&self, seq: &Sequence, rows: &mut [f32]) -> Result<pb::Tokens> {
        let vocab = self.model.config.vocab_size;
        let ids = seq.tokens[..seq.prompt_len].to_vec();
        let mut logprobs = vec![f32::NAN];
        for (row, &next) in rows.chunks_mut(vocab).zip(&ids[1..]) {
            crate::sampler::log_softmax(row);
            logprobs.push(row[next as usize]);
        }
        Ok(pb::Tokens {
            texts: self.token_texts(&ids)?,
            is_special: ids.iter().map(|i| self.special.contains(i)).collect(),
            logprobs,
            ids,
        })
    }

    fn next_token(
        &self,
        seq: &mut Sequence,
        row: &mut [f32],
        prefill_tokens: Option<pb::Tokens>,
    ) -> Result<pb::Generation> {
        let choice = seq.sampler.choose(row, &seq.tokens, seq.prompt_len);
        seq.tokens.push(choice.token);
        let text = seq.decoder.next(&self.tokenizer, &seq.tokens)?;
        let finish = seq
            .stopping
            .check(seq.generated(), self.eos.contains(&choice.token), &text);
        let top_tokens = if seq.top_n_tokens > 0 {
            let best = top_n(row, seq.top_n_tokens);
            let ids: Vec<u32> = best.iter().map(|b| b.0).collect();
            vec![pb::Tokens {
                texts: self.token_texts(&ids)?,
                is_special: ids.iter().map(|i| self.special.contains(i)).collect(),
                logprobs: best.iter().map(|b| b.1).collect(),
                ids,
            }]
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
