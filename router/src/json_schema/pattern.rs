//! A string `pattern` as the inside of a JSON string: the same strings, spelled so that the
//! output stays valid JSON.
//!
//! outlines-core pastes a pattern between two quotes as it is, so `[^@]+` would let a quote, a
//! backslash or a newline into the output, ending the string early or breaking the document.
//! Here every character class loses the characters JSON must escape, and every such literal is
//! written escaped (`"` as `\"`). JSON Schema patterns match anywhere in the string; the output
//! is made to match whole (a subset of what the schema allows), so a leading `^` and a trailing
//! `$` are dropped and any other assertion is refused.

use regex_syntax::hir::{Class, ClassUnicode, ClassUnicodeRange, Hir, HirKind, Look};

/// Characters a JSON string may hold unescaped: all but `"`, `\` and U+0000 to U+001F.
fn safe() -> ClassUnicode {
    ClassUnicode::new([
        ClassUnicodeRange::new('\u{20}', '!'),
        ClassUnicodeRange::new('#', '['),
        ClassUnicodeRange::new(']', char::MAX),
    ])
}

/// The JSON spelling of one character.
fn escaped(c: char) -> String {
    match c {
        '"' => "\\\"".into(),
        '\\' => "\\\\".into(),
        '\n' => "\\n".into(),
        '\t' => "\\t".into(),
        '\r' => "\\r".into(),
        c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32),
        c => c.to_string(),
    }
}

fn rewrite(h: Hir) -> Result<Hir, String> {
    Ok(match h.into_kind() {
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(lit) => {
            let text = String::from_utf8(lit.0.to_vec())
                .map_err(|_| "a `pattern` must match text, not bytes".to_string())?;
            Hir::literal(text.chars().map(escaped).collect::<String>().into_bytes())
        }
        HirKind::Class(Class::Unicode(mut class)) => {
            class.intersect(&safe());
            Hir::class(Class::Unicode(class))
        }
        HirKind::Class(Class::Bytes(_)) => {
            return Err("a `pattern` must match text, not bytes".into())
        }
        HirKind::Look(_) => {
            return Err(
                "a `pattern` may only be anchored at its ends (`^`, `$`); other assertions are not supported"
                    .into(),
            )
        }
        HirKind::Repetition(mut r) => {
            r.sub = Box::new(rewrite(*r.sub)?);
            Hir::repetition(r)
        }
        HirKind::Capture(mut c) => {
            c.sub = Box::new(rewrite(*c.sub)?);
            Hir::capture(c)
        }
        HirKind::Concat(parts) => {
            Hir::concat(parts.into_iter().map(rewrite).collect::<Result<_, _>>()?)
        }
        HirKind::Alternation(parts) => {
            Hir::alternation(parts.into_iter().map(rewrite).collect::<Result<_, _>>()?)
        }
    })
}

/// The regex for the inside of the quotes of a string matching `pattern`.
pub fn json_safe(pattern: &str) -> Result<String, String> {
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .map_err(|e| format!("invalid `pattern` {pattern:?}: {}", super::syntax_error(&e)))?;
    // Drop the anchors at the ends.
    let hir = match hir.kind() {
        HirKind::Concat(parts) => {
            let mut parts = parts.to_vec();
            if parts
                .first()
                .is_some_and(|p| matches!(p.kind(), HirKind::Look(Look::Start)))
            {
                parts.remove(0);
            }
            if parts
                .last()
                .is_some_and(|p| matches!(p.kind(), HirKind::Look(Look::End)))
            {
                parts.pop();
            }
            Hir::concat(parts)
        }
        HirKind::Look(Look::Start | Look::End) => Hir::empty(),
        _ => hir,
    };
    Ok(rewrite(hir)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_literals_become_json_safe() {
        assert_eq!(json_safe("^[A-Z]{3}$").unwrap(), "[A-Z]{3}");
        let re = json_safe(r#"[^@]+@"x"#).unwrap();
        let re = regex_automata::meta::Regex::new(&format!("^(?:{re})$")).unwrap();
        assert!(re.is_match(r#"ab@\"x"#));
        assert!(!re.is_match(r#"a"b@\"x"#));
        assert!(!re.is_match("a\nb@\\\"x"));
        assert!(json_safe(r"a\bb").unwrap_err().contains("anchored"));
        assert!(json_safe("(").unwrap_err().contains("invalid `pattern`"));
    }
}
