//! Any byte string as a safetensors file: the parser returns a header or an error, never
//! panics, and a header it accepts keeps every tensor inside the data section.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weightweave_core::header::check_accepted(data);
});
