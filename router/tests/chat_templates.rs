//! Chat templates rendered by minijinja equal transformers' `apply_chat_template`, on real
//! templates: SmolLM2 (the default model), the tiny checkpoints, Qwen3 (tools, tool calls and
//! tool answers, `enable_thinking`) and Llama 3.1. The expected texts are made by
//! `scripts/chat_template_refs.py` (`make test-models`). The rendered text must also tokenize
//! to the same ids.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tessera_router::chat_template::{ChatTemplate, TemplateInputs};
use tessera_router::model_files::ModelFiles;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn templates_match_transformers() {
    let path = root().join("models/templates/chat_templates.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Run `make test-models` to create the references",
            path.display()
        )
    });
    let cases: Vec<Value> = serde_json::from_str(&text).expect("references");
    let mut checked = 0;
    let mut with_tools = 0;
    for case in &cases {
        let dir = root().join(case["tokenizer_dir"].as_str().expect("dir"));
        let name = format!("{} / {}", dir.display(), case["case"]);
        let files = ModelFiles::load(&dir, None).expect("model files");
        let template = ChatTemplate::new(
            files.chat_template.as_deref().expect("template"),
            files.bos_token.clone(),
            files.eos_token.clone(),
        )
        .expect("template compiles");
        let messages = case["messages"].as_array().expect("messages").clone();
        let kwargs = case["kwargs"].as_object().filter(|k| !k.is_empty());
        let inputs = TemplateInputs {
            tools: case.get("tools").filter(|t| !t.is_null()),
            tool_prompt: None,
            kwargs,
        };
        match (&case["expected"], template.apply(&messages, &inputs)) {
            (Value::String(expected), Ok(got)) => {
                assert_eq!(&got, expected, "{name}");
                let ids: Vec<u32> = case["ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|i| i.as_u64().expect("id") as u32)
                    .collect();
                let enc = files.tokenizer.encode(got.as_str(), false).expect("encode");
                assert_eq!(enc.get_ids(), ids.as_slice(), "{name}: token ids");
                checked += 1;
                with_tools += usize::from(inputs.tools.is_some());
            }
            (Value::Null, Err(_)) => checked += 1, // transformers raised too
            (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
        }
    }
    assert!(checked >= 13, "only {checked} cases checked");
    assert!(with_tools >= 2, "tool cases missing");
}
