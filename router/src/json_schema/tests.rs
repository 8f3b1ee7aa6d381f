use super::numbers::{integer_regex, naturals, number_regex, End};
use super::*;
use regex_automata::{meta::Regex, Anchored, Input};
use serde_json::json;

fn matches(regex: &str, text: &str) -> bool {
    let re = Regex::new(&format!("^(?:{regex})$")).expect("regex");
    re.search(&Input::new(text).anchored(Anchored::Yes))
        .is_some()
}

#[test]
fn natural_ranges_match_exactly_their_numbers() {
    for (a, b) in [
        (0, 9),
        (0, 120),
        (7, 7),
        (13, 4821),
        (99, 100),
        (1, 1000),
        (250, 259),
    ] {
        let re = naturals(a, Some(b)).join("|");
        for n in 0..6000u64 {
            assert_eq!(
                matches(&re, &n.to_string()),
                (a..=b).contains(&n),
                "{a}..{b}: {n}"
            );
        }
        assert!(!matches(&re, "007"));
    }
    let re = naturals(95, None).join("|");
    for n in 0..2000u64 {
        assert_eq!(matches(&re, &n.to_string()), n >= 95, "{n}");
    }
}

#[test]
fn integer_bounds_on_both_sides_of_zero() {
    let cases: [(Option<i64>, Option<i64>); 5] = [
        (Some(-15), Some(7)),
        (Some(-300), Some(-12)),
        (None, Some(-3)),
        (Some(-2), None),
        (Some(5), None),
    ];
    for (lo, hi) in cases {
        let re = integer_regex(lo, hi);
        for n in -500i64..500 {
            let want = lo.is_none_or(|l| n >= l) && hi.is_none_or(|h| n <= h);
            assert_eq!(matches(&re, &n.to_string()), want, "{lo:?}..{hi:?}: {n}");
        }
        assert!(!matches(&re, "-0") || lo.is_none_or(|l| l <= 0));
    }
}

#[test]
fn number_bounds_with_fractions() {
    let end = |at, inclusive| Some(End { at, inclusive });
    let cases = [
        (end(0, true), end(1, true)),
        (end(0, false), end(1, false)),
        (end(-2, true), end(3, false)),
        (end(-5, false), end(-2, true)),
        (None, end(0, false)),
        (end(10, false), None),
    ];
    let samples = [
        "0", "0.0", "0.5", "1", "1.0", "1.25", "2.999", "3", "3.0", "-0.5", "-1", "-2", "-2.0",
        "-2.5", "-4.99", "-5", "-5.0", "-7", "9.9", "10", "10.0", "10.01", "11", "250.5",
    ];
    for (lo, hi) in cases {
        let re = number_regex(lo, hi);
        for s in samples {
            let v: f64 = s.parse().unwrap();
            let above = lo.is_none_or(|l| {
                if l.inclusive {
                    v >= l.at as f64
                } else {
                    v > l.at as f64
                }
            });
            let below = hi.is_none_or(|h| {
                if h.inclusive {
                    v <= h.at as f64
                } else {
                    v < h.at as f64
                }
            });
            assert_eq!(matches(&re, s), above && below, "{s} in {re}");
        }
    }
}

#[test]
fn bounded_nodes_become_placeholders_then_number_regexes() {
    let schema = json!({
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "nested": {"type": "array", "items": {"type": "integer", "exclusiveMaximum": 3.5}}
        },
        "$defs": {"Pos": {"type": "integer", "minimum": 1}}
    });
    let p = prepare(&schema).unwrap();
    assert_eq!(p.placeholders.len(), 4);
    let name = p.schema["properties"]["age"]["const"]
        .as_str()
        .unwrap()
        .to_string();
    let regex = p.finish(format!("\\{{\"age\":\"{name}\"\\}}"));
    assert!(matches(&regex, r#"{"age":120}"#));
    assert!(!matches(&regex, r#"{"age":121}"#));
}

#[test]
fn keywords_we_cannot_enforce_are_refused_by_name() {
    for (schema, word) in [
        (json!({"type": "integer", "multipleOf": 3}), "multipleOf"),
        (json!({"type": "array", "uniqueItems": true}), "uniqueItems"),
        (
            json!({"properties": {"a": {"not": {"type": "null"}}}}),
            "not",
        ),
        (json!({"type": "number", "maximum": 2.5}), "whole numbers"),
        (
            json!({"type": "integer", "minimum": 5, "maximum": 4}),
            "no value",
        ),
        (
            json!({"type": "string", "minimum": 5}),
            "`integer` and `number`",
        ),
        (
            json!({"properties": {"a": {"minimum": 5}}}),
            "needs a `type`",
        ),
    ] {
        let e = prepare(&schema).err().expect("refused");
        assert!(e.contains(word), "{e}");
    }
    assert!(prepare(&json!({"type": "array", "uniqueItems": false})).is_ok());
    // Unconstrained values become bounded "any value" schemas.
    let p = prepare(
        &json!({"properties": {"a": {"description": "anything"}, "b": true},
                            "required": ["a"]}),
    )
    .unwrap();
    assert!(p.schema["properties"]["a"]["anyOf"].is_array());
    assert!(p.schema["properties"]["b"]["anyOf"].is_array());
    let p = prepare(&json!({"type": "object"})).unwrap();
    assert!(p.schema["additionalProperties"]["anyOf"].is_array());
}

#[test]
fn schemas_outlines_would_mistranslate_are_refused() {
    for (schema, word) in [
        (
            json!({"allOf": [{"type": "object"}, {"type": "object"}]}),
            "allOf",
        ),
        (
            json!({"type": "object", "required": ["a"]}),
            "required property `a`",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "null"}}, "minProperties": 1}),
            "minProperties",
        ),
        (
            json!({"type": "object", "properties": {"a\"b": {"type": "null"}}}),
            "escaping",
        ),
        (
            json!({"type": "string", "pattern": "[a-z]+", "maxLength": 3}),
            "put the length in the pattern",
        ),
        (
            json!({"properties": {"a": {"$ref": "#/x"}}, "x": {"type": "integer"}}),
            "only `#/$defs/...`",
        ),
        (
            json!({"$defs": {"Node": {"type": "object", "properties": {
            "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}},
            "$ref": "#/$defs/Node"}),
            "recursive",
        ),
        (
            json!({"type": "integer", "minimum": 5, "enum": [1, 2]}),
            "no value of the `enum`",
        ),
    ] {
        let e = prepare(&schema).err().expect("refused");
        assert!(e.contains(word), "{e}");
    }
}

#[test]
fn listed_values_are_filtered_by_bounds() {
    let p = prepare(&json!({"type": "integer", "minimum": 2, "enum": [1, 2, 4]})).unwrap();
    assert_eq!(p.schema["enum"], json!([2, 4]));
    assert!(p.schema.get("minimum").is_none());
    // Shared, non-recursive definitions are fine.
    let shared = json!({"$defs": {"P": {"type": "integer"}}, "type": "object",
        "properties": {"a": {"$ref": "#/$defs/P"}, "b": {"$ref": "#/$defs/P"}}});
    assert!(prepare(&shared).is_ok());
}
