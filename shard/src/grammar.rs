//! Constrained decoding: the regex a request's output must match, compiled once per distinct
//! regex into an outlines-core `Index` over this model's vocabulary, and each sequence's place in
//! it, which becomes a logits mask every step.
//!
//! The router turns JSON schemas and tools into regexes and rejects bad or oversized ones before
//! they are queued; the shard owns the vocabulary-sized work. Compiling walks every token from
//! every reachable automaton state (milliseconds to seconds), so it starts on a thread of its own
//! when a request is admitted, overlapping the prefill's forward pass, and the result stays in
//! an LRU cache. Masks for the states in use are cached too, on the logits' device.
//!
//! Every state also knows the fewest tokens that still reach an accepting end (EOS included).
//! When a request's remaining `max_new_tokens` gets that tight, only tokens that keep an
//! accepted end within reach are allowed: constrained output always ends complete (a JSON
//! document that parses) rather than cut off mid-string, and such an end reports `length`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;
use outlines_core::prelude::{Index, StateId, Vocabulary};
use tch::{Device, Kind, Tensor};
use tessera_proto as pb;
use tokenizers::{DecoderWrapper, Tokenizer};

use crate::error::{Result, ShardError};

/// Distinct grammars kept compiled.
const GRAMMAR_CACHE: usize = 64;
/// Bytes of cached masks (one bool per vocabulary entry per state).
const MASK_CACHE_BYTES: usize = 64 << 20;

/// How a tokenizer spells bytes in its vocabulary.
enum Spelling {
    /// GPT-2 byte-level BPE: every byte is drawn as one printable character.
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece: `▁` for a space and `<0xAB>` tokens for raw bytes.
    SentencePiece,
}

/// GPT-2's byte-to-character table, inverted: printable Latin-1 bytes stand for themselves, the
/// rest are drawn from U+0100 upwards in byte order.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).unwrap_or('\u{FFFD}'), b)
        })
        .collect()
}

impl Spelling {
    fn of(tokenizer: &Tokenizer) -> Result<Self> {
        let unsupported = || {
            ShardError::Unsupported(
                "structured output needs a byte-level BPE or SentencePiece tokenizer".into(),
            )
        };
        match tokenizer.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => Ok(Self::ByteLevel(byte_level_chars())),
            Some(DecoderWrapper::Metaspace(_)) => Ok(Self::SentencePiece),
            Some(DecoderWrapper::Sequence(seq))
                if seq
                    .get_decoders()
                    .iter()
                    .any(|d| matches!(d, DecoderWrapper::ByteFallback(_))) =>
            {
                Ok(Self::SentencePiece)
            }
            _ => Err(unsupported()),
        }
    }

    /// The bytes a vocabulary entry stands for.
    fn bytes(&self, token: &str) -> Option<Vec<u8>> {
        match self {
            Self::ByteLevel(map) => token.chars().map(|c| map.get(&c).copied()).collect(),
            Self::SentencePiece => {
                let hex = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'));
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) if token.len() == 6 => Some(vec![b]),
                    _ => Some(token.replace('\u{2581}', " ").into_bytes()),
                }
            }
        }
    }
}

/// The vocabulary as outlines-core sees it: what bytes each token writes. Special tokens are
/// left out (a grammar never produces them) and so is every stop token but `eos`, the one a
/// complete output ends with.
pub fn vocabulary(
    tokenizer: &Tokenizer,
    eos: u32,
    stop_tokens: &HashSet<u32>,
) -> Result<Vocabulary> {
    let spelling = Spelling::of(tokenizer)?;
    let added = tokenizer.get_added_tokens_decoder();
    let mut vocab = Vocabulary::new(eos);
    for (token, id) in tokenizer.get_vocab(true) {
        let special = added.get(&id).is_some_and(|t| t.special);
        if id == eos || stop_tokens.contains(&id) || special {
            continue;
        }
        let bytes = match added.get(&id) {
            Some(t) => Some(t.content.clone().into_bytes()),
            None => spelling.bytes(&token),
        };
        if let Some(bytes) = bytes.filter(|b| !b.is_empty()) {
            vocab
                .try_insert(bytes, id)
                .map_err(|e| ShardError::Tokenizer(e.to_string()))?;
        }
    }
    Ok(vocab)
}

/// A compiled grammar: the token-level automaton and how far each state is from an end.
pub struct Grammar {
    index: Index,
    /// Fewest tokens, EOS included, from each state to an accepted end.
    distance: HashMap<StateId, u32>,
    /// The largest distance among each state's successors: a budget above it restricts nothing.
    horizon: HashMap<StateId, u32>,
    eos: u32,
}

impl Grammar {
    pub fn compile(regex: &str, vocab: &Vocabulary) -> std::result::Result<Self, String> {
        let index = Index::new(regex, vocab).map_err(|e| e.to_string())?;
        let eos = vocab.eos_token_id();
        // Breadth-first from the accepting states over reversed transitions (each token costs
        // one step), with the parallel token edges between two states collapsed to one.
        let mut reverse: HashMap<StateId, HashSet<StateId>> = HashMap::new();
        for (&from, edges) in index.transitions() {
            for (&token, &to) in edges {
                if token != eos {
                    reverse.entry(to).or_default().insert(from);
                }
            }
        }
        let mut distance: HashMap<StateId, u32> = HashMap::new();
        let mut queue: VecDeque<StateId> = VecDeque::new();
        for &f in index.final_states() {
            distance.insert(f, 1);
            queue.push_back(f);
        }
        while let Some(s) = queue.pop_front() {
            let d = distance[&s] + 1;
            for &p in reverse.get(&s).into_iter().flatten() {
                if let std::collections::hash_map::Entry::Vacant(e) = distance.entry(p) {
                    e.insert(d);
                    queue.push_back(p);
                }
            }
        }
        let horizon = index
            .transitions()
            .iter()
            .map(|(&s, edges)| {
                let far = edges
                    .iter()
                    .filter(|(&t, _)| t != eos)
                    .map(|(_, n)| distance.get(n).copied().unwrap_or(u32::MAX))
                    .max()
                    .unwrap_or(0);
                (s, far)
            })
            .collect();
        Ok(Self {
            index,
            distance,
            horizon,
            eos,
        })
    }

    /// States of the token-level automaton (its size).
    pub fn states(&self) -> usize {
        self.index.transitions().len()
    }

    pub fn initial_state(&self) -> StateId {
        self.index.initial_state()
    }

    /// Fewest tokens from `state` to an accepted end (EOS included).
    pub fn distance(&self, state: StateId) -> u32 {
        self.distance.get(&state).copied().unwrap_or(u32::MAX)
    }

    /// Tokens allowed in `state` with `budget` tokens left (this one included); `None` when the
    /// budget restricts nothing.
    fn allowed_within(&self, state: StateId, budget: u32) -> Option<Vec<u32>> {
        let horizon = self.horizon.get(&state).copied().unwrap_or(0);
        if budget > horizon || self.distance(state) > budget {
            // Either every successor still fits, or no end fits anyway (the output will be cut
            // at the budget like any unconstrained one).
            return None;
        }
        let edges = self.index.transitions().get(&state)?;
        Some(
            edges
                .iter()
                .filter(|(&t, &n)| t == self.eos || self.distance(n) < budget)
                .map(|(&t, _)| t)
                .collect(),
        )
    }

    fn allowed(&self, state: StateId) -> Vec<u32> {
        self.index.allowed_tokens(&state).unwrap_or_default()
    }
}

/// A grammar being compiled or compiled, shared by every request that uses the same regex.
pub struct Compiled {
    /// Names the grammar in the mask cache (cheaper to hash than its regex).
    id: u64,
    slot: Mutex<Option<std::result::Result<Arc<Grammar>, String>>>,
    ready: Condvar,
}

impl Compiled {
    fn wait(&self) -> std::result::Result<Arc<Grammar>, String> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = slot.as_ref() {
                return result.clone();
            }
            slot = self.ready.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, result: std::result::Result<Arc<Grammar>, String>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        self.ready.notify_all();
    }
}

/// One sequence's progress through its grammar.
pub struct Constraint {
    compiled: Arc<Compiled>,
    grammar: Option<Arc<Grammar>>,
    /// Identity of the grammar, for the mask cache.
    key: u64,
    state: StateId,
    /// Whether the token budget has removed choices the grammar allowed.
    pub forced: bool,
    /// Set when the grammar could not be compiled: the sequence then ends at once.
    failed: bool,
}

impl Constraint {
    fn grammar(&mut self) -> Result<Arc<Grammar>> {
        if let Some(g) = &self.grammar {
            return Ok(g.clone());
        }
        let g = self
            .compiled
            .wait()
            .map_err(|e| ShardError::Request(format!("grammar: {e}")))?;
        self.state = g.initial_state();
        self.grammar = Some(g.clone());
        Ok(g)
    }

    /// Moves past `token`. True when the grammar is complete (the token was its EOS).
    pub fn advance(&mut self, token: u32) -> Result<bool> {
        if self.failed {
            return Ok(true);
        }
        let g = self.grammar()?;
        if token == g.eos {
            return Ok(true);
        }
        self.state = g.index.next_state(&self.state, &token).ok_or_else(|| {
            ShardError::Request(format!("token {token} is outside the request's grammar"))
        })?;
        Ok(false)
    }
}

/// The shard's grammars: the vocabulary they are compiled over, the compiled ones, and masks.
pub struct Grammars {
    vocab: std::result::Result<Arc<Vocabulary>, String>,
    compiled: Mutex<LruCache<String, Arc<Compiled>>>,
    /// `(grammar, state)` → `[vocab]` bool tensor, true where a token is *not* allowed.
    masks: LruCache<(u64, StateId), Tensor>,
    mask_width: i64,
}

impl Grammars {
    /// `width` is the logits' vocabulary size (it may exceed the tokenizer's).
    pub fn new(tokenizer: &Tokenizer, eos: u32, stop_tokens: &HashSet<u32>, width: i64) -> Self {
        let vocab = vocabulary(tokenizer, eos, stop_tokens)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        if let Err(e) = &vocab {
            tracing::warn!("structured output is unavailable: {e}");
        }
        let masks = (MASK_CACHE_BYTES / width.max(1) as usize).max(16);
        Self {
            vocab,
            compiled: Mutex::new(LruCache::new(nonzero(GRAMMAR_CACHE))),
            masks: LruCache::new(nonzero(masks)),
            mask_width: width,
        }
    }

    /// Grammars refused with `why` (a model that cannot end an output).
    pub fn unavailable(why: &str) -> Self {
        Self {
            vocab: Err(why.to_string()),
            compiled: Mutex::new(LruCache::new(nonzero(1))),
            masks: LruCache::new(nonzero(1)),
            mask_width: 1,
        }
    }

    /// The constraint of a request, or `None` when it has no grammar. Compiling starts now, on
    /// a thread of its own, unless the regex is already compiled or compiling.
    pub fn constraint(&self, p: &pb::NextTokenChooserParameters) -> Result<Option<Constraint>> {
        let regex = match pb::GrammarType::try_from(p.grammar_type) {
            _ if p.grammar.is_empty() => return Ok(None),
            Ok(pb::GrammarType::None) => return Ok(None),
            Ok(pb::GrammarType::Regex) => p.grammar.clone(),
            // A TGI router before v2 sent JSON schemas as they are.
            Ok(pb::GrammarType::Json) => {
                outlines_core::json_schema::regex_from_str(&p.grammar, None, None)
                    .map_err(|e| ShardError::Request(format!("invalid JSON schema: {e}")))?
            }
            Err(_) => return Err(ShardError::Request("unknown grammar type".into())),
        };
        let vocab = self.vocab.clone().map_err(ShardError::Request)?;
        let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        let compiled = match cache.get(&regex) {
            Some(c) => c.clone(),
            None => {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let c = Arc::new(Compiled {
                    id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    slot: Mutex::new(None),
                    ready: Condvar::new(),
                });
                cache.put(regex.clone(), c.clone());
                let (job, pattern) = (c.clone(), regex.clone());
                let spawned = std::thread::Builder::new()
                    .name("grammar-compile".into())
                    .spawn(move || {
                        let start = std::time::Instant::now();
                        // A panic must still wake the runner waiting for this grammar.
                        let result =
                            std::panic::catch_unwind(|| Grammar::compile(&pattern, &vocab))
                                .unwrap_or_else(|_| Err("the grammar compiler panicked".into()))
                                .map(Arc::new);
                        tracing::debug!(
                            "grammar compiled in {:.1} ms",
                            start.elapsed().as_secs_f64() * 1e3
                        );
                        job.finish(result);
                    });
                if let Err(e) = spawned {
                    c.finish(Err(format!("cannot start a compile thread: {e}")));
                }
                c
            }
        };
        Ok(Some(Constraint {
            key: compiled.id,
            compiled,
            grammar: None,
            state: 0,
            forced: false,
            failed: false,
        }))
    }

    /// The `[vocab]` "not allowed" mask of `c`'s state with `budget` tokens left.
    fn mask(&mut self, c: &mut Constraint, budget: u32, device: Device) -> Result<Tensor> {
        let g = match c.grammar() {
            Ok(g) => g,
            Err(e) => {
                // The router checks every grammar the way the index is built, so this is a
                // vocabulary the regex cannot be spelled in. End this sequence, not the batch.
                tracing::error!("{e}; the request ends without output");
                c.failed = true;
                let eos = self.vocab.as_ref().map_or(0, |v| v.eos_token_id());
                return self.build(&[eos], device);
            }
        };
        if let Some(ids) = g.allowed_within(c.state, budget) {
            if ids.len() < g.index.transitions().get(&c.state).map_or(0, |t| t.len()) {
                c.forced = true;
            }
            return self.build(&ids, device);
        }
        let key = (c.key, c.state);
        if let Some(m) = self.masks.get(&key) {
            if m.device() == device {
                return Ok(m.shallow_clone());
            }
        }
        let mask = self.build(&g.allowed(c.state), device)?;
        self.masks.put(key, mask.shallow_clone());
        Ok(mask)
    }

    fn build(&self, allowed: &[u32], device: Device) -> Result<Tensor> {
        let ids: Vec<i64> = allowed
            .iter()
            .map(|&t| t as i64)
            .filter(|&t| t < self.mask_width)
            .collect();
        let mask = Tensor::ones([self.mask_width], (Kind::Bool, Device::Cpu));
        let mask = mask.index_fill(0, &Tensor::from_slice(&ids), 0);
        Ok(mask.to_device(device))
    }

    /// The `[rows, vocab]` "not allowed" mask of a step, or `None` when no row is constrained.
    /// `rows` pairs each row's constraint with its remaining token budget.
    pub fn batch_mask(
        &mut self,
        rows: Vec<(Option<&mut Constraint>, u32)>,
        device: Device,
    ) -> Result<Option<Tensor>> {
        if rows.iter().all(|(c, _)| c.is_none()) {
            return Ok(None);
        }
        let mut open: Option<Tensor> = None;
        let masks = rows
            .into_iter()
            .map(|(c, budget)| match c {
                Some(c) => self.mask(c, budget, device),
                None => Ok(open
                    .get_or_insert_with(|| Tensor::zeros([self.mask_width], (Kind::Bool, device)))
                    .shallow_clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::stack(&masks, 0)))
    }
}

fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
#[path = "grammar_tests.rs"]
mod tests;
