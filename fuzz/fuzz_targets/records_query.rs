//! A records listing's query string: limit, sort, filters and sealed cursors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| duplex_server::fuzzing::records_query(data));
