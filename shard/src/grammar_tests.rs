use super::*;

/// eos 0; "a" 1, "aa" 2, "aaa" 3, "b" 4.
fn vocab() -> Vocabulary {
    let mut v = Vocabulary::new(0);
    for (t, id) in [("a", 1), ("aa", 2), ("aaa", 3), ("b", 4)] {
        v.try_insert(t, id).unwrap();
    }
    v
}

/// The shard's grammars over `vocab()`, with logits `width` wide.
fn grammars(width: i64) -> Grammars {
    Grammars {
        vocab: Ok(Arc::new(vocab())),
        compiled: Mutex::new(LruCache::new(nonzero(4))),
        masks: LruCache::new(nonzero(4)),
        mask_width: width,
    }
}

#[test]
fn byte_level_table_matches_gpt2() {
    let map = byte_level_chars();
    assert_eq!(map.len(), 256);
    assert_eq!(map[&'Ġ'], b' ');
    assert_eq!(map[&'Ċ'], b'\n');
    assert_eq!(map[&'a'], b'a');
    assert_eq!(map[&'Ā'], 0);
    assert_eq!(map[&'ÿ'], 0xFF);
    let spelling = Spelling::ByteLevel(map);
    assert_eq!(spelling.bytes("Ġ{\"").unwrap(), b" {\"");
}

#[test]
fn sentencepiece_spaces_and_byte_tokens() {
    let s = Spelling::SentencePiece;
    assert_eq!(s.bytes("<0x0A>").unwrap(), vec![b'\n']);
    assert_eq!(s.bytes("\u{2581}hi").unwrap(), b" hi");
    assert_eq!(s.bytes("<0x0A>x").unwrap(), b"<0x0A>x");
}

#[test]
fn distances_count_tokens_to_an_accepted_end() {
    let g = Grammar::compile("a{2,5}", &vocab()).unwrap();
    let s0 = g.initial_state();
    // "aa" then EOS.
    assert_eq!(g.distance(s0), 2);
    let one_a = g.index.next_state(&s0, &1).unwrap();
    assert_eq!(g.distance(one_a), 2);
    let three_a = g.index.next_state(&s0, &3).unwrap();
    assert_eq!(g.distance(three_a), 1);
    // "b" never fits.
    assert!(!g.allowed(s0).contains(&4));
}

#[test]
fn a_tight_budget_keeps_an_end_within_reach() {
    let g = Grammar::compile("a{2,5}", &vocab()).unwrap();
    let s0 = g.initial_state();
    // Plenty of budget: nothing removed.
    assert_eq!(g.allowed_within(s0, 10), None);
    // Two tokens left: one content token, then EOS. "a" alone would need three.
    let mut tight = g.allowed_within(s0, 2).unwrap();
    tight.sort();
    assert_eq!(tight, vec![2, 3]);
    // Not even the shortest end fits: nothing is forced, the output will be cut.
    assert_eq!(g.allowed_within(s0, 1), None);
    // In an accepting state with one token left only EOS remains.
    let four = g.index.next_state(&s0, &2).unwrap();
    let four = g.index.next_state(&four, &2).unwrap();
    assert_eq!(g.allowed_within(four, 1), Some(vec![0]));
}

#[test]
fn constraint_walks_the_grammar_and_ends_on_eos() {
    let mut grammars = grammars(6);
    let params = pb::NextTokenChooserParameters {
        grammar: "a{2,5}".into(),
        grammar_type: pb::GrammarType::Regex as i32,
        ..Default::default()
    };
    let mut c = grammars.constraint(&params).unwrap().unwrap();
    let mask = grammars
        .batch_mask(vec![(Some(&mut c), 100), (None, 100)], Device::Cpu)
        .unwrap()
        .unwrap();
    let banned: Vec<bool> = Vec::try_from(mask.reshape([-1])).unwrap();
    // Row 0: EOS (not yet accepting), "b" and the id past the vocabulary are banned.
    assert_eq!(&banned[..6], &[true, false, false, false, true, true]);
    // Row 1 is unconstrained.
    assert!(banned[6..].iter().all(|b| !b));
    assert!(!c.advance(3).unwrap());
    assert!(c.advance(4).is_err());
    assert!(c.advance(0).unwrap());
    assert!(!c.forced);
}

#[test]
fn a_grammar_that_cannot_compile_ends_its_sequence_only() {
    let mut grammars = grammars(5);
    let params = |regex: &str| pb::NextTokenChooserParameters {
        grammar: regex.into(),
        grammar_type: pb::GrammarType::Regex as i32,
        ..Default::default()
    };
    let mut bad = grammars.constraint(&params("(")).unwrap().unwrap();
    let mut good = grammars.constraint(&params("a+")).unwrap().unwrap();
    let mask = grammars
        .batch_mask(
            vec![(Some(&mut bad), 10), (Some(&mut good), 10)],
            Device::Cpu,
        )
        .unwrap()
        .unwrap();
    let banned: Vec<bool> = Vec::try_from(mask.reshape([-1])).unwrap();
    // Only EOS for the failed one; the other row is its grammar's.
    assert_eq!(&banned[..5], &[false, true, true, true, true]);
    assert_eq!(&banned[5..], &[true, false, false, false, true]);
    assert!(bad.advance(0).unwrap());
}
