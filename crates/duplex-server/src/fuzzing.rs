//! Entry points for the fuzz targets in `fuzz/` (built only with the `fuzzing` feature): each
//! runs one of the server's own decoders or parsers on arbitrary bytes and checks what must
//! hold whatever the input. A crash, a hang or a memory blow-up found by the fuzzer becomes a
//! regular test next to the code it is in.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::socket::wire::{Incoming, Wire, WireError};
use crate::store::{Change, CursorKey};

/// The message limit the WebSocket target reads with (small, so the fuzzer reaches it).
const MAX_MESSAGE: usize = 4096;

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
