//! Every input in `corpus/<target>/` through its target, on stable Rust: the seeds, and any
//! input a fuzzing run found and saved there (crashes found by `make fuzz` are added to the
//! corpus once fixed, so they stay fixed).

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 5, "{target}: only {} seeds", inputs.len());
    for path in inputs {
        let data = std::fs::read(&path).expect("a corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
    }
}

#[test]
fn request_json_seeds() {
    replay("request_json", tessera_fuzz::request_json);
}

#[test]
fn chat_template_seeds() {
    replay("chat_template", tessera_fuzz::chat_template);
}

#[test]
fn sse_framing_seeds() {
    replay("sse_framing", tessera_fuzz::sse_framing);
}

#[test]
fn proto_decode_seeds() {
    replay("proto_decode", tessera_fuzz::proto_decode);
}
