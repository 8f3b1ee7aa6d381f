//! Request validation: TGI's checks, in TGI's order and with TGI's messages, plus tokenization
//! to measure the prompt. The output is a request the scheduler can admit without further
//! thought: its token count, its generation budget, and protocol-ready parameters.

use std::sync::Arc;

use tessera_proto as pb;
use tokenizers::Tokenizer;

use crate::error::ValidationError;
use crate::grammar::{self, Grammars};
use crate::server::types::GenerateParameters;

/// Longest generation TGI schedules for a request that sets no `max_new_tokens`.
const DEFAULT_MAX_NEW_TOKENS: u32 = 1024;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_top_n_tokens: u32,
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
}

#[derive(Clone)]
pub struct Validation {
    tokenizer: Arc<Tokenizer>,
    pub limits: Limits,
    pub grammars: Arc<Grammars>,
}

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// When validation started: the start of the request as far as timings go.
    pub received: std::time::Instant,
    pub inputs: String,
    pub input_length: u32,
    /// The prompt's token ids as the shard will see them (after truncation), for the prefix cache.
    pub input_ids: Vec<u32>,
    pub add_special_tokens: bool,
    pub truncate: u32,
    pub parameters: pb::NextTokenChooserParameters,
    pub stopping: pb::StoppingCriteriaParameters,
    pub top_n_tokens: u32,
    pub decoder_input_details: bool,
    /// Higher runs first (a Tessera extension; 0 by default).
    pub priority: i32,
}

impl ValidRequest {
    /// `n` copies that sample independently: copy `i` uses seed + `i`, so a seeded request
    /// still gives reproducible choices.
    pub fn samples(self, n: u32) -> Vec<ValidRequest> {
        (0..n as u64)
            .map(|i| {
                let mut r = self.clone();
                r.parameters.seed = self.parameters.seed.wrapping_add(i);
                r
            })
            .collect()
    }

    /// KV tokens the request may occupy at most.
    pub fn max_tokens(&self) -> u32 {
        self.input_length + self.stopping.max_new_tokens
    }
}

impl Validation {
    pub fn new(tokenizer: Arc<Tokenizer>, limits: Limits, grammars: Grammars) -> Self {
        Self {
            tokenizer,
            limits,
            grammars: Arc::new(grammars),
        }
    }

    /// TGI's `validate_best_of`: how many candidates to run (1 when `best_of` is unset).
    pub fn best_of(&self, best_of: Option<usize>) -> Result<usize, ValidationError> {
        match best_of {
            Some(n) if n > 1 && self.limits.max_best_of == 1 => {
                Err(ValidationError::BestOfDisabled)
            }
            Some(n) if n > self.limits.max_best_of => {
                Err(ValidationError::BestOf(self.limits.max_best_of, n))
            }
            Some(n) if n > 1 => Ok(n),
            _ => Ok(1),
        }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Token ids of `text` (off the async threads: long prompts take milliseconds).
    pub async fn tokenize(
        &self,
        text: String,
        add_special_tokens: bool,
    ) -> Result<tokenizers::Encoding, ValidationError> {
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || tokenizer.encode(text, add_special_tokens))
            .await
            .map_err(|e| ValidationError::Tokenizer(e.to_string()))?
            .map_err(|e| ValidationError::Tokenizer(e.to_string()))
    }

    #[tracing::instrument(name = "validate", skip_all)]
    pub async fn validate(
        &self,
        inputs: String,
        p: GenerateParameters,
        add_special_tokens: bool,
    ) -> Result<ValidRequest, ValidationError> {
        let received = std::time::Instant::now();
        let l = &self.limits;
        let best_of = p.best_of.unwrap_or(1);
        let sampling = p.do_sample
            || p.temperature.is_some()
            || p.top_k.is_some()
            || p.top_p.is_some()
            || p.typical_p.is_some();
        if best_of > 1 && !sampling {
            return Err(ValidationError::BestOfSampling);
        }
        let temperature = p.temperature.unwrap_or(1.0);
        if temperature <= 0.0 {
            return Err(ValidationError::Temperature);
        }
        let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
        if repetition_penalty <= 0.0 {
            return Err(ValidationError::RepetitionPenalty);
        }
        let frequency_penalty = p.frequency_penalty.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&frequency_penalty) {
            return Err(ValidationError::FrequencyPenalty);
        }
        let presence_penalty = p.presence_penalty.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&presence_penalty) {
            return Err(ValidationError::PresencePenalty);
        }
        let top_p = p.top_p.unwrap_or(1.0);
        // 1.0 means "no nucleus filtering" (TGI rejects it, but OpenAI clients send it).
        if p.top_p.is_some() && (top_p <= 0.0 || top_p > 1.0) {
            return Err(ValidationError::TopP);
        }
        let typical_p = p.typical_p.unwrap_or(1.0);
        if p.typical_p.is_some() && (typical_p <= 0.0 || typical_p > 1.0) {
            return Err(ValidationError::TypicalP);
        }
        let top_k = match p.top_k {
            Some(k) if k <= 0 => return Err(ValidationError::TopK),
            Some(k) => k as u32,
            None => 0,
        };
        if p.max_new_tokens == Some(0) {
            return Err(ValidationError::NegativeMaxNewTokens);
        }
        if p.stop.len() > l.max_stop_sequences {
            return Err(ValidationError::StopSequence(
                l.max_stop_sequences,
                p.stop.len(),
            ));
        }
        if best_of > 1 && p.seed.is_some() {
            return Err(ValidationError::BestOfSeed);
        }
        let top_n_tokens = p.top_n_tokens.unwrap_or(0);
        if top_n_tokens > l.max_top_n_tokens {
            return Err(ValidationError::TopNTokens(
                l.max_top_n_tokens,
                top_n_tokens,
            ));
        }
        if inputs.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        // No LoRA adapters are served; an adapter id is never used as a path either.
        if let Some(a) = p.adapter_id.as_deref().filter(|a| !a.is_empty()) {
            return Err(ValidationError::Other(format!(
                "adapter `{a}` is not loaded: this server runs no LoRA adapters"
            )));
        }
        if let Some(t) = p.truncate {
            if t == 0 || t > l.max_input_tokens {
                return Err(ValidationError::Truncate(l.max_input_tokens, t));
            }
        }
        let encoding = self.tokenize(inputs.clone(), add_special_tokens).await?;
        let mut input_length = encoding.len();
        if let Some(t) = p.truncate {
            input_length = input_length.min(t);
        }
        let max_new_tokens = match p.max_new_tokens {
            Some(n) => n,
            None => {
                (l.max_total_tokens.saturating_sub(input_length) as u32).min(DEFAULT_MAX_NEW_TOKENS)
            }
        };
        if input_length + max_new_tokens as usize > l.max_total_tokens {
            return Err(ValidationError::MaxTotalTokens(
                l.max_total_tokens,
                input_length,
                max_new_tokens,
            ));
        }
        if input_length > l.max_input_tokens {
            return Err(ValidationError::InputLength(
                l.max_input_tokens,
                input_length,
            ));
        }
        if max_new_tokens == 0 {
            return Err(ValidationError::NegativeMaxNewTokens);
        }
        let regex = match &p.grammar {
            None => None,
            Some(_) if !self.grammars.enabled() => return Err(ValidationError::Grammar),
            Some(g) => Some(self.grammars.regex(grammar::from_grammar(g)?).await?),
        };
        let seed = p.seed.unwrap_or_else(rand::random);
        metrics::histogram!("tgi_request_input_length").record(input_length as f64);
        metrics::histogram!("tgi_request_max_new_tokens").record(max_new_tokens as f64);
        metrics::histogram!("tgi_request_validation_duration")
            .record(received.elapsed().as_secs_f64());
        let ids = encoding.get_ids();
        let input_ids = ids[ids.len() - input_length..].to_vec();
        Ok(ValidRequest {
            received,
            inputs,
            input_ids,
            input_length: input_length as u32,
            add_special_tokens,
            truncate: p.truncate.unwrap_or(0) as u32,
            parameters: pb::NextTokenChooserParameters {
                temperature,
                top_k,
                top_p,
                typical_p,
                do_sample: p.do_sample,
                seed,
                repetition_penalty,
                frequency_penalty,
                watermark: p.watermark,
                grammar_type: match regex {
                    Some(_) => pb::GrammarType::Regex,
                    None => pb::GrammarType::None,
                } as i32,
                grammar: regex.map(|r| r.to_string()).unwrap_or_default(),
                presence_penalty,
            },
            stopping: pb::StoppingCriteriaParameters {
                max_new_tokens,
                stop_sequences: p.stop,
                ignore_eos_token: p.ignore_eos,
            },
            top_n_tokens,
            decoder_input_details: p.decoder_input_details,
            priority: p.priority.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validation() -> Validation {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        let vocab = [
            ("a".to_string(), 0u32),
            ("b".to_string(), 1),
            ("[UNK]".to_string(), 2),
        ]
        .into_iter()
        .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Whitespace {}));
        let limits = Limits {
            max_best_of: 2,
            max_stop_sequences: 2,
            max_top_n_tokens: 5,
            max_input_tokens: 4,
            max_total_tokens: 8,
        };
        Validation::new(Arc::new(tok), limits, Grammars::new(true))
    }

    fn params() -> GenerateParameters {
        GenerateParameters::default()
    }

    async fn err(inputs: &str, p: GenerateParameters) -> String {
        validation()
            .validate(inputs.into(), p, true)
            .await
            .unwrap_err()
            .to_string()
    }

    #[tokio::test]
    async fn tgi_messages_for_bad_parameters() {
        assert_eq!(
            err(
                "a",
                GenerateParameters {
                    temperature: Some(0.0),
                    ..params()
                }
            )
            .await,
            "`temperature` must be strictly positive"
        );
        assert_eq!(
            err(
                "a",
                GenerateParameters {
                    top_p: Some(1.5),
                    ..params()
                }
            )
            .await,
            "`top_p` must be > 0.0 and <= 1.0"
        );
        assert_eq!(
            err(
                "a",
                GenerateParameters {
                    top_k: Some(0),
                    ..params()
                }
            )
            .await,
            "`top_k` must be strictly positive"
        );
        assert_eq!(
            err(
                "a",
                GenerateParameters {
                    max_new_tokens: Some(0),
                    ..params()
                }
            )
            .await,
            "`max_new_tokens` must be strictly positive"
        );
        assert_eq!(err("", params()).await, "`inputs` cannot be empty");
        assert_eq!(
            err(
                "a",
                GenerateParameters {
                    stop: vec!["x".into(); 3],
                    ..params()
                }
            )
            .await,
            "`stop` supports up to 2 stop sequences. Given: 3"
        );
        assert_eq!(
            err(
                "a b a b a",
                GenerateParameters {
                    max_new_tokens: Some(1),
                    ..params()
                }
            )
            .await,
            "`inputs` must have less than 4 tokens. Given: 5"
        );
        assert_eq!(
            err("a b a", GenerateParameters { max_new_tokens: Some(6), ..params() }).await,
            "`inputs` tokens + `max_new_tokens` must be <= 8. Given: 3 `inputs` tokens and 6 `max_new_tokens`"
        );
    }

    #[tokio::test]
    async fn defaults_fill_the_budget_and_truncate_counts() {
        let v = validation()
            .validate("a b a".into(), params(), true)
            .await
            .unwrap();
        assert_eq!((v.input_length, v.stopping.max_new_tokens), (3, 5));
        let p = GenerateParameters {
            truncate: Some(2),
            max_new_tokens: Some(2),
            ..params()
        };
        let v = validation()
            .validate("a b a b a b".into(), p, true)
            .await
            .unwrap();
        assert_eq!((v.input_length, v.truncate), (2, 2));
    }
}
