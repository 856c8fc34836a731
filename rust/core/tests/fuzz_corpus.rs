//! Replays the fuzzers' committed regression corpus (`rust/core/fuzz/corpus/`) through the
//! same checks the fuzz targets make, so every ordinary `cargo test` re-runs what fuzzing found.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let r = std::panic::catch_unwind(|| check(&bytes));
        assert!(r.is_ok(), "{} fails the {target} check", p.display());
        n += 1;
    }
    assert!(n >= 5, "the {target} corpus holds only {n} inputs");
}

#[test]
fn header_corpus() {
    replay("header", weightweave_core::header::check_accepted);
}

#[test]
fn index_corpus() {
    replay("index", weightweave_core::reader::check_index_accepted);
}

#[test]
fn pytorch_corpus() {
    replay("pytorch", weightweave_core::source::pytorch::check_accepted);
}

#[test]
fn pytorch_program_corpus() {
    replay(
        "pytorch_program",
        weightweave_core::source::pytorch::check_program,
    );
}

#[test]
fn lora_file_corpus() {
    replay(
        "lora_file",
        weightweave_core::source::lora::fuzzcheck::check_accepted,
    );
}
