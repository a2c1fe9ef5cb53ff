//! The server side of RFC 6455 framing, over any byte stream: what a WebSocket connection holds
//! between frames is its stream and nothing else.
//!
//! tungstenite keeps a read buffer per connection (it reads at most that much per call, so it
//! cannot be small) and keeps its write buffer at its largest size; with tens of thousands of
//! idle connections those buffers were a third of a connection's memory. Here a read goes into
//! a buffer on the stack of the task reading it, and only the bytes of a frame that is not all
//! there yet are kept, in a buffer freed once the frame is complete; frames to write are built
//! into a buffer whose room (up to 4 KiB) a busy connection keeps and an idle one gives back.
//! An idle connection holds no buffer at all.
//!
//! What the server accepts: masked frames (RFC 6455 §5.1), no extension bits, text, binary,
//! continuation, close, ping and pong frames, control frames of at most 125 bytes and never
//! fragmented, messages of at most `max_message` bytes however they are fragmented, text that is
//! UTF-8 once whole. Pings are answered with pongs, a close frame with a close frame.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// What one read takes from the socket at most (on the stack of the reading task).
const READ_CHUNK: usize = 4096;

/// The write buffer's room a connection keeps between batches (fan-out batches are usually a
/// few small frames: no allocation per batch); a larger buffer is freed once written, and
/// [`Wire::release`] frees even this when the connection looks idle.
const KEEP_OUT: usize = 4096;

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A text message (checked to be UTF-8 as it became a `String`).
    Text(String),
    /// A binary message.
    Binary(Bytes),
    /// A ping or a pong (a ping's pong is already queued).
    Control,
    /// The client closed (its close frame is answered).
    Close,
}

/// Why a stream cannot be read as WebSocket frames.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The peer broke the framing rules (RFC 6455 §5), or a text message was not UTF-8.
    Protocol(&'static str),
    /// A message longer than the limit.
    TooLarge,
    /// The socket failed.
    Io(io::Error),
}

impl From<io::Error> for WireError {
    fn from(error: io::Error) -> Self {
        WireError::Io(error)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Protocol(what) => write!(f, "WebSocket protocol error: {what}"),
            WireError::TooLarge => f.write_str("WebSocket message over the size limit"),
            WireError::Io(error) => write!(f, "socket error: {error}"),
        }
    }
}

/// A fragmented message being put together.
#[derive(Debug)]
struct Fragments {
    opcode: u8,
    payload: Vec<u8>,
}

/// A WebSocket connection's stream, its framing state and the frames waiting to be written.
#[derive(Debug)]
pub(crate) struct Wire<S> {
    io: S,
    /// Bytes read but not yet taken as frames: empty (and unallocated) between frames.
    unread: Vec<u8>,
    /// A fragmented message in progress.
    fragments: Option<Box<Fragments>>,
    /// Frames to write, and how much of them is written: empty once written, unallocated once
    /// released (or when a batch needed more than [`KEEP_OUT`]).
    out: Vec<u8>,
    written: usize,
    max_message: usize,
    /// The client's close frame was read (nothing more is read).
    closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// `io` just after the upgrade; `unread`: bytes the handshake read past its end.
    pub(crate) fn new(io: S, unread: Vec<u8>, max_message: usize) -> Self {
        Wire {
            io,
            unread,
            fragments: None,
            out: Vec::new(),
            written: 0,
            max_message,
            closed: false,
        }
    }

    /// The stream, for the fuzz target to read what was written.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn into_io(self) -> S {
        self.io
    }

    /// The next message; `None` at the end of the stream or after the client's close.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Incoming, WireError>>> {
        loop {
            if self.closed {
                return Poll::Ready(None);
            }
            match self.take_frame() {
                Ok(Some(incoming)) => return Poll::Ready(Some(Ok(incoming))),
                Ok(None) => {}
                Err(error) => return Poll::Ready(Some(Err(error))),
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(None),
                Ok(()) => self.unread.extend_from_slice(buf.filled()),
                Err(error) => return Poll::Ready(Some(Err(error.into()))),
            }
        }
    }

    /// Takes one frame from `unread` if it is all there: a whole message, a control frame, or
    /// (for a fragment that does not end its message) nothing yet but progress.
    fn take_frame(&mut self) -> Result<Option<Incoming>, WireError> {
        loop {
            let Some(header) = Header::parse(&self.unread, self.max_message)? else {
                return Ok(None);
            };
            let end = header.start + header.len;
            if self.unread.len() < end {
                // Not reserved from the header: a client that announces a large frame and
                // sends it slowly holds only what it sent.
                return Ok(None);
            }
            let mut payload = self.unread[header.start..end].to_vec();
            unmask(&mut payload, header.mask);
            if end == self.unread.len() {
                // Nothing left over: give the buffer back.
                self.unread = Vec::new();
            } else {
                self.unread.drain(..end);
            }
            match self.frame(header.fin, header.opcode, payload)? {
                Some(incoming) => return Ok(Some(incoming)),
                None => continue,
            }
        }
    }

    /// One whole frame: a message when it completes one.
    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    ) -> Result<Option<Incoming>, WireError> {
        match opcode {
            OP_PING => {
                self.queue_frame(OP_PONG, &payload);
                Ok(Some(Incoming::Control))
            }
            OP_PONG => Ok(Some(Incoming::Control)),
            OP_CLOSE => {
                if payload.len() == 1 {
                    return Err(WireError::Protocol("a close frame of one byte"));
                }
                // Echo the status code (RFC 6455 §5.5.1), then read no more.
                let code = payload.get(..2).unwrap_or(&[]);
                self.queue_frame(OP_CLOSE, code);
                self.closed = true;
                Ok(Some(Incoming::Close))
            }
            OP_TEXT | OP_BINARY => {
                if self.fragments.is_some() {
                    return Err(WireError::Protocol("a new message inside a fragmented one"));
                }
                if fin {
                    return message(opcode, payload).map(Some);
                }
                self.fragments = Some(Box::new(Fragments { opcode, payload }));
                Ok(None)
            }
            OP_CONTINUATION => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(WireError::Protocol("a continuation frame with no message"));
                };
                if fragments.payload.len() + payload.len() > self.max_message {
                    return Err(WireError::TooLarge);
                }
                fragments.payload.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                let Fragments { opcode, payload } = *self.fragments.take().expect("checked");
                message(opcode, payload).map(Some)
            }
            _ => Err(WireError::Protocol("an unknown opcode")),
        }
    }

    /// Queues a text frame.
    pub(crate) fn queue_text(&mut self, text: &[u8]) {
        self.queue_frame(OP_TEXT, text);
    }

    /// Queues a binary frame.
    pub(crate) fn queue_binary(&mut self, data: &[u8]) {
        self.queue_frame(OP_BINARY, data);
    }

    /// Queues a ping (empty).
    pub(crate) fn queue_ping(&mut self) {
        self.queue_frame(OP_PING, &[]);
    }

    /// Queues a close frame with `code` and `reason` (at most 123 bytes of it).
    pub(crate) fn queue_close(&mut self, code: u16, reason: &str) {
        let mut payload = Vec::with_capacity(2 + reason.len().min(123));
        payload.extend_from_slice(&code.to_be_bytes());
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        self.queue_frame(OP_CLOSE, &payload);
    }

    /// Makes room for `bytes` more of frames (a batch's size, reserved once).
    pub(crate) fn reserve(&mut self, bytes: usize) {
        self.out.reserve(bytes);
    }

    /// How many bytes a frame of `len` payload bytes takes.
    pub(crate) fn frame_len(len: usize) -> usize {
        len + match len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        }
    }

    fn queue_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.out.reserve(Self::frame_len(payload.len()));
        self.out.push(0x80 | opcode);
        match payload.len() {
            len @ 0..=125 => self.out.push(len as u8),
            len @ 126..=0xFFFF => {
                self.out.push(126);
                self.out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                self.out.push(127);
                self.out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        self.out.extend_from_slice(payload);
    }

    /// Whether frames are queued and not yet all written.
    pub(crate) fn has_unwritten(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes what is queued and flushes the stream; past [`KEEP_OUT`] the buffer is freed once
    /// written.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if !self.out.is_empty() {
            self.written = 0;
            if self.out.capacity() > KEEP_OUT {
                self.out = Vec::new();
            } else {
                self.out.clear();
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Frees the write buffer's room once everything is written (an idle connection keeps
    /// none).
    pub(crate) fn release(&mut self) {
        if self.out.is_empty() {
            self.out = Vec::new();
        }
    }

    /// Writes what is queued and flushes.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Shuts the stream's write side (after a close frame).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        self.io.shutdown().await
    }
}

/// A whole message of `opcode`.
fn message(opcode: u8, payload: Vec<u8>) -> Result<Incoming, WireError> {
    if opcode == OP_TEXT {
        String::from_utf8(payload)
            .map(Incoming::Text)
            .map_err(|_| WireError::Protocol("a text message that is not UTF-8"))
    } else {
        Ok(Incoming::Binary(Bytes::from(payload)))
    }
}

/// A client frame's header.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Where the payload starts.
    start: usize,
    len: usize,
}

impl Header {
    /// The header at the start of `buf`, checked; `Ok(None)` while it is not all there.
    fn parse(buf: &[u8], max_message: usize) -> Result<Option<Header>, WireError> {
        let [first, second, ..] = *buf else {
            return Ok(None);
        };
        let fin = first & 0x80 != 0;
        if first & 0x70 != 0 {
            return Err(WireError::Protocol(
                "reserved bits set (no extension was agreed)",
            ));
        }
        let opcode = first & 0x0F;
        if second & 0x80 == 0 {
            return Err(WireError::Protocol("an unmasked client frame"));
        }
        let (len, at) = match second & 0x7F {
            126 => match buf.get(2..4) {
                Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(bytes) => (
                    u64::from_be_bytes(bytes.try_into().expect("eight bytes")),
                    10,
                ),
                None => return Ok(None),
            },
            len => (u64::from(len), 2),
        };
        if opcode >= OP_CLOSE && (!fin || len > 125) {
            return Err(WireError::Protocol("a fragmented or long control frame"));
        }
        // Refused before its payload is read.
        let len = match usize::try_from(len) {
            Ok(len) if len <= max_message => len,
            _ => return Err(WireError::TooLarge),
        };
        let Some(mask) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: mask.try_into().expect("four bytes"),
            start: at + 4,
            len,
        }))
    }
}

/// Unmasks (or masks) `payload` with `mask` (RFC 6455 §5.3).
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes(chunk.try_into().expect("four bytes")) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

#[cfg(test)]
mod tests;
