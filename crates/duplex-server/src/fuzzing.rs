//! The fuzz targets' bodies (`fuzz/fuzz_targets/*.rs` each call one; built with the `fuzzing`
//! feature, and in this crate's tests): each runs one of the decoders or parsers on arbitrary
//! bytes and checks what must hold whatever the input. A crash, a hang or a memory blow-up found
//! by the fuzzer becomes a regular test next to the code it is in. The tests below replay every
//! committed seed (`fuzz/seeds/TARGET`) through its target on stable, so CI keeps the targets
//! building and the seeds passing without a nightly build; the fuzzing runs themselves are
//! `scripts/fuzz.sh`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use duplex_proto::binary::{decode_message, decode_publish, encode_publish, write_message};
use duplex_proto::frames::ClientFrame;
use duplex_proto::tcp::{Framing, TcpDecoder, TcpFrame};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::codec::Decoder;

use crate::socket::wire::{Incoming, Wire, WireError};
use crate::store::{Change, CursorKey};

/// The message limit the WebSocket target reads with (small, so the fuzzer reaches it).
const MAX_MESSAGE: usize = 4096;

/// The frame limit the raw TCP target reads with.
const MAX_TCP_FRAME: usize = 1024;

/// The JSON client-frame decoder: any bytes parse or are refused, never panic; what parses
/// keeps its borrowed data within the input.
pub fn client_frame(data: &[u8]) {
    if let Ok(frame) = ClientFrame::parse(data) {
        if let Some(raw) = frame.data {
            assert!(raw.get().len() <= data.len());
            assert_ne!(raw.get().trim(), "", "data is a JSON value");
        }
        assert!(frame.kind.len() <= data.len());
    }
}

/// The binary frame decoders (`publish` from clients, `message` to them): any bytes decode or
/// are refused; what decodes encodes back to the same bytes.
pub fn binary_frame(data: &[u8]) {
    if let Ok(publish) = decode_publish(data) {
        assert_eq!(
            encode_publish(publish.id, publish.channel, publish.payload),
            data,
            "a publish frame reads back as itself"
        );
    }
    if let Ok(message) = decode_message(data) {
        let mut again = Vec::new();
        write_message(&mut again, message.channel, message.offset, message.payload);
        assert_eq!(again, data, "a message frame reads back as itself");
    }
}

/// The raw TCP reader, in line and length-prefixed mode: the first byte picks the mode (low
/// bit) and the chunk size the rest arrives in. Any byte stream, arriving in any chunks, gives
/// frames within the limit (lines without their newline) or a clear error, and never holds
/// more than the limit plus one read.
pub fn tcp_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = TcpDecoder::new(MAX_TCP_FRAME);
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
                    assert!(text.len() <= MAX_TCP_FRAME);
                    if decoder.framing == Framing::Lines {
                        assert!(!text.contains(&b'\n'));
                        // A client may switch to length-prefixed frames by asking.
                        if text.windows(15).any(|w| w == b"length_prefixed") {
                            decoder.framing = Framing::LengthPrefixed;
                        }
                    }
                }
                Ok(Some(TcpFrame::Binary(frame))) => {
                    assert!(!frame.is_empty() && frame.len() <= MAX_TCP_FRAME);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(
            buffer.len() <= MAX_TCP_FRAME + 4 + chunk,
            "holds {}",
            buffer.len()
        );
    }
}

/// A stream that hands out `input` in chunks of the sizes `chunks` says (cycled), and keeps
/// what is written to it.
struct Scripted<'a> {
    input: &'a [u8],
    chunks: &'a [u8],
    turn: usize,
    written: Vec<u8>,
}

impl AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let chunk = match self.chunks {
            [] => usize::MAX,
            chunks => usize::from(chunks[self.turn % chunks.len()]).max(1),
        };
        self.turn += 1;
        let take = chunk.min(self.input.len()).min(buf.remaining());
        let (head, rest) = self.input.split_at(take);
        buf.put_slice(head);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// WebSocket framing ([`Wire`]): the first byte says how many bytes of chunk sizes follow
/// (so that frames arrive split at any point), the rest is the client's byte stream. Every
/// message read is within the limit, text is UTF-8, nothing is read after a close, and what
/// the server writes back (pongs, the close) is well-formed.
pub fn websocket_frames(data: &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let (chunks, input) = rest.split_at(usize::from(count % 8).min(rest.len()));
    let io = Scripted {
        input,
        chunks,
        turn: 0,
        written: Vec::new(),
    };
    let mut wire = Wire::new(io, Vec::new(), MAX_MESSAGE);
    let mut cx = Context::from_waker(Waker::noop());
    let mut closed = false;
    loop {
        match wire.poll_next(&mut cx) {
            Poll::Ready(Some(Ok(incoming))) => {
                assert!(!closed, "a message after the close");
                match incoming {
                    Incoming::Text(text) => assert!(text.len() <= MAX_MESSAGE),
                    Incoming::Binary(bytes) => assert!(bytes.len() <= MAX_MESSAGE),
                    Incoming::Control => {}
                    Incoming::Close => closed = true,
                }
            }
            Poll::Ready(Some(Err(WireError::Io(error)))) => panic!("no I/O error here: {error}"),
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => break,
            Poll::Pending => panic!("the stream is always ready"),
        }
    }
    assert!(wire.poll_flush(&mut cx).is_ready());
    let written = wire.into_io().written;
    check_server_frames(&written);
}

/// What the server wrote: unmasked control frames (pong, close) of at most 125 bytes, whole.
fn check_server_frames(mut written: &[u8]) {
    while !written.is_empty() {
        assert!(written.len() >= 2, "a cut frame header");
        let (first, second) = (written[0], written[1]);
        assert_eq!(first & 0x80, 0x80, "a final frame");
        assert!(matches!(first & 0x0f, 0x8 | 0xA), "a close or a pong");
        assert_eq!(second & 0x80, 0, "server frames are not masked");
        let len = usize::from(second & 0x7f);
        assert!(len <= 125, "a control frame of at most 125 bytes");
        assert!(written.len() >= 2 + len, "a cut frame");
        written = &written[2 + len..];
    }
}

/// A records listing's query string (`limit`, `sort`, `filter.*`, `cursor`): parsed or
/// refused with an error, and a cursor opens only if this server sealed it for this listing.
pub fn records_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = CursorKey::new(&[7; 32]);
    if let Ok(query) = crate::http::parse_list_query_for_fuzzing(text, &key, "posts") {
        assert!((1..=500).contains(&query.limit));
        // A cursor sealed for the listing it came from opens again for it, to the same place.
        if let Some(cursor) = &query.after {
            let sealed = key.seal(cursor, "posts", &query.filters);
            assert_eq!(
                key.open(&sealed, "posts", &query.filters).as_ref(),
                Some(cursor)
            );
        }
    }
    // Arbitrary text never opens as a cursor unless it is one.
    let _ = key.open(text, "posts", &[]);
}

/// An RFC 7396 merge patch on a record: the input is two JSON documents separated by a NUL
/// byte, the record's client fields and the patch. The result never holds a server field and
/// renders as a JSON object with the server fields first.
pub fn merge_patch(data: &[u8]) {
    let Some(split) = data.iter().position(|&b| b == 0) else {
        return;
    };
    let Ok(Value::Object(current)) = serde_json::from_slice::<Value>(&data[..split]) else {
        return;
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&data[split + 1..]) else {
        return;
    };
    // What the HTTP layer refuses first: numbers JSON would change.
    if crate::store::check_numbers(&data[split + 1..]).is_err() {
        return;
    }
    let Ok(fields) = crate::store::apply_change(current, Change::MergePatch(patch)) else {
        return;
    };
    for server_field in ["id", "created", "updated", "version"] {
        assert!(!fields.contains_key(server_field), "{server_field} kept");
    }
    let document = crate::store::render_document("a1", 2, 1_700_000_000_000_000, 1, fields);
    let Ok(Value::Object(rendered)) = serde_json::from_slice::<Value>(&document) else {
        panic!("a record renders as a JSON object");
    };
    let first: Vec<&String> = rendered.keys().take(4).collect();
    assert_eq!(first, ["id", "created", "updated", "version"]);
    let _: Map<String, Value> = rendered;
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every committed seed of `target` through `run`; a seed that panics fails the test with
    /// its file name.
    fn replay(target: &str, run: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds")
            .join(target);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
            .map(|entry| entry.expect("a seed").path())
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
        for seed in seeds {
            let data = std::fs::read(&seed).expect("read a seed");
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{} fails its target", seed.display());
            }
        }
    }

    #[test]
    fn every_seed_passes_client_frame() {
        replay("client_frame", super::client_frame);
    }

    #[test]
    fn every_seed_passes_binary_frame() {
        replay("binary_frame", super::binary_frame);
    }

    #[test]
    fn every_seed_passes_tcp_frames() {
        replay("tcp_frames", super::tcp_frames);
    }

    #[test]
    fn every_seed_passes_websocket_frames() {
        replay("websocket_frames", super::websocket_frames);
    }

    #[test]
    fn every_seed_passes_records_query() {
        replay("records_query", super::records_query);
    }

    #[test]
    fn every_seed_passes_merge_patch() {
        replay("merge_patch", super::merge_patch);
    }

    /// The checks are live: what the server must never write is caught.
    #[test]
    #[should_panic(expected = "server frames are not masked")]
    fn a_masked_server_frame_is_caught() {
        super::check_server_frames(&[0x8A, 0x80, 1, 2, 3, 4]);
    }
}
