//! Any byte string as a shard index: a map and safe shard names, or an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weightweave_core::reader::check_index_accepted(data);
});
