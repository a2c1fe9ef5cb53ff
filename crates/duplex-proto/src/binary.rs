//! Binary frames: publications whose payload is bytes, never base64 inside JSON.
//!
//! Every binary frame starts with a kind byte. Integers are big-endian.
//!
//! ```text
//! message (server → client):  0x01 | channel length u16 | channel UTF-8 | offset u64 | payload
//! publish (client → server):  0x02 | request id u32     | channel length u16 | channel UTF-8 | payload
//! ```
//!
//! On WebSocket each is one binary message; on raw TCP in length-prefixed mode each is the body
//! of a frame (see [`crate::tcp`]). A `publish` is answered by a JSON `reply` or `error` with the
//! request id.

/// Kind byte of a server → client binary message.
pub const KIND_MESSAGE: u8 = 0x01;
/// Kind byte of a client → server binary publish.
pub const KIND_PUBLISH: u8 = 0x02;

/// A binary frame that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryFrameError {
    /// Shorter than its headers say.
    #[error("the binary frame is truncated")]
    Truncated,
    /// The kind byte is not one this side reads.
    #[error("unknown binary frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The channel name is not UTF-8.
    #[error("the channel name is not UTF-8")]
    ChannelNotUtf8,
}

/// A decoded binary `publish`.
#[derive(Debug, PartialEq, Eq)]
pub struct BinaryPublish<'a> {
    /// The request id.
    pub id: u32,
    /// The channel.
    pub channel: &'a str,
    /// The payload.
    pub payload: &'a [u8],
}

/// A decoded binary `message`.
#[derive(Debug, PartialEq, Eq)]
pub struct BinaryMessage<'a> {
    /// The channel.
    pub channel: &'a str,
    /// The publication's offset.
    pub offset: u64,
    /// The payload.
    pub payload: &'a [u8],
}

/// Appends a binary `message` (kind byte first) to `buf`.
pub fn write_message(buf: &mut Vec<u8>, channel: &str, offset: u64, payload: &[u8]) {
    let channel_len = u16::try_from(channel.len()).expect("channel names are at most 161 bytes");
    buf.reserve(1 + 2 + channel.len() + 8 + payload.len());
    buf.push(KIND_MESSAGE);
    buf.extend_from_slice(&channel_len.to_be_bytes());
    buf.extend_from_slice(channel.as_bytes());
    buf.extend_from_slice(&offset.to_be_bytes());
    buf.extend_from_slice(payload);
}

/// Encodes a binary `publish`.
pub fn encode_publish(id: u32, channel: &str, payload: &[u8]) -> Vec<u8> {
    let channel_len = u16::try_from(channel.len()).expect("channel names are at most 161 bytes");
    let mut buf = Vec::with_capacity(1 + 4 + 2 + channel.len() + payload.len());
    buf.push(KIND_PUBLISH);
    buf.extend_from_slice(&id.to_be_bytes());
    buf.extend_from_slice(&channel_len.to_be_bytes());
    buf.extend_from_slice(channel.as_bytes());
    buf.extend_from_slice(payload);
    buf
}

fn take<'a>(frame: &mut &'a [u8], n: usize) -> Result<&'a [u8], BinaryFrameError> {
    if frame.len() < n {
        return Err(BinaryFrameError::Truncated);
    }
    let (head, rest) = frame.split_at(n);
    *frame = rest;
    Ok(head)
}

fn take_channel<'a>(frame: &mut &'a [u8]) -> Result<&'a str, BinaryFrameError> {
    let len = take(frame, 2)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    std::str::from_utf8(take(frame, len)?).map_err(|_| BinaryFrameError::ChannelNotUtf8)
}

/// Decodes a binary `publish` (kind byte first).
pub fn decode_publish(mut frame: &[u8]) -> Result<BinaryPublish<'_>, BinaryFrameError> {
    match take(&mut frame, 1)?[0] {
        KIND_PUBLISH => {}
        kind => return Err(BinaryFrameError::UnknownKind(kind)),
    }
    let id = take(&mut frame, 4)?;
    let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
    let channel = take_channel(&mut frame)?;
    Ok(BinaryPublish {
        id,
        channel,
        payload: frame,
    })
}

/// Decodes a binary `message` (kind byte first).
pub fn decode_message(mut frame: &[u8]) -> Result<BinaryMessage<'_>, BinaryFrameError> {
    match take(&mut frame, 1)?[0] {
        KIND_MESSAGE => {}
        kind => return Err(BinaryFrameError::UnknownKind(kind)),
    }
    let channel = take_channel(&mut frame)?;
    let offset = take(&mut frame, 8)?;
    let offset = u64::from_be_bytes(offset.try_into().expect("took 8 bytes"));
    Ok(BinaryMessage {
        channel,
        offset,
        payload: frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn messages_round_trip(channel in "[a-z]{1,8}:[a-z0-9]{1,16}", offset: u64, payload: Vec<u8>) {
            let mut buf = Vec::new();
            write_message(&mut buf, &channel, offset, &payload);
            let message = decode_message(&buf).expect("valid");
            prop_assert_eq!(message, BinaryMessage { channel: &channel, offset, payload: &payload });
        }

        #[test]
        fn publishes_round_trip(id: u32, channel in "[a-z]{1,8}:[a-z0-9]{1,16}", payload: Vec<u8>) {
            let buf = encode_publish(id, &channel, &payload);
            let publish = decode_publish(&buf).expect("valid");
            prop_assert_eq!(publish, BinaryPublish { id, channel: &channel, payload: &payload });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let _ = decode_publish(&bytes);
            let _ = decode_message(&bytes);
        }
    }

    #[test]
    fn truncated_and_foreign_frames_are_errors() {
        assert_eq!(decode_publish(&[]), Err(BinaryFrameError::Truncated));
        assert_eq!(
            decode_publish(&[0x09]),
            Err(BinaryFrameError::UnknownKind(9))
        );
        assert_eq!(
            decode_publish(&[KIND_PUBLISH, 0, 0, 0, 1, 0, 5, b'a']),
            Err(BinaryFrameError::Truncated)
        );
        assert_eq!(
            decode_publish(&[KIND_PUBLISH, 0, 0, 0, 1, 0, 1, 0xff]),
            Err(BinaryFrameError::ChannelNotUtf8)
        );
    }
}
