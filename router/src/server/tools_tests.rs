use super::*;

fn chat(extra: Value) -> ChatRequest {
    let mut req = json!({
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}
        ]
    });
    if let (Some(r), Some(e)) = (req.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    serde_json::from_value(req).expect("chat request")
}

/// The regex a spec compiles to, as the router's cache would make it.
fn regex_of(spec: &Spec) -> String {
    let g = crate::grammar::Grammars::new(true);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(g.regex(spec.clone()))
        .expect("regex")
        .to_string()
}

#[test]
fn tool_choice_decides_the_grammar() {
    let (g, mode) = tool_grammar(&chat(json!({}))).unwrap().unwrap();
    assert_eq!(mode, ToolMode::Auto);
    assert!(regex_of(&g).ends_with(r"|(?:[^{][\s\S]*)"));
    let (g, mode) = tool_grammar(&chat(json!({"tool_choice": "required"})))
        .unwrap()
        .unwrap();
    assert_eq!(mode, ToolMode::Call);
    assert!(regex_of(&g).contains("get_weather") && regex_of(&g).contains("now"));
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "now"}}});
    let (g, mode) = tool_grammar(&chat(named)).unwrap().unwrap();
    assert_eq!(mode, ToolMode::Call);
    assert!(!regex_of(&g).contains("get_weather"));
    assert!(tool_grammar(&chat(json!({"tool_choice": "none"})))
        .unwrap()
        .is_none());
    let e = tool_grammar(&chat(json!({"tool_choice": "nope"}))).unwrap_err();
    assert_eq!(e.to_string(), "Tool error: Tool with name nope not found");
    let both = json!({"response_format": {"type": "json_object"}});
    let e = tool_grammar(&chat(both)).unwrap_err();
    assert!(e.to_string().contains("mutually exclusive"), "{e}");
}

#[test]
fn a_whole_call_is_read_back() {
    assert!(parse_call(r#" {"name": "now", "parameters": {}}"#).is_none());
    let call = parse_call(r#"{ "name": "get_weather", "parameters": {"city": "Paris"} }"#).unwrap();
    assert_eq!(call.function.name, "get_weather");
    assert_eq!(call.function.arguments, r#"{"city": "Paris"}"#);
    assert!(call.id.starts_with("call_"));
    assert!(parse_call("It is sunny.").is_none());
    assert!(parse_call(r#"{"name": "get_weather", "parameters": {"ci"#).is_none());
    let escaped = parse_call(r#"{"name":"a\"b","parameters":{}}"#).unwrap();
    assert_eq!(escaped.function.name, "a\"b");
}

fn args(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Call(d) => Some(d.function.arguments.as_str()),
            Piece::Content(_) => None,
        })
        .collect()
}

#[test]
fn a_streamed_call_sends_its_name_then_argument_fragments() {
    let mut s = ToolStream::new(ToolMode::Auto);
    let mut pieces = Vec::new();
    for part in [
        "{",
        r#" "name": "get_"#,
        r#"weather", "parameters":"#,
        r#" {"city": "Pa"#,
        r#"ris"}"#,
        " }",
    ] {
        pieces.extend(s.push(part));
    }
    pieces.extend(s.finish());
    assert!(s.is_call());
    let Piece::Call(first) = &pieces[0] else {
        panic!("{pieces:?}")
    };
    assert_eq!(first.function.name.as_deref(), Some("get_weather"));
    assert!(first.id.is_some());
    assert!(pieces[1..].iter().all(|p| match p {
        Piece::Call(d) => d.id.is_none() && d.function.name.is_none(),
        Piece::Content(_) => false,
    }));
    assert_eq!(args(&pieces), r#"{"city": "Paris"}"#);
}

#[test]
fn auto_answers_in_plain_text_unless_it_opens_a_call() {
    let mut s = ToolStream::new(ToolMode::Auto);
    assert_eq!(s.push(""), vec![]);
    assert_eq!(s.push("Sunny"), vec![Piece::Content("Sunny".into())]);
    assert_eq!(s.push(" {x}"), vec![Piece::Content(" {x}".into())]);
    assert!(s.finish().is_empty());
    assert!(!s.is_call());
    // A call cut short before its name is complete comes back as text.
    let mut s = ToolStream::new(ToolMode::Call);
    assert!(s.push(r#"{"na"#).is_empty());
    assert_eq!(s.finish(), vec![Piece::Content(r#"{"na"#.into())]);
}
