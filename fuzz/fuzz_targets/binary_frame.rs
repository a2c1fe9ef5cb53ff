//! The binary frame decoders (`publish` from clients, `message` to them): any bytes decode or
//! are refused; what decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| duplex_server::fuzzing::binary_frame(data));
