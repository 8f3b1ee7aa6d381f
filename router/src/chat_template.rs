//! Chat templates: the model's own Jinja template, rendered with minijinja so that the text
//! matches what transformers' `apply_chat_template` produces.
//!
//! Real templates lean on Python: string methods (`.strip()`, `.startswith()`), `tojson` with
//! Python's separators, `raise_exception`, `strftime_now`. Those come from minijinja-contrib's
//! pycompat callback and a few functions registered here.

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::InferError;

/// TGI's instruction appended after the tools when a template cannot show tools itself.
pub const DEFAULT_TOOL_PROMPT: &str = "Given the functions available, please respond with a JSON for a function call with its proper arguments that best answers the given prompt. Respond in the format {name: function name, parameters: dictionary of argument name and its value}.Do not use variables.";

/// Instructions one rendering may execute.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// What a template is rendered with besides the messages.
#[derive(Debug, Default)]
pub struct TemplateInputs<'a> {
    /// The request's tools, as the OpenAI API sends them (`[{type, function: {name, ...}}]`).
    pub tools: Option<&'a serde_json::Value>,
    pub tool_prompt: Option<&'a str>,
    /// Extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// An assistant message's tool calls as the text the model produced them in (`{"name": ...,
/// "parameters": {...}}`, one per line), for templates that only show `content`.
fn calls_as_text(m: &serde_json::Value) -> Option<String> {
    let calls = m.get("tool_calls")?.as_array().filter(|c| !c.is_empty())?;
    if m.get("content")
        .and_then(|c| c.as_str())
        .is_some_and(|c| !c.is_empty())
    {
        return None;
    }
    let lines: Vec<String> = calls
        .iter()
        .map(|c| {
            let f = &c["function"];
            // OpenAI sends arguments as a JSON string; a few clients send the object itself.
            let args = match &f["arguments"] {
                serde_json::Value::String(s) => {
                    serde_json::from_str(s).unwrap_or_else(|_| s.clone().into())
                }
                other => other.clone(),
            };
            serde_json::json!({"name": f["name"], "parameters": args}).to_string()
        })
        .collect();
    Some(lines.join("\n"))
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Whether the template renders `tools` itself; if not, they are appended to the last
    /// message as text (TGI's behaviour).
    uses_tools: bool,
    /// Whether the template shows an assistant's `tool_calls` itself; if not, they become the
    /// message's text, in the JSON shape calls are generated in.
    renders_tool_calls: bool,
}

/// JSON with Python's `json.dumps` separators (`", "` and `": "`), as transformers' `tojson` emits.
struct PythonJson;

/// `", "` before every element but the first.
fn separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(w, first)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let err =
        |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            value
                .serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
                .map_err(err)?;
        }
        None => value
            .serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, PythonJson,
            ))
            .map_err(err)?,
    }
    // Output is raw JSON text; marking it safe keeps minijinja from escaping it.
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, InferError> {
        // Python slicing minijinja lacks; `generation` blocks are a transformers training extension.
        let source = source
            .replace("[::-1]", "|reverse")
            .replace("{% generation %}", "")
            .replace("{% endgeneration %}", "")
            .replace("{%- generation %}", "")
            .replace("{%- endgeneration %}", "");
        let renders_tool_calls = source.contains("tool_calls");
        let mut env = Environment::new();
        // A template comes with the model, and a model can come from anyone: a loop that never
        // ends runs out of fuel instead of holding a validation worker forever. Real templates
        // spend a few thousand units per message. (minijinja also caps recursion depth.)
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            chrono::Local::now().format(&fmt).to_string()
        });
        env.add_template_owned("chat", source)
            .map_err(|e| InferError::TemplateError(e.to_string()))?;
        let uses_tools = env
            .get_template("chat")
            .map(|t| t.undeclared_variables(true).contains("tools"))
            .map_err(|e| InferError::TemplateError(e.to_string()))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            uses_tools,
            renders_tool_calls,
        })
    }

    /// Renders `messages` (OpenAI-shaped JSON objects: `role`, `content`, and optionally
    /// `tool_calls`, `tool_call_id`, `name`) with the generation prompt. A trailing assistant
    /// message is continued rather than closed, as transformers' `continue_final_message` does.
    pub fn apply(
        &self,
        messages: &[serde_json::Value],
        inputs: &TemplateInputs,
    ) -> Result<String, InferError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| InferError::TemplateError(e.to_string()))?;
        let mut messages = messages.to_vec();
        if !self.renders_tool_calls {
            for m in &mut messages {
                if let Some(text) = calls_as_text(m) {
                    m["content"] = text.into();
                }
            }
        }
        let tools = inputs
            .tools
            .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
        // A template that renders tools gets them as transformers passes them; one that cannot
        // gets them as text after the last message, as TGI does.
        if let Some(tools) = tools.filter(|_| !self.uses_tools) {
            let prompt = inputs
                .tool_prompt
                .filter(|p| !p.is_empty())
                .unwrap_or(DEFAULT_TOOL_PROMPT);
            let text = format!("\n---\n{tools}\n{prompt}");
            if let Some(content) = messages.last_mut().and_then(|m| m.get_mut("content")) {
                if let Some(s) = content.as_str() {
                    *content = serde_json::Value::String(format!("{s}{text}"));
                }
            }
        }
        let mut ctx = serde_json::Map::new();
        if let Some(kwargs) = inputs.kwargs {
            ctx.extend(kwargs.clone());
        }
        ctx.insert(
            "messages".into(),
            serde_json::Value::Array(messages.clone()),
        );
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        ctx.insert("add_generation_prompt".into(), true.into());
        if let Some(tools) = tools.filter(|_| self.uses_tools) {
            ctx.insert("tools".into(), tools.clone());
        }
        let mut text = template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| InferError::TemplateError(e.to_string()))?;
        let last = messages.last();
        let last_content = last
            .and_then(|m| m.get("content"))
            .and_then(|c| c.as_str())
            .unwrap_or("");
        if last.and_then(|m| m.get("role")).and_then(|r| r.as_str()) == Some("assistant")
            && !last_content.is_empty()
        {
            if let Some(pos) = text.rfind(last_content) {
                text.truncate(pos + last_content.len());
                text.truncate(text.trim_end().len());
            }
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> serde_json::Value {
        serde_json::json!({"role": role, "content": content})
    }

    fn no_tools() -> TemplateInputs<'static> {
        TemplateInputs::default()
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let text = t
            .apply(
                &[msg("system", "Be brief."), msg("user", "Hi")],
                &no_tools(),
            )
            .unwrap();
        assert_eq!(text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn continues_a_final_assistant_message() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let text = t
            .apply(
                &[msg("user", "Count"), msg("assistant", "1, 2,")],
                &no_tools(),
            )
            .unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n1, 2,"), "{text:?}");
    }

    #[test]
    fn python_features_and_errors() {
        let src = "{% if messages[0]['content'].strip().startswith('x') %}{{ raise_exception('no x') }}{% endif %}{{ messages|tojson }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.apply(&[msg("user", " a ")], &no_tools()).unwrap(),
            r#"[{"role": "user", "content": " a "}]"#
        );
        let e = t.apply(&[msg("user", " xy")], &no_tools()).unwrap_err();
        assert!(e.to_string().contains("no x"), "{e}");
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    fn render(source: &str) -> Result<String, InferError> {
        let t = ChatTemplate::new(source, None, None)?;
        t.apply(
            &[serde_json::json!({"role": "user", "content": "hi"})],
            &TemplateInputs::default(),
        )
    }

    #[test]
    fn runaway_templates_fail_fast() {
        let start = std::time::Instant::now();
        for source in [
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{{ 'a' * 1000000000 }}",
            "{{ range(1000000000)|list|length }}",
        ] {
            let e = render(source).unwrap_err();
            assert!(e.to_string().starts_with("Template error"), "{e}");
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
    }
}
