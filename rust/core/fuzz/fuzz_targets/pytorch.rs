//! Any byte string as a PyTorch checkpoint (zip + restricted unpickler): a tensor table whose
//! ranges lie inside the file, or an error; never a panic, never unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weightweave_core::source::pytorch::check_accepted(data);
});
