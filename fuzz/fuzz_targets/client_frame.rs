//! The JSON client-frame decoder: any bytes parse or are refused, never panic; what parses
//! keeps its borrowed data within the input.
#![no_main]

use duplex_proto::frames::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ClientFrame::parse(data) {
        if let Some(raw) = frame.data {
            assert!(raw.get().len() <= data.len());
            assert_ne!(raw.get().trim(), "", "data is a JSON value");
        }
        assert!(frame.kind.len() <= data.len());
    }
});
