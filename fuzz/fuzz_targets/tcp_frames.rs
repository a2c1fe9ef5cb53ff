//! The raw TCP reader, in line and length-prefixed mode: any byte stream, arriving in any
//! chunks, gives frames within the limit (lines without their newline) or a clear error, and
//! never holds more than the limit plus one read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| duplex_server::fuzzing::tcp_frames(data));
