//! Tool calling on the chat route: the grammar that makes a call well-formed, and reading the
//! call back out of the generated text, whole or while it streams.
//!
//! A call is generated as `{"name": "<tool>", "parameters": {...}}` (the shape TGI's tool prompt
//! asks for, and Llama 3's), constrained by the tool's own parameter schema, so its arguments
//! always parse and validate. `required` and a named function force a call; `auto` lets the
//! model choose with its first character: `{` starts a call, anything else is an ordinary answer
//! returned as content. TGI's `auto` forces a call (or a `no_tool` pseudo-call that is then
//! generated again), and its streamed calls can end without a `finish_reason`; neither happens
//! here.

use serde_json::{json, Value};

use super::openai_types::{ChatRequest, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta};
use crate::error::InferError;
use crate::grammar::Spec;

fn tool_error(msg: impl Into<String>) -> InferError {
    InferError::ToolError(msg.into())
}

/// How a chat request's tools shape its output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ToolMode {
    /// The model may answer or call.
    Auto,
    /// The output is a call.
    Call,
}

/// The tools of a request as `(name, parameter schema)`.
fn declared(tools: &Value) -> Result<Vec<(String, Value)>, InferError> {
    let list = tools
        .as_array()
        .ok_or_else(|| tool_error("`tools` must be an array"))?;
    let mut out: Vec<(String, Value)> = Vec::with_capacity(list.len());
    for t in list {
        let f = t
            .get("function")
            .ok_or_else(|| tool_error("each tool needs a `function`"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| tool_error("each function needs a non-empty `name`"))?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(tool_error(format!("two tools are named `{name}`")));
        }
        let params = f
            .get("parameters")
            .or_else(|| f.get("arguments"))
            .filter(|p| !p.is_null())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        out.push((name.to_string(), params));
    }
    Ok(out)
}

fn call_schema(name: &str, params: &Value) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": name}, "parameters": params},
        "required": ["name", "parameters"],
        "additionalProperties": false,
    })
}

/// The grammar of a request's tools and how to read its output, or `None` when the request has
/// no active tools. Converting it to a regex is left to the router's cached `Grammars`.
pub fn tool_grammar(req: &ChatRequest) -> Result<Option<(Spec, ToolMode)>, InferError> {
    let Some(tools) = req.active_tools() else {
        return Ok(None);
    };
    if !super::openai_types::is_plain_text_format(&req.response_format) {
        return Err(tool_error("Grammar and tools are mutually exclusive"));
    }
    let tools = declared(tools)?;
    let named = match &req.tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "auto" || s == "required" => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(v) => Some(
            v.pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    tool_error("`tool_choice` must be auto, none, required or a function")
                })?
                .to_string(),
        ),
    };
    let schema = match &named {
        Some(name) => {
            let (_, params) = tools
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| tool_error(format!("Tool with name {name} not found")))?;
            call_schema(name, params)
        }
        None => json!({"anyOf": tools.iter().map(|(n, p)| call_schema(n, p)).collect::<Vec<_>>()}),
    };
    let auto =
        named.is_none() && req.tool_choice.as_ref().and_then(Value::as_str) != Some("required");
    Ok(Some(if auto {
        (Spec::SchemaOrText(schema), ToolMode::Auto)
    } else {
        (Spec::Schema(schema), ToolMode::Call)
    }))
}

/// Splits a call's text into its tool name and where its parameters start, once both are there.
fn head(text: &str) -> Option<(String, usize)> {
    let skip = |s: &str, at: usize| at + s[at..].len() - s[at..].trim_start().len();
    let expect = |s: &str, at: usize, lit: &str| {
        let at = skip(s, at);
        s[at..].starts_with(lit).then_some(at + lit.len())
    };
    // A call starts at the very first character, as its grammar has it; `auto`'s free-text
    // branch may start with a space and then a brace, and that is an answer.
    if !text.starts_with('{') {
        return None;
    }
    let at = expect(text, 1, r#""name""#)?;
    let at = expect(text, at, ":")?;
    let start = skip(text, at);
    let rest = text.get(start..)?;
    if !rest.starts_with('"') {
        return None;
    }
    // The closing quote: the first one not escaped.
    let mut escaped = false;
    let end = rest.char_indices().skip(1).find_map(|(i, c)| {
        let close = c == '"' && !escaped;
        escaped = c == '\\' && !escaped;
        close.then_some(i)
    })?;
    let name: String = serde_json::from_str(&rest[..=end]).ok()?;
    let at = expect(text, start + end + 1, ",")?;
    let at = expect(text, at, r#""parameters""#)?;
    let at = expect(text, at, ":")?;
    Some((name, skip(text, at)))
}

/// The arguments of a complete call: its parameters' text without the object's closing brace.
fn arguments(text: &str, from: usize) -> Option<&str> {
    let body = text.get(from..)?.trim_end().strip_suffix('}')?.trim_end();
    serde_json::from_str::<Value>(body).ok().map(|_| body)
}

pub fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// A whole output read as a tool call, or `None` when it is an ordinary answer (or a call cut
/// short by a stop sequence, which is then returned as text).
pub fn parse_call(text: &str) -> Option<ToolCall> {
    let (name, from) = head(text)?;
    let args = arguments(text, from)?;
    Some(ToolCall {
        id: call_id(),
        kind: "function",
        function: FunctionCall {
            name,
            arguments: args.to_string(),
        },
    })
}

/// What a streamed piece of output becomes.
#[derive(Debug, PartialEq)]
pub enum Piece {
    Content(String),
    Call(ToolCallDelta),
}

/// Reads one choice's stream: decides between content and a call on the first character, then
/// sends the call's id and name once known and its arguments as they arrive. A closing brace
/// (and trailing space) is held back until the end, as it may close the call itself.
pub struct ToolStream {
    mode: ToolMode,
    calling: Option<bool>,
    text: String,
    args_from: Option<usize>,
    sent: usize,
}

impl ToolStream {
    pub fn new(mode: ToolMode) -> Self {
        Self {
            mode,
            calling: (mode == ToolMode::Call).then_some(true),
            text: String::new(),
            args_from: None,
            sent: 0,
        }
    }

    /// Whether the output turned out to be a complete call (one cut short by a stop sequence
    /// is not: its finish reason stays the real one).
    pub fn is_call(&self) -> bool {
        self.calling == Some(true)
            && self
                .args_from
                .is_some_and(|from| arguments(&self.text, from).is_some())
    }

    pub fn push(&mut self, piece: &str) -> Vec<Piece> {
        if self.calling.is_none() && self.mode == ToolMode::Auto {
            match piece.chars().next() {
                None => return Vec::new(),
                Some(c) => self.calling = Some(c == '{'),
            }
        }
        if self.calling == Some(false) {
            return vec![Piece::Content(piece.to_string())];
        }
        self.text.push_str(piece);
        let mut out = Vec::new();
        if self.args_from.is_none() {
            let Some((name, from)) = head(&self.text) else {
                return out;
            };
            self.args_from = Some(from);
            self.sent = from;
            out.push(Piece::Call(ToolCallDelta {
                index: 0,
                id: Some(call_id()),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name),
                    arguments: String::new(),
                },
            }));
        }
        if Some(self.sent) == self.args_from {
            // Space before the arguments is not part of them.
            let rest = &self.text[self.sent..];
            self.sent += rest.len() - rest.trim_start().len();
            self.args_from = Some(self.sent);
        }
        let safe = self
            .text
            .trim_end_matches(|c: char| c == '}' || c.is_whitespace())
            .len();
        if safe > self.sent {
            out.push(self.args(self.sent, safe));
            self.sent = safe;
        }
        out
    }

    /// The rest of the arguments once the output is complete; the whole text if a call never
    /// took shape (cut short), as content.
    pub fn finish(&mut self) -> Vec<Piece> {
        if self.calling != Some(true) {
            return Vec::new();
        }
        match self.args_from.and_then(|from| arguments(&self.text, from)) {
            Some(args) => {
                let end = self.args_from.unwrap_or(0) + args.len();
                if end > self.sent {
                    let piece = self.args(self.sent, end);
                    self.sent = end;
                    vec![piece]
                } else {
                    Vec::new()
                }
            }
            None if self.args_from.is_none() => {
                self.calling = Some(false);
                vec![Piece::Content(std::mem::take(&mut self.text))]
            }
            None => Vec::new(),
        }
    }

    fn args(&self, from: usize, to: usize) -> Piece {
        Piece::Call(ToolCallDelta {
            index: 0,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: self.text[from..to].to_string(),
            },
        })
    }
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
