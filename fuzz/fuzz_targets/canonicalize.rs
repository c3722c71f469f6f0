//! The guarded-call canonicalizer (form / JSON / query → key). See `checks.rs` for what is checked.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::canonicalize(data));
