//! Chat templates: the model's own Jinja template, rendered with minijinja so that the text
//! matches what transformers' `apply_chat_template` produces.
//!
//! Real templates lean on Python: string methods (`.strip()`, `.startswith()`), `tojson` with
//! Python's separators, `raise_exception`, `strftime_now`. Those come from minijinja-contrib's
//! pycompat callback and a few functions registered here.

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::InferError;

/// One message as the template sees it: plain text content.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// JSON with Python's `json.dumps` separators (`", "` and `": "`), as transformers' `tojson` emits.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
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
    let err = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt)).map_err(err)?;
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonJson)).map_err(err)?,
    }
    // Output is raw JSON text; marking it safe keeps minijinja from escaping it.
    Ok(Value::from_safe_string(String::from_utf8_lossy(&out).into_owned()))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, InferError> {
        // Python slicing minijinja lacks; `generation` blocks are a transformers training extension.
        let source = source
            .replace("[::-1]", "|reverse")
            .replace("{% generation %}", "")
            .replace("{% endgeneration %}", "")
            .replace("{%- generation %}", "")
            .replace("{%- endgeneration %}", "");
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| chrono::Local::now().format(&fmt).to_string());
        env.add_template_owned("chat", source).map_err(|e| InferError::TemplateError(e.to_string()))?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// Renders `messages` with the generation prompt. A trailing assistant message is continued
    /// rather than closed, as transformers' `continue_final_message` does.
    pub fn apply(&self, messages: &[TemplateMessage]) -> Result<String, InferError> {
        let template = self.env.get_template("chat").map_err(|e| InferError::TemplateError(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt => true,
        };
        let mut text = template.render(ctx).map_err(|e| InferError::TemplateError(e.to_string()))?;
        if let Some(last) = messages.last().filter(|m| m.role == "assistant" && !m.content.is_empty()) {
            if let Some(pos) = text.rfind(&last.content) {
                text.truncate(pos + last.content.len());
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

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let text = t.apply(&[msg("system", "Be brief."), msg("user", "Hi")]).unwrap();
        assert_eq!(text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn continues_a_final_assistant_message() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let text = t.apply(&[msg("user", "Count"), msg("assistant", "1, 2,")]).unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n1, 2,"), "{text:?}");
    }

    #[test]
    fn python_features_and_errors() {
        let src = "{% if messages[0]['content'].strip().startswith('x') %}{{ raise_exception('no x') }}{% endif %}{{ messages|tojson }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.apply(&[msg("user", " a ")]).unwrap(), r#"[{"role": "user", "content": " a "}]"#);
        let e = t.apply(&[msg("user", " xy")]).unwrap_err();
        assert!(e.to_string().contains("no x"), "{e}");
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }
}
