//! An RFC 7396 merge patch applied to a record, and the record rendered.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| duplex_server::fuzzing::merge_patch(data));
