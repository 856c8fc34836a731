//! Structure-aware fuzzing of the PyTorch reader: each input is a short program that builds a
//! whole `torch.save`-shaped archive (`source::fuzzgen`), with pickles up to 1 MiB of nesting,
//! memo references, MARKs and tensor entries, and archive-level variations (byte order, extra
//! pickles and folders). The reader must return a table inside the file or an error: never a
//! panic, a stack overflow or unbounded memory (run with -rss_limit_mb).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|program: &[u8]| {
    weightweave_core::source::pytorch::check_program(program);
});
