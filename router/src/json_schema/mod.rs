//! JSON-schema keywords that outlines-core's regex conversion skips without a word, dealt with
//! before it runs, so that "the output validates against the schema" holds for every schema we
//! accept.
//!
//! Numeric bounds (`minimum`, `maximum` and their exclusive forms, as Pydantic's `ge`/`lt`
//! produce, in `numbers`) and string `pattern`s (made JSON-safe, in `pattern`) are enforced: the
//! node is swapped for a unique placeholder constant, and the placeholder in the converted regex
//! for the node's own regex. Keywords no regex over the output can honour, or that outlines-core
//! mistranslates (`multipleOf`, `uniqueItems`, `not`, conditionals, `allOf` of several parts,
//! recursive or non-local `$ref`s...), are refused with a message naming them, rather than
//! accepted and then violated.

mod numbers;
mod pattern;

use serde_json::{Map, Value};

use numbers::bounded_number;

/// Keywords whose constraint would be silently dropped.
const REFUSED: &[&str] = &[
    "multipleOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
];

const BOUNDS: &[&str] = &["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];

/// Subschemas under these keys are schemas themselves.
const CHILD_MAPS: &[&str] = &["properties", "$defs", "definitions"];
const CHILD_LISTS: &[&str] = &["anyOf", "oneOf", "allOf", "prefixItems"];
const CHILD_ONES: &[&str] = &["items", "additionalProperties"];

/// A schema made safe to convert, and the placeholders to fill in afterwards.
pub struct Prepared {
    pub schema: Value,
    placeholders: Vec<(String, String)>,
}

impl Prepared {
    /// The converted regex with every placeholder constant replaced by its node's regex.
    pub fn finish(&self, mut regex: String) -> String {
        for (name, node) in &self.placeholders {
            regex = regex.replace(&format!("\"{name}\""), &format!("(?:{node})"));
        }
        regex
    }
}

pub fn prepare(schema: &Value) -> Result<Prepared, String> {
    let mut p = Prepared {
        schema: schema.clone(),
        placeholders: Vec::new(),
    };
    check_refs(schema)?;
    let nonce = format!("{:016x}", rand::random::<u64>());
    let mut node = std::mem::take(&mut p.schema);
    walk(&mut node, &nonce, &mut p.placeholders)?;
    p.schema = node;
    Ok(p)
}

/// Any scalar.
fn scalar() -> Value {
    serde_json::json!({"anyOf": [
        {"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]})
}

/// Any JSON value nested at most two levels: what "any value" means here. outlines-core's own
/// unconstrained values nest deeper and make automata of a hundred megabytes.
fn any_value() -> Value {
    let mut v = scalar();
    if let Some(list) = v["anyOf"].as_array_mut() {
        list.push(serde_json::json!({"type": "array", "items": scalar()}));
        list.push(serde_json::json!({"type": "object", "additionalProperties": scalar()}));
    }
    v
}

fn walk(node: &mut Value, nonce: &str, out: &mut Vec<(String, String)>) -> Result<(), String> {
    if node == &Value::Bool(true) {
        *node = any_value();
        return Ok(());
    }
    let Value::Object(obj) = node else {
        return Ok(());
    };
    if let Some(k) = REFUSED.iter().find(|k| obj.contains_key(**k)) {
        return Err(format!("`{k}` cannot be enforced by structured output"));
    }
    if obj.get("uniqueItems") == Some(&Value::Bool(true)) {
        return Err("`uniqueItems` cannot be enforced by structured output".into());
    }
    if obj
        .get("allOf")
        .and_then(Value::as_array)
        .is_some_and(|a| a.len() > 1)
    {
        return Err("`allOf` with more than one schema is not supported: merge them".into());
    }
    check_object(obj)?;
    const VALUE_KEYS: &[&str] = &[
        "type",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "properties",
        "items",
        "prefixItems",
    ];
    if !VALUE_KEYS.iter().any(|k| obj.contains_key(*k)) {
        // `{}` (perhaps with a title or description): any value. A constraint without a type
        // (`{"minimum": 3}` allows any string) is refused rather than dropped.
        const NOTES: &[&str] = &[
            "title",
            "description",
            "default",
            "examples",
            "$schema",
            "$id",
            "$comment",
            "deprecated",
            "readOnly",
            "writeOnly",
            "$defs",
            "definitions",
        ];
        if let Some(k) = obj.keys().find(|k| !NOTES.contains(&k.as_str())) {
            return Err(format!("a schema with `{k}` needs a `type`"));
        }
        obj.extend(any_value().as_object().cloned().unwrap_or_default());
        return Ok(());
    }
    let typed = |t: &str| obj.get("type").and_then(Value::as_str) == Some(t);
    let string = typed("string");
    if typed("object")
        && !obj.contains_key("properties")
        && !obj.contains_key("additionalProperties")
    {
        obj.insert("additionalProperties".into(), any_value());
        return Ok(());
    }
    if typed("array") && !obj.contains_key("items") && !obj.contains_key("prefixItems") {
        obj.insert("items".into(), any_value());
    }
    if BOUNDS.iter().any(|k| obj.contains_key(*k)) {
        if obj.contains_key("enum") || obj.contains_key("const") {
            // The listed values are the output; keep those within the bounds.
            return bounded_choices(obj);
        }
        let number = bounded_number(obj)?;
        return placeholder(node, number, nonce, out);
    }
    if string && obj.contains_key("pattern") {
        if ["minLength", "maxLength", "format"]
            .iter()
            .any(|k| obj.contains_key(*k))
        {
            return Err("a string `pattern` cannot be combined with `minLength`, `maxLength` or `format`: put the length in the pattern".into());
        }
        let given = obj
            .get("pattern")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let inner = pattern::json_safe(given)?;
        return placeholder(node, format!("\"(?:{inner})\""), nonce, out);
    }
    for key in CHILD_MAPS {
        if let Some(Value::Object(children)) = obj.get_mut(*key) {
            for child in children.values_mut() {
                walk(child, nonce, out)?;
            }
        }
    }
    for key in CHILD_LISTS {
        if let Some(Value::Array(children)) = obj.get_mut(*key) {
            for child in children {
                walk(child, nonce, out)?;
            }
        }
    }
    for key in CHILD_ONES {
        if let Some(child) = obj.get_mut(*key) {
            walk(child, nonce, out)?;
        }
    }
    Ok(())
}

/// The one-line reason of a regex syntax error (its display is a multi-line picture with a caret).
pub(crate) fn syntax_error(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    text.lines()
        .last()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_string()
}

/// Swaps `node` for a constant that `Prepared::finish` replaces with `regex`.
fn placeholder(
    node: &mut Value,
    regex: String,
    nonce: &str,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    let name = format!("tessera{nonce}n{}", out.len());
    out.push((name.clone(), regex));
    *node = serde_json::json!({ "const": name });
    Ok(())
}

/// Object keywords outlines-core would drop: `required` names it never writes, property counts
/// beside listed properties, and names that need escaping in JSON.
fn check_object(obj: &Map<String, Value>) -> Result<(), String> {
    let props = obj.get("properties").and_then(Value::as_object);
    for name in obj
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap_or_default();
        if !props.is_some_and(|p| p.contains_key(name)) {
            return Err(format!("required property `{name}` is not in `properties`"));
        }
    }
    if props.is_some() && (obj.contains_key("minProperties") || obj.contains_key("maxProperties")) {
        return Err(
            "`minProperties`/`maxProperties` are supported only without `properties`".into(),
        );
    }
    if let Some(name) = props
        .into_iter()
        .flat_map(|p| p.keys())
        .find(|k| k.chars().any(|c| c == '"' || c == '\\' || c.is_control()))
    {
        return Err(format!(
            "property name {name:?} needs escaping in JSON, which is not supported"
        ));
    }
    Ok(())
}

/// A bounded node that lists its values (`enum`/`const`): keep the values within the bounds.
fn bounded_choices(obj: &mut Map<String, Value>) -> Result<(), String> {
    let lo = obj.get("minimum").and_then(Value::as_f64);
    let hi = obj.get("maximum").and_then(Value::as_f64);
    let xlo = obj.get("exclusiveMinimum").and_then(Value::as_f64);
    let xhi = obj.get("exclusiveMaximum").and_then(Value::as_f64);
    let fits = |v: &Value| match v.as_f64() {
        Some(x) => {
            lo.is_none_or(|l| x >= l)
                && hi.is_none_or(|h| x <= h)
                && xlo.is_none_or(|l| x > l)
                && xhi.is_none_or(|h| x < h)
        }
        None => true,
    };
    let mut values: Vec<Value> = match (obj.remove("enum"), obj.remove("const")) {
        (Some(Value::Array(list)), _) => list,
        (_, Some(one)) => vec![one],
        _ => Vec::new(),
    };
    values.retain(fits);
    if values.is_empty() {
        return Err("no value of the `enum` is within the numeric bounds".into());
    }
    for k in BOUNDS {
        obj.remove(*k);
    }
    obj.insert("enum".into(), Value::Array(values));
    Ok(())
}

/// Every `$ref` must point into this schema's `$defs` (or `definitions`) and must not lead back
/// to itself: outlines-core resolves nothing else, and cuts recursion at a fixed depth (a
/// required recursive property would vanish).
fn check_refs(root: &Value) -> Result<(), String> {
    fn refs(node: &Value, out: &mut Vec<String>) {
        let Value::Object(obj) = node else { return };
        if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
            out.push(r.to_string());
        }
        for key in ["properties"] {
            for child in obj
                .get(key)
                .and_then(Value::as_object)
                .into_iter()
                .flat_map(|m| m.values())
            {
                refs(child, out);
            }
        }
        for key in CHILD_LISTS {
            for child in obj
                .get(*key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                refs(child, out);
            }
        }
        for key in CHILD_ONES {
            if let Some(child) = obj.get(*key) {
                refs(child, out);
            }
        }
    }
    fn target<'a>(root: &'a Value, r: &str) -> Result<&'a Value, String> {
        let path = r
            .strip_prefix("#/")
            .filter(|p| p.starts_with("$defs/") || p.starts_with("definitions/"));
        let Some((section, name)) = path.and_then(|p| p.split_once('/')) else {
            return Err(format!(
                "`$ref` {r:?} is not supported: only `#/$defs/...` references are"
            ));
        };
        root.get(section)
            .and_then(|d| d.get(name))
            .ok_or_else(|| format!("`$ref` {r:?} points at nothing"))
    }
    // Depth-first from the root; a reference met again on the current path is a cycle.
    fn visit(
        root: &Value,
        node: &Value,
        path: &mut Vec<String>,
        done: &mut std::collections::HashSet<String>,
    ) -> Result<(), String> {
        let mut found = Vec::new();
        refs(node, &mut found);
        for r in found {
            if path.contains(&r) {
                return Err(format!(
                    "recursive schemas are not supported (`$ref` {r:?} refers back to itself)"
                ));
            }
            if done.contains(&r) {
                continue;
            }
            let next = target(root, &r)?;
            path.push(r.clone());
            visit(root, next, path, done)?;
            path.pop();
            done.insert(r);
        }
        Ok(())
    }
    visit(root, root, &mut Vec::new(), &mut Default::default())
}

#[cfg(test)]
mod tests;
