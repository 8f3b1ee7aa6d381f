//! Numeric bounds as regexes: the exact set of integers, or of decimal numbers, between two
//! bounds, written without leading zeros or exponents. Built digit by digit (the classic
//! range-to-regex construction), so a bound like `maximum: 120` costs a handful of automaton
//! states rather than an alternation of 121 numbers.

use serde_json::{Map, Value};

/// One end of a range: the bound and whether it is itself allowed.
#[derive(Clone, Copy)]
pub(super) struct End {
    pub(super) at: i64,
    pub(super) inclusive: bool,
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
pub(super) fn bounded_number(obj: &Map<String, Value>) -> Result<String, String> {
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
pub(super) fn integer_regex(lo: Option<i64>, hi: Option<i64>) -> String {
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
pub(super) fn number_regex(lo: Option<End>, hi: Option<End>) -> String {
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
pub(super) fn naturals(a: u64, b: Option<u64>) -> Vec<String> {
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
