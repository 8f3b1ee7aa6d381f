//! JSON-schema keywords that outlines-core's regex conversion skips without a word, dealt with
//! before it runs, so that "the output validates against the schema" holds for every schema we
//! accept.
//!
//! Numeric bounds (`minimum`, `maximum` and their exclusive forms, as Pydantic's `ge`/`lt`
//! produce) are enforced: the bounded node is swapped for a unique placeholder constant, and the
//! placeholder in the converted regex for a regex of exactly the allowed numbers. Keywords no
//! regex over the output can honour, or that we do not translate (`multipleOf`, `uniqueItems`,
//! `not`, conditionals...), are refused with a message naming them, rather than accepted and
//! then violated.

use serde_json::{Map, Value};

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
    /// The converted regex with every placeholder constant replaced by its number regex.
    pub fn finish(&self, mut regex: String) -> String {
        for (name, number) in &self.placeholders {
            regex = regex.replace(&format!("\"{name}\""), &format!("(?:{number})"));
        }
        regex
    }
}

pub fn prepare(schema: &Value) -> Result<Prepared, String> {
    let mut p = Prepared {
        schema: schema.clone(),
        placeholders: Vec::new(),
    };
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
        let number = bounded_number(obj)?;
        let name = format!("tessera{nonce}n{}", out.len());
        out.push((name.clone(), number));
        *node = serde_json::json!({ "const": name });
        return Ok(());
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

/// One end of a range: the bound and whether it is itself allowed.
#[derive(Clone, Copy)]
struct End {
    at: i64,
    inclusive: bool,
}

fn bound(
    obj: &Map<String, Value>,
    key: &str,
    exclusive: &str,
) -> Result<Option<(f64, bool)>, String> {
    let read = |k: &str| match obj.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("`{k}` must be a number")),
    };
    Ok(match (read(key)?, read(exclusive)?) {
        (Some(a), Some(b)) => Some(if key == "minimum" {
            if b >= a {
                (b, false)
            } else {
                (a, true)
            }
        } else if b <= a {
            (b, false)
        } else {
            (a, true)
        }),
        (Some(a), None) => Some((a, true)),
        (None, Some(b)) => Some((b, false)),
        (None, None) => None,
    })
}

/// The regex of the numbers a bounded `integer` or `number` node allows.
fn bounded_number(obj: &Map<String, Value>) -> Result<String, String> {
    let integer = match obj.get("type") {
        Some(Value::String(t)) if t == "integer" => true,
        Some(Value::String(t)) if t == "number" => false,
        _ => return Err("numeric bounds are supported on `integer` and `number` types".into()),
    };
    const LIMIT: f64 = 1e15;
    let lower = bound(obj, "minimum", "exclusiveMinimum")?;
    let upper = bound(obj, "maximum", "exclusiveMaximum")?;
    let end = |b: Option<(f64, bool)>, low: bool| -> Result<Option<End>, String> {
        let Some((v, inclusive)) = b else {
            return Ok(None);
        };
        if v.abs() > LIMIT {
            return Err(format!(
                "numeric bounds beyond ±{LIMIT:e} are not supported"
            ));
        }
        if integer {
            // Integers only: tighten to the nearest allowed integer.
            let at = match (low, inclusive) {
                (true, true) => v.ceil(),
                (true, false) => v.floor() + 1.0,
                (false, true) => v.floor(),
                (false, false) => v.ceil() - 1.0,
            };
            Ok(Some(End {
                at: at as i64,
                inclusive: true,
            }))
        } else if v.fract() != 0.0 {
            Err("bounds of a `number` must be whole numbers to be enforced".into())
        } else {
            Ok(Some(End {
                at: v as i64,
                inclusive,
            }))
        }
    };
    let (lo, hi) = (end(lower, true)?, end(upper, false)?);
    if let (Some(l), Some(h)) = (lo, hi) {
        if l.at > h.at || (l.at == h.at && !(l.inclusive && h.inclusive)) {
            return Err("the numeric bounds allow no value".into());
        }
    }
    Ok(if integer {
        integer_regex(lo.map(|e| e.at), hi.map(|e| e.at))
    } else {
        number_regex(lo, hi)
    })
}

/// Integers in `[lo, hi]` (either end open when `None`), without leading zeros.
fn integer_regex(lo: Option<i64>, hi: Option<i64>) -> String {
    let mut alts = Vec::new();
    // Zero and up.
    if hi.is_none_or(|h| h >= 0) {
        alts.extend(naturals(
            lo.map_or(0, |l| l.max(0)) as u64,
            hi.map(|h| h as u64),
        ));
    }
    // Below zero, as minus a magnitude.
    if lo.is_none_or(|l| l < 0) {
        let from = hi.map_or(1, |h| (-h).max(1)) as u64;
        let to = lo.map(|l| (-l) as u64);
        alts.extend(naturals(from, to).into_iter().map(|p| format!("-{p}")));
    }
    alts.join("|")
}

/// Numbers (fractions allowed, no exponent) between `lo` and `hi`.
fn number_regex(lo: Option<End>, hi: Option<End>) -> String {
    const FRACTION: &str = r"(\.[0-9]+)?";
    const ZERO_FRACTION: &str = r"(\.0+)?";
    const NONZERO_FRACTION: &str = r"\.[0-9]*[1-9][0-9]*";
    let mut alts = Vec::new();
    // One side of zero: magnitudes from `a` to `b`, `sign` in front. A whole part k with any
    // fraction lies in [k, k+1); the ends need care.
    let mut side = |sign: &str, a: End, b: Option<End>| {
        let first = if a.inclusive { a.at } else { a.at + 1 };
        // Whole parts with any fraction: from `first` up to the last one strictly below `b`.
        let last = b.map(|b| b.at - 1);
        if last.is_none_or(|l| l >= first) {
            for p in naturals(first as u64, last.map(|l| l as u64)) {
                alts.push(format!("{sign}{p}{FRACTION}"));
            }
        }
        if !a.inclusive && b.is_none_or(|b| b.at > a.at) {
            alts.push(format!("{sign}{}{NONZERO_FRACTION}", a.at));
        }
        if let Some(b) = b.filter(|b| b.inclusive && b.at >= first) {
            alts.push(format!("{sign}{}{ZERO_FRACTION}", b.at));
        }
    };
    let zero = End {
        at: 0,
        inclusive: true,
    };
    if hi.is_none_or(|h| h.at > 0 || (h.at == 0 && h.inclusive)) {
        let a = lo.filter(|l| l.at >= 0).unwrap_or(zero);
        side("", a, hi);
    }
    if lo.is_none_or(|l| l.at < 0) {
        // Magnitudes: from -hi (or just above zero) to -lo.
        let a = match hi.filter(|h| h.at <= 0) {
            Some(h) => End {
                at: -h.at,
                inclusive: h.inclusive,
            },
            None => End {
                at: 0,
                inclusive: false,
            },
        };
        let b = lo.map(|l| End {
            at: -l.at,
            inclusive: l.inclusive,
        });
        side("-", a, b);
    }
    alts.join("|")
}

/// Non-negative integers from `a` to `b` (no upper end when `None`) as regex alternatives.
fn naturals(a: u64, b: Option<u64>) -> Vec<String> {
    let digits = |n: u64| n.to_string().len();
    let mut out = Vec::new();
    let top = b.map_or(digits(a), digits);
    for len in digits(a)..=top {
        let floor = if len == 1 {
            0
        } else {
            10u64.pow(len as u32 - 1)
        };
        let ceil = 10u64.pow(len as u32) - 1;
        let (lo, hi) = (a.max(floor), b.map_or(ceil, |b| b.min(ceil)));
        if lo <= hi {
            out.extend(same_length(&lo.to_string(), &hi.to_string()));
        }
    }
    if b.is_none() {
        // Every longer number.
        out.push(format!("[1-9][0-9]{{{},}}", top));
    }
    out
}

fn class(lo: u8, hi: u8) -> String {
    match (lo, hi) {
        (l, h) if l == h => (l as char).to_string(),
        (b'0', b'9') => "[0-9]".into(),
        (l, h) => format!("[{}-{}]", l as char, h as char),
    }
}

/// Digit strings of one length from `lo` to `hi` (both that length).
fn same_length(lo: &str, hi: &str) -> Vec<String> {
    let (l, h) = (lo.as_bytes(), hi.as_bytes());
    if l.len() == 1 {
        return vec![class(l[0], h[0])];
    }
    let (lrest, hrest) = (&lo[1..], &hi[1..]);
    if l[0] == h[0] {
        return same_length(lrest, hrest)
            .into_iter()
            .map(|p| format!("{}{p}", l[0] as char))
            .collect();
    }
    let n = lrest.len();
    let mut out = Vec::new();
    let mut first_full = l[0];
    if lrest.bytes().any(|d| d != b'0') {
        out.extend(
            same_length(lrest, &"9".repeat(n))
                .into_iter()
                .map(|p| format!("{}{p}", l[0] as char)),
        );
        first_full += 1;
    }
    let mut last_full = h[0];
    let mut tail = Vec::new();
    if hrest.bytes().any(|d| d != b'9') {
        tail = same_length(&"0".repeat(n), hrest)
            .into_iter()
            .map(|p| format!("{}{p}", h[0] as char))
            .collect();
        last_full -= 1;
    }
    if first_full <= last_full {
        out.push(format!("{}[0-9]{{{n}}}", class(first_full, last_full)));
    }
    out.extend(tail);
    out
}

#[cfg(test)]
#[path = "json_schema_tests.rs"]
mod tests;
