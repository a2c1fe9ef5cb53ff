//! The server's WebSocket framing (RFC 6455), on a byte stream split at any points.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| duplex_server::fuzzing::websocket_frames(data));
