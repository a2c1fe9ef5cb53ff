//! The raw TCP reader, in line and length-prefixed mode: any byte stream, arriving in any
//! chunks, gives frames within the limit (lines without their newline) or a clear error, and
//! never holds more than the limit plus one read.
#![no_main]

use bytes::BytesMut;
use duplex_proto::tcp::{Framing, TcpDecoder, TcpFrame};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const MAX_FRAME: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = TcpDecoder::new(MAX_FRAME);
    if mode & 1 == 1 {
        decoder.framing = Framing::LengthPrefixed;
    }
    let chunk = usize::from(mode >> 1).max(1);
    let mut buffer = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(TcpFrame::Text(text))) => {
                    assert!(text.len() <= MAX_FRAME);
                    if decoder.framing == Framing::Lines {
                        assert!(!text.contains(&b'\n'));
                        // A client may switch to length-prefixed frames by asking.
                        if text.windows(15).any(|w| w == b"length_prefixed") {
                            decoder.framing = Framing::LengthPrefixed;
                        }
                    }
                }
                Ok(Some(TcpFrame::Binary(frame))) => {
                    assert!(!frame.is_empty() && frame.len() <= MAX_FRAME);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(
            buffer.len() <= MAX_FRAME + 4 + chunk,
            "holds {}",
            buffer.len()
        );
    }
});
