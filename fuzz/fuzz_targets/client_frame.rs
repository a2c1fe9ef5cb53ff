//! The JSON client-frame decoder: any bytes parse or are refused, never panic; what parses
//! keeps its borrowed data within the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| duplex_server::fuzzing::client_frame(data));
