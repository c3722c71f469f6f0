//! runonce's HTTP/1 codec against hyper's client on one upstream answer. See `http1_checks.rs`.
#![no_main]

#[path = "../http1_checks.rs"]
mod http1_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| http1_checks::http1_response(data));
