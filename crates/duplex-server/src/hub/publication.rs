//! A publication, encoded once for every transport.
//!
//! One buffer holds `length u32 | kind u8 | frame` (plus `\n` after a JSON frame), and each
//! transport sends a slice of it: WebSocket the frame, raw TCP in line mode the frame and its
//! newline, raw TCP in length-prefixed mode the whole buffer. Subscribers share the buffer; no
//! subscriber encodes anything.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::budget::ByteBudget;
pub use crate::model::Payload;

/// One publication on one channel, ready to send.
#[derive(Debug)]
pub struct Publication {
    channel: Arc<str>,
    offset: u64,
    binary: bool,
    /// `length | kind | frame [| \n]`.
    encoded: Bytes,
    payload_start: usize,
    /// A JSON line with the payload in base64, made on first use by a line-mode reader.
    binary_as_line: OnceLock<Bytes>,
    /// How many outgoing queues hold it; its bytes count once in `queue_budget` while any does.
    queued: AtomicU32,
    /// The server's budget for queued bytes (none in unit tests that need no accounting).
    queue_budget: Option<Arc<ByteBudget>>,
}

impl Publication {
    /// Encodes a publication.
    pub fn new(channel: Arc<str>, offset: u64, payload: &Payload) -> Publication {
        let mut buf = Vec::with_capacity(64 + channel.len() + payload.len());
        buf.extend_from_slice(&[0; 4]);
        let (binary, payload_start) = match payload {
            Payload::Json(data) => {
                buf.push(duplex_proto::tcp::KIND_TEXT);
                duplex_proto::frames::write_message(&mut buf, &channel, offset, data);
                (false, 0)
            }
            Payload::Binary(bytes) => {
                duplex_proto::binary::write_message(&mut buf, &channel, offset, bytes);
                (true, buf.len() - bytes.len())
            }
        };
        let len = u32::try_from(buf.len() - 4).expect("publications are smaller than 4 GiB");
        buf[..4].copy_from_slice(&len.to_be_bytes());
        if !binary {
            buf.push(b'\n');
        }
        let encoded = Bytes::from(buf);
        Publication {
            channel,
            offset,
            binary,
            encoded,
            payload_start,
            binary_as_line: OnceLock::new(),
            queued: AtomicU32::new(0),
            queue_budget: None,
        }
    }

    /// Encodes a publication whose bytes count in `budget` while any outgoing queue holds it.
    pub fn counted(
        channel: Arc<str>,
        offset: u64,
        payload: &Payload,
        budget: &Arc<ByteBudget>,
    ) -> Publication {
        Publication {
            queue_budget: Some(budget.clone()),
            ..Publication::new(channel, offset, payload)
        }
    }

    /// The memory it holds, in bytes (what budgets count).
    pub fn size(&self) -> usize {
        self.encoded.len() + self.channel.len() + std::mem::size_of::<Publication>()
    }

    /// The channel.
    pub fn channel(&self) -> &Arc<str> {
        &self.channel
    }

    /// The offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the payload is binary.
    pub fn is_binary(&self) -> bool {
        self.binary
    }

    /// The payload of a JSON publication's WebSocket text frame: its JSON, which serde_json
    /// wrote as UTF-8 (within `encoded`: after the length and the kind, before the newline).
    pub fn ws_text(&self) -> Option<&[u8]> {
        (!self.binary).then(|| &self.encoded[5..self.encoded.len() - 1])
    }

    /// The binary frame (kind byte first) of a binary publication, for WebSocket.
    pub fn binary_frame(&self) -> &[u8] {
        &self.encoded[4..]
    }

    /// The whole length-prefixed frame, for raw TCP in length-prefixed mode.
    pub fn length_prefixed(&self) -> Bytes {
        if self.binary {
            self.encoded.clone()
        } else {
            self.encoded.slice(..self.encoded.len() - 1)
        }
    }

    /// The JSON line (newline included), for raw TCP in line mode.
    pub fn line(&self) -> Bytes {
        if !self.binary {
            return self.encoded.slice(5..);
        }
        self.binary_as_line
            .get_or_init(|| {
                let mut buf = Vec::new();
                duplex_proto::frames::write_binary_message_as_text(
                    &mut buf,
                    &self.channel,
                    self.offset,
                    &self.encoded[self.payload_start..],
                );
                buf.push(b'\n');
                Bytes::from(buf)
            })
            .clone()
    }

    /// The JSON text of the frame without newline (JSON publications), for the HTTP transports.
    pub fn json_frame(&self) -> Option<Bytes> {
        (!self.binary).then(|| self.encoded.slice(5..self.encoded.len() - 1))
    }
}

/// A publication held by an outgoing queue (or a conflation slot). While at least one exists
/// for a publication, its bytes count once in the server's queue budget: a publication shared
/// by a thousand queues costs its bytes once, as it does in memory.
#[derive(Debug)]
pub struct Queued(Arc<Publication>);

impl Queued {
    /// Holds `publication` for one queue.
    pub fn new(publication: &Arc<Publication>) -> Queued {
        if let Some(budget) = &publication.queue_budget
            && publication.queued.fetch_add(1, Ordering::AcqRel) == 0
        {
            budget.add(publication.size());
        }
        Queued(publication.clone())
    }

    /// The publication.
    pub fn publication(&self) -> &Arc<Publication> {
        &self.0
    }
}

impl std::ops::Deref for Queued {
    type Target = Publication;

    fn deref(&self) -> &Publication {
        &self.0
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(budget) = &self.0.queue_budget
            && self.0.queued.fetch_sub(1, Ordering::AcqRel) == 1
        {
            budget.sub(self.0.size());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn one_buffer_serves_every_transport() {
        let data = RawValue::from_string(r#"{"text":"hi"}"#.into()).expect("json");
        let publication = Publication::new("chat:lobby".into(), 9, &Payload::Json(data));
        let frame = r#"{"type":"message","channel":"chat:lobby","offset":9,"data":{"text":"hi"}}"#;
        assert_eq!(publication.ws_text(), Some(frame.as_bytes()));
        assert_eq!(publication.line(), format!("{frame}\n").as_bytes());
        let lp = publication.length_prefixed();
        assert_eq!(&lp[..4], &((frame.len() + 1) as u32).to_be_bytes());
        assert_eq!(lp[4], 0);
        assert_eq!(&lp[5..], frame.as_bytes());
    }

    #[test]
    fn binary_publications_have_binary_frames_and_a_base64_line() {
        let payload = Bytes::from_static(&[0, 1, 2, 255]);
        let publication = Publication::new("stream:cam".into(), 3, &Payload::Binary(payload));
        let frame = publication.binary_frame();
        let message = duplex_proto::binary::decode_message(frame).expect("valid");
        assert_eq!(message.channel, "stream:cam");
        assert_eq!(message.offset, 3);
        assert_eq!(message.payload, &[0, 1, 2, 255]);
        assert_eq!(&publication.length_prefixed()[4..], frame);
        assert_eq!(
            publication.line(),
            Bytes::from_static(
                b"{\"type\":\"message\",\"channel\":\"stream:cam\",\"offset\":3,\"binary\":\"AAEC/w==\"}\n"
            )
        );
        assert!(publication.ws_text().is_none());
    }

    #[test]
    fn a_publication_counts_once_while_any_queue_holds_it() {
        let budget = ByteBudget::new(1 << 20);
        let data = RawValue::from_string("1".into()).expect("json");
        let publication = Arc::new(Publication::counted(
            "chat:a".into(),
            1,
            &Payload::Json(data),
            &budget,
        ));
        let first = Queued::new(&publication);
        let second = Queued::new(&publication);
        assert_eq!(budget.used(), publication.size());
        drop(first);
        assert_eq!(budget.used(), publication.size());
        drop(second);
        assert_eq!(budget.used(), 0);
    }
}
