//! Any byte string as a diffusion LoRA file against a fixed base: accepted or refused, never a
//! panic, and every accepted delta evaluates over its whole tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weightweave_core::source::lora::fuzzcheck::check_accepted(data);
});
