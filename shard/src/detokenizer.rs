//! Incremental detokenization and stop conditions.
//!
//! Byte-level BPE tokens can end in the middle of a UTF-8 character, so a token's text is only
//! released once the decoded text no longer ends in a replacement character. Decoding a short
//! window (`prefix_offset..`) rather than the whole sequence keeps the cost per token constant
//! and lets the tokenizer apply its own spacing rules at the window's edge.

use tokenizers::Tokenizer;

use crate::error::{Result, ShardError};

#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Starts decoding after `prompt_len` prompt tokens. The window starts a few tokens back so
    /// the first generated token is decoded in context (leading spaces survive).
    pub fn new(prompt_len: usize) -> Self {
        Self {
            prefix_offset: prompt_len.saturating_sub(5),
            read_offset: prompt_len,
        }
    }

    /// The text that the newest token of `ids` completes (empty while a character is incomplete).
    pub fn next(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        let decode = |s: &[u32]| {
            tokenizer
                .decode(s, false)
                .map_err(|e| ShardError::Tokenizer(e.to_string()))
        };
        let prefix = decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(full[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    EosToken,
    StopSequence,
}

#[derive(Debug, Clone)]
pub struct StoppingCriteria {
    pub max_new_tokens: usize,
    pub stop_sequences: Vec<String>,
    pub ignore_eos: bool,
    /// Text generated so far, kept only when there are stop sequences to look for.
    text: String,
}

impl StoppingCriteria {
    pub fn new(max_new_tokens: usize, stop_sequences: Vec<String>, ignore_eos: bool) -> Self {
        let stop_sequences = stop_sequences
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        Self {
            max_new_tokens,
            stop_sequences,
            ignore_eos,
            text: String::new(),
        }
    }

    /// Checks the newest token (`generated` tokens so far, `piece` its text) in TGI's order:
    /// length first, then EOS, then stop sequences.
    pub fn check(&mut self, generated: usize, is_eos: bool, piece: &str) -> Option<Finish> {
        if generated >= self.max_new_tokens {
            return Some(Finish::Length);
        }
        if is_eos && !self.ignore_eos {
            return Some(Finish::EosToken);
        }
        if self.stop_sequences.is_empty() || piece.is_empty() {
            return None;
        }
        let before = self.text.len();
        self.text.push_str(piece);
        for stop in &self.stop_sequences {
            // A stop sequence may straddle the previous text and the new piece, so look at the
            // window that could contain a new occurrence.
            let mut from = before.saturating_sub(stop.len().saturating_sub(1));
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            if self.text[from..].contains(stop.as_str()) {
                return Some(Finish::StopSequence);
            }
        }
        // Only the tail can matter for future matches.
        let keep = self
            .stop_sequences
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0);
        if self.text.len() > 4 * keep + 64 {
            let mut cut = self.text.len() - keep;
            while !self.text.is_char_boundary(cut) {
                cut -= 1;
            }
            self.text.drain(..cut);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_length_then_eos_then_stop() {
        let mut s = StoppingCriteria::new(2, vec!["end".into()], false);
        assert_eq!(s.check(1, false, "the e"), None);
        assert_eq!(s.check(2, true, "nd"), Some(Finish::Length));
        let mut s = StoppingCriteria::new(10, vec!["end".into()], false);
        assert_eq!(s.check(1, true, "x"), Some(Finish::EosToken));
        let mut s = StoppingCriteria::new(10, vec![], true);
        assert_eq!(s.check(1, true, "x"), None);
    }

    #[test]
    fn stop_sequence_across_tokens_and_inside_one() {
        let mut s = StoppingCriteria::new(100, vec!["STOP".into()], false);
        assert_eq!(s.check(1, false, "abc ST"), None);
        assert_eq!(s.check(2, false, "OP"), Some(Finish::StopSequence));
        let mut s = StoppingCriteria::new(100, vec!["é!".into()], false);
        assert_eq!(s.check(1, false, "caf"), None);
        assert_eq!(s.check(2, false, "é! more"), Some(Finish::StopSequence));
    }

    #[test]
    fn long_outputs_keep_a_bounded_tail() {
        let mut s = StoppingCriteria::new(10_000, vec!["zz".into()], false);
        for i in 0..1000 {
            assert_eq!(s.check(i + 1, false, "ab"), None);
        }
        assert!(s.text.len() < 100);
        assert_eq!(s.check(1001, false, "z"), None);
        assert_eq!(s.check(1002, false, "z"), Some(Finish::StopSequence));
    }
}
