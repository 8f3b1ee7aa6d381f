//! Server-sent events: every streamed payload is one `data:` line holding one JSON document,
//! sent as `text/event-stream; charset=utf-8`.
//!
//! The SSE spec ends lines at CR, LF or CRLF only, and serde_json escapes those (with every
//! other control character) inside strings, so no payload can split by the spec. Clients are
//! looser than the spec, in two ways that both split a line in the middle of its JSON:
//! - requests (and other HTTP libraries that follow RFC 2616) decode a `text/` body with no
//!   charset as ISO-8859-1. A UTF-8 continuation byte 0x85 then reads as U+0085, and
//!   `iter_lines(decode_unicode=True)`, which splits with `str.splitlines`, breaks the line
//!   there: "х" (D1 85) or "΅" (CE 85) from the model was enough. TGI sends a bare
//!   `text/event-stream` and has this problem; naming the charset, as vLLM does, removes it
//!   (and gives those clients the right text rather than mojibake).
//! - `str.splitlines` and many hand-written readers also break lines at U+0085, U+2028 and
//!   U+2029 themselves, which serde_json leaves raw, and a model may emit any of them. Written
//!   as `\u` escapes they mean the same text to every JSON parser and break no reader.

use std::convert::Infallible;

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::Event;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Characters some line readers split on that JSON may carry unescaped, with their escapes.
const LOOSE_LINE_BREAKS: [(char, &str); 3] = [
    ('\u{85}', "\\u0085"),
    ('\u{2028}', "\\u2028"),
    ('\u{2029}', "\\u2029"),
];

/// `data` as the JSON text of one event: one line for any line reader.
pub fn json_line(data: &impl Serialize) -> serde_json::Result<String> {
    let mut text = serde_json::to_string(data)?;
    // These characters can only occur inside JSON strings, where an escape means the same.
    // Both begin with a byte (0xC2 or 0xE2) that is rare in model output: check before copying.
    if text.bytes().any(|b| b == 0xC2 || b == 0xE2) {
        for (c, escape) in LOOSE_LINE_BREAKS {
            if text.contains(c) {
                text = text.replace(c, escape);
            }
        }
    }
    Ok(text)
}

/// The event for one payload; our types always serialise, the fallback keeps the stream alive.
pub fn event(data: &impl Serialize) -> Event {
    match json_line(data) {
        Ok(line) => Event::default().data(line),
        Err(_) => Event::default().data("{}"),
    }
}

/// The streaming response for the events `rx` receives, with the route's own `headers`.
pub fn response(mut headers: HeaderMap, rx: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    // Proxies such as nginx would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // Applied after the body's own headers, so the content type above replaces axum's.
    (
        headers,
        Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()),
    )
        .into_response()
}

/// OpenAI's end-of-stream marker.
pub fn done() -> Event {
    Event::default().data("[DONE]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_line_breaks_are_escaped_and_read_back_the_same() {
        let text = "a\u{85}b\u{2028}c\u{2029}d\r\ne\u{1c}f — ü";
        let line = json_line(&serde_json::json!({ "text": text })).unwrap();
        assert_eq!(line.lines().count(), 1);
        assert!(!line.contains(['\u{85}', '\u{2028}', '\u{2029}']), "{line}");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["text"], text);
    }
}
