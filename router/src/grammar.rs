//! Structured output, router side: what a request asks its output to look like (TGI's
//! `grammar`, OpenAI's `response_format`, tools), turned into the one regex the shards constrain
//! decoding with, and refused with a 422 that says why when it cannot be.
//!
//! JSON schemas are checked against their meta-schema and converted to a regex by outlines-core;
//! every regex, given or derived, is then built into a DFA under size limits, the same DFA the
//! shards will compile against the vocabulary, so a grammar that would stall a shard (a regex of
//! catastrophic size) never reaches one. Results, refusals included, are kept in an LRU cache:
//! agents send the same few schemas over and over.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use regex_automata::dfa::{dense, Automaton};
use regex_automata::util::primitives::StateID;
use regex_automata::{nfa::thompson, Anchored};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

use crate::error::ValidationError;

/// Distinct grammars remembered, and the largest remembered (spec and regex, in bytes).
const CACHE: usize = 256;
const CACHE_ENTRY_BYTES: usize = 64 << 10;
/// Nesting depth followed through recursive `$ref`s.
const MAX_RECURSION: usize = 3;
/// Bounds on the automaton. The shard's compile time grows with the DFA's states times the
/// vocabulary: these keep the worst case to seconds, far above any real schema's needs.
const NFA_BYTES: usize = 8 << 20;
const DFA_BYTES: usize = 16 << 20;
const DETERMINIZE_BYTES: usize = 32 << 20;
/// Automaton states: a shard indexes the vocabulary from each (about 0.75 ms per state over a
/// 49k vocabulary on one core), so this bounds a new grammar's compile to a few seconds.
/// `json_object`, the largest grammar Tessera makes itself, has under 1,000.
const MAX_STATES: usize = 4_000;

/// What an output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Schema(Value),
    /// JSON of the schema, or text that does not start with `{` (tool calling's `auto`: the
    /// first character decides between a call and an answer).
    SchemaOrText(Value),
    Regex(String),
}

impl Spec {
    /// Any JSON object (OpenAI's `json_object`).
    pub fn any_object() -> Self {
        Spec::Schema(json!({"type": "object"}))
    }
}

fn invalid(why: impl std::fmt::Display) -> ValidationError {
    ValidationError::InvalidGrammar(why.to_string())
}

/// A schema given inline or as a string of JSON (TGI accepts both).
fn schema_value(v: &Value) -> Result<Value, ValidationError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        Value::String(s) => serde_json::from_str(s).map_err(invalid),
        _ => Err(invalid("the JSON schema must be an object or a string")),
    }
}

/// TGI's `grammar` parameter: `{"type": "json" | "json_object" | "json_schema" | "regex",
/// "value": ...}`.
pub fn from_grammar(g: &Map<String, Value>) -> Result<Spec, ValidationError> {
    let kind = g
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("`grammar` needs a `type`"))?;
    let value = g.get("value").filter(|v| !v.is_null());
    match (kind, value) {
        ("json" | "json_object", Some(v)) => Ok(Spec::Schema(schema_value(v)?)),
        ("json_object", None) => Ok(Spec::any_object()),
        ("json_schema", Some(v)) => Ok(Spec::Schema(schema_value(v.get("schema").unwrap_or(v))?)),
        ("regex", Some(Value::String(r))) => Ok(Spec::Regex(r.clone())),
        ("regex", _) => Err(invalid("a regex grammar needs a string `value`")),
        ("json" | "json_schema", None) => Err(invalid(format!("a {kind} grammar needs a `value`"))),
        (other, _) => Err(invalid(format!(
            "unknown grammar type `{other}`: expected json, json_object, json_schema or regex"
        ))),
    }
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with
/// `{"json_schema": {"name", "schema", "strict"}}`; TGI's `{"type", "value"}` form also works.
pub fn from_response_format(f: &Value) -> Result<Option<Spec>, ValidationError> {
    if f.is_null() {
        return Ok(None);
    }
    let f = f
        .as_object()
        .ok_or_else(|| invalid("`response_format` must be an object"))?;
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") if f.get("value").is_none() => Ok(Some(Spec::any_object())),
        Some("json_schema") if f.get("json_schema").is_some() => {
            let s = &f["json_schema"];
            let schema = s
                .get("schema")
                .ok_or_else(|| invalid("`response_format.json_schema` needs a `schema`"))?;
            Ok(Some(Spec::Schema(schema_value(schema)?)))
        }
        _ => from_grammar(f).map(Some),
    }
}

/// The regex of a schema: outlines-core's conversion, after a meta-schema check and with the
/// keywords it would skip enforced or refused (`json_schema`).
pub fn schema_regex(schema: &Value) -> Result<String, ValidationError> {
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(invalid(format!("the JSON schema is invalid: {e}")));
    }
    let prepared = crate::json_schema::prepare(schema).map_err(invalid)?;
    outlines_core::json_schema::regex_from_value(&prepared.schema, None, Some(MAX_RECURSION))
        .map(|regex| prepared.finish(regex))
        .map_err(|e| invalid(format!("the JSON schema cannot be followed: {e}")))
}

/// Builds the regex's DFA under the size limits, as the shards will.
pub fn check_regex(regex: &str) -> Result<(), ValidationError> {
    // The parser's own message names the mistake; the DFA builder's only says it failed.
    if let Err(e) = regex_automata::util::syntax::parse(regex) {
        let why = crate::json_schema::syntax_error(&e);
        return Err(invalid(format!("invalid regex: {why}")));
    }
    let dfa = dense::Builder::new()
        .configure(
            dense::Config::new()
                .dfa_size_limit(Some(DFA_BYTES))
                .determinize_size_limit(Some(DETERMINIZE_BYTES)),
        )
        .thompson(thompson::Config::new().nfa_size_limit(Some(NFA_BYTES)))
        .build(regex)
        .map_err(|e| {
            let why = e.to_string();
            if why.contains("limit") {
                invalid(format!(
                    "the regex is too large to follow (its automaton exceeds {} MiB)",
                    DFA_BYTES >> 20
                ))
            } else {
                invalid(format!("invalid regex: {why}"))
            }
        })?;
    let Some(start) = dfa.universal_start_state(Anchored::Yes) else {
        return Err(invalid(
            "the regex must not start with a look-around assertion (`^`, `\\b`...)",
        ));
    };
    walk_states(&dfa, start)
}

/// Every state the output can reach must still lead to a match: a shard builds its token index
/// over exactly these states, and one that is a dead end (after `a` in `a$b`, or inside a
/// string pattern anchored with `^`) has no token to offer, which would fail the whole batch.
/// The states are counted on the way: the shard's compile time grows with them.
fn walk_states(dfa: &dense::DFA<Vec<u32>>, start: StateID) -> Result<(), ValidationError> {
    // Match states are entered one byte after a match ends, i.e. by output that overshot it: the
    // shards' index never takes such a step, so neither does this walk.
    let live =
        |s: StateID| !dfa.is_dead_state(s) && !dfa.is_quit_state(s) && !dfa.is_match_state(s);
    let accepting = |s: StateID| dfa.is_match_state(dfa.next_eoi_state(s));
    let mut seen: HashMap<StateID, usize> = HashMap::from([(start, 0)]);
    let mut order = vec![start];
    let mut edges: Vec<Vec<usize>> = vec![Vec::new()];
    let mut at = 0;
    while at < order.len() {
        let s = order[at];
        for byte in 0..=255u8 {
            let next = dfa.next_state(s, byte);
            if !live(next) {
                continue;
            }
            let id = match seen.get(&next) {
                Some(&id) => id,
                None => {
                    if order.len() >= MAX_STATES {
                        return Err(invalid(format!(
                            "the regex is too large to follow (more than {MAX_STATES} automaton states)"
                        )));
                    }
                    seen.insert(next, order.len());
                    order.push(next);
                    edges.push(Vec::new());
                    order.len() - 1
                }
            };
            edges[id].push(at);
        }
        at += 1;
    }
    // Backwards from the accepting states.
    let mut leads = vec![false; order.len()];
    let mut stack: Vec<usize> = (0..order.len()).filter(|&i| accepting(order[i])).collect();
    for &i in &stack {
        leads[i] = true;
    }
    while let Some(i) = stack.pop() {
        for &p in &edges[i] {
            if !leads[p] {
                leads[p] = true;
                stack.push(p);
            }
        }
    }
    if !leads[0] {
        return Err(invalid("the regex matches nothing"));
    }
    if leads.iter().any(|l| !l) {
        return Err(invalid(
            "part of the regex can never complete a match (a `^`, `$` or look-around inside it?)",
        ));
    }
    Ok(())
}

fn compile(spec: &Spec) -> Result<Arc<str>, ValidationError> {
    let regex = match spec {
        Spec::Schema(schema) => schema_regex(schema)?,
        Spec::SchemaOrText(schema) => format!(r"(?:{})|(?:[^{{][\s\S]*)", schema_regex(schema)?),
        Spec::Regex(r) => r.clone(),
    };
    check_regex(&regex)?;
    Ok(Arc::from(regex))
}

/// The grammar front end: cached, off the async threads, switchable off.
pub struct Grammars {
    enabled: bool,
    cache: Mutex<LruCache<String, Result<Arc<str>, String>>>,
}

impl Grammars {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The regex for `spec`, compiled at most once per distinct spec.
    pub async fn regex(&self, spec: Spec) -> Result<Arc<str>, ValidationError> {
        if !self.enabled {
            return Err(ValidationError::Grammar);
        }
        let key = match &spec {
            Spec::Schema(s) => format!("schema:{s}"),
            Spec::SchemaOrText(s) => format!("schema-or-text:{s}"),
            Spec::Regex(r) => format!("regex:{r}"),
        };
        if let Some(hit) = self.lock().get(&key) {
            metrics::counter!("tessera_grammar_requests_total", "result" => "hit").increment(1);
            return hit.clone().map_err(ValidationError::InvalidGrammar);
        }
        metrics::counter!("tessera_grammar_requests_total", "result" => "miss").increment(1);
        let start = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || compile(&spec))
            .await
            .map_err(|e| invalid(format!("grammar check failed: {e}")))?;
        metrics::histogram!("tessera_grammar_check_seconds").record(start.elapsed().as_secs_f64());
        let cached = match &result {
            Ok(r) => Ok(r.clone()),
            Err(ValidationError::InvalidGrammar(why)) => Err(why.clone()),
            Err(e) => Err(e.to_string()),
        };
        // Huge grammars are checked every time rather than pinning megabytes in the cache.
        let size = key.len() + cached.as_ref().map_or(0, |r| r.len());
        if size <= CACHE_ENTRY_BYTES {
            self.lock().put(key, cached);
        }
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, Result<Arc<str>, String>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn grammar_forms() {
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            from_grammar(&obj(json!({"type": "json", "value": s}))).unwrap(),
            Spec::Schema(s.clone())
        );
        assert_eq!(
            from_grammar(&obj(json!({"type": "json", "value": s.to_string()}))).unwrap(),
            Spec::Schema(s.clone())
        );
        assert_eq!(
            from_grammar(&obj(
                json!({"type": "json_schema", "value": {"name": "x", "schema": s}})
            ))
            .unwrap(),
            Spec::Schema(s.clone())
        );
        assert_eq!(
            from_grammar(&obj(json!({"type": "json_object"}))).unwrap(),
            Spec::any_object()
        );
        assert_eq!(
            from_grammar(&obj(json!({"type": "regex", "value": "a+"}))).unwrap(),
            Spec::Regex("a+".into())
        );
        let e = from_grammar(&obj(json!({"type": "yaml", "value": "x"}))).unwrap_err();
        assert!(e.to_string().contains("unknown grammar type `yaml`"), "{e}");
        let e = from_grammar(&obj(json!({"type": "json", "value": "{not json"}))).unwrap_err();
        assert!(e.to_string().contains("grammar is not valid"), "{e}");
    }

    #[test]
    fn response_formats() {
        assert_eq!(
            from_response_format(&json!({"type": "text"})).unwrap(),
            None
        );
        assert_eq!(
            from_response_format(&json!({"type": "json_object"})).unwrap(),
            Some(Spec::any_object())
        );
        let s = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        assert_eq!(
            from_response_format(
                &json!({"type": "json_schema", "json_schema": {"name": "a", "schema": s, "strict": true}})
            )
            .unwrap(),
            Some(Spec::Schema(s))
        );
    }

    #[test]
    fn bad_schemas_and_regexes_say_why() {
        let e = schema_regex(&json!({"type": "strnig"})).unwrap_err();
        assert!(e.to_string().contains("the JSON schema is invalid"), "{e}");
        let e = check_regex("(a|b").unwrap_err();
        assert!(e.to_string().contains("invalid regex"), "{e}");
        // 2^24 and 2^13 states once determinised: over the byte limit, and over the state limit.
        let e = check_regex("[ab]*a[ab]{24}").unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let e = check_regex("[ab]*a[ab]{12}").unwrap_err();
        assert!(e.to_string().contains("automaton states"), "{e}");
        let e = check_regex("c|a$b").unwrap_err();
        assert!(e.to_string().contains("never complete"), "{e}");
        let e = check_regex(r"[^\s\S]").unwrap_err();
        assert!(e.to_string().contains("matches nothing"), "{e}");
        let e = check_regex(r"(?-u:\b)word").unwrap_err();
        assert!(e.to_string().contains("look-around"), "{e}");
        check_regex(&schema_regex(&json!({"type": "array", "items": {"type": "number"}})).unwrap())
            .unwrap();
    }

    #[tokio::test]
    async fn refusals_are_cached_and_disabled_means_refused() {
        let g = Grammars::new(true);
        let spec = Spec::Regex("(".into());
        assert!(g.regex(spec.clone()).await.is_err());
        assert!(g.regex(spec).await.is_err());
        assert_eq!(&*g.regex(Spec::Regex("a+".into())).await.unwrap(), "a+");
        let off = Grammars::new(false);
        let e = off.regex(Spec::Regex("a+".into())).await.unwrap_err();
        assert_eq!(e.to_string(), "grammar is not supported");
    }
}
