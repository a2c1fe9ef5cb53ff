//! Raw TCP framing: lines for people, length-prefixed frames for programs.
//!
//! A connection starts in **line** mode: every frame is one JSON object followed by `\n` (a
//! trailing `\r` and empty lines are ignored), so `nc` works. Binary publications reach a
//! line-mode reader as JSON with the payload in base64.
//!
//! A client switches to **length-prefixed** mode with `{"id":1,"type":"framing","mode":
//! "length_prefixed"}`; the `reply` is the last line, and from then on both directions use
//!
//! ```text
//! length u32 (big-endian, of what follows) | kind u8 | body
//! ```
//!
//! where kind `0x00` is a JSON text frame and the other kinds are the binary frames of
//! [`crate::binary`], kind byte included in the length.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Kind byte of a JSON text frame in length-prefixed mode.
pub const KIND_TEXT: u8 = 0x00;

/// The framing a raw TCP connection is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON object per line.
    Lines,
    /// `length u32 | kind u8 | body`.
    LengthPrefixed,
}

/// One frame read from a raw TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpFrame {
    /// A JSON text frame, without its line ending or kind byte.
    Text(Bytes),
    /// A binary frame, kind byte first.
    Binary(Bytes),
}

/// Why a raw TCP stream could not be read as frames.
#[derive(Debug, thiserror::Error)]
pub enum TcpFrameError {
    /// A frame (or a line without its newline) is longer than the limit.
    #[error("frame larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A length-prefixed frame announced length 0.
    #[error("empty length-prefixed frame")]
    Empty,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads frames in the connection's current [`Framing`]; switch with [`TcpDecoder::framing`].
#[derive(Debug)]
pub struct TcpDecoder {
    /// The framing in effect; the server changes it after answering `framing`.
    pub framing: Framing,
    max_frame: usize,
    /// How far the current line has been searched for `\n`, so long lines are scanned once.
    scanned: usize,
}

impl TcpDecoder {
    /// A decoder in line mode that refuses frames over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        TcpDecoder {
            framing: Framing::Lines,
            max_frame,
            scanned: 0,
        }
    }
}

impl Decoder for TcpDecoder {
    type Item = TcpFrame;
    type Error = TcpFrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<TcpFrame>, TcpFrameError> {
        match self.framing {
            Framing::Lines => loop {
                let Some(found) = src[self.scanned..].iter().position(|&b| b == b'\n') else {
                    self.scanned = src.len();
                    if src.len() > self.max_frame {
                        return Err(TcpFrameError::TooLarge {
                            limit: self.max_frame,
                        });
                    }
                    return Ok(None);
                };
                let end = self.scanned + found;
                self.scanned = 0;
                if end > self.max_frame {
                    return Err(TcpFrameError::TooLarge {
                        limit: self.max_frame,
                    });
                }
                let mut line = src.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(TcpFrame::Text(line.freeze())));
            },
            Framing::LengthPrefixed => {
                if src.len() < 4 {
                    return Ok(None);
                }
                let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
                if len == 0 {
                    return Err(TcpFrameError::Empty);
                }
                if len > self.max_frame {
                    return Err(TcpFrameError::TooLarge {
                        limit: self.max_frame,
                    });
                }
                if src.len() < 4 + len {
                    src.reserve(4 + len - src.len());
                    return Ok(None);
                }
                src.advance(4);
                let mut frame = src.split_to(len).freeze();
                if frame[0] == KIND_TEXT {
                    frame.advance(1);
                    Ok(Some(TcpFrame::Text(frame)))
                } else {
                    Ok(Some(TcpFrame::Binary(frame)))
                }
            }
        }
    }
}

/// Wraps a JSON text frame for length-prefixed mode.
pub fn length_prefixed_text(json: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(5 + json.len());
    let len = u32::try_from(json.len() + 1).expect("frames are smaller than 4 GiB");
    buf.extend_from_slice(&len.to_be_bytes());
    buf.push(KIND_TEXT);
    buf.extend_from_slice(json);
    buf
}

/// Wraps a binary frame (kind byte first) for length-prefixed mode.
pub fn length_prefixed_binary(frame: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(4 + frame.len());
    let len = u32::try_from(frame.len()).expect("frames are smaller than 4 GiB");
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(frame);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut TcpDecoder, input: &[u8]) -> Vec<TcpFrame> {
        let mut buf = BytesMut::from(input);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(&mut buf).expect("valid") {
            frames.push(frame);
        }
        frames
    }

    #[test]
    fn lines_skip_blank_lines_and_carriage_returns() {
        let mut decoder = TcpDecoder::new(1024);
        let frames = decode_all(&mut decoder, b"{\"a\":1}\r\n\n  \n{\"b\":2}\n{\"c\"");
        assert_eq!(
            frames,
            vec![
                TcpFrame::Text(Bytes::from_static(b"{\"a\":1}")),
                TcpFrame::Text(Bytes::from_static(b"{\"b\":2}"))
            ]
        );
    }

    #[test]
    fn a_line_over_the_limit_is_an_error_even_before_its_newline() {
        let mut decoder = TcpDecoder::new(8);
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(TcpFrameError::TooLarge { limit: 8 })
        ));
    }

    #[test]
    fn length_prefixed_frames_split_text_and_binary() {
        let mut decoder = TcpDecoder::new(1024);
        decoder.framing = Framing::LengthPrefixed;
        let mut input = length_prefixed_text(b"{\"type\":\"ping\"}");
        input.extend(length_prefixed_binary(&[0x02, 1, 2, 3]));
        let frames = decode_all(&mut decoder, &input);
        assert_eq!(
            frames,
            vec![
                TcpFrame::Text(Bytes::from_static(b"{\"type\":\"ping\"}")),
                TcpFrame::Binary(Bytes::from_static(&[0x02, 1, 2, 3]))
            ]
        );
    }

    #[test]
    fn length_prefixed_frames_wait_for_all_their_bytes() {
        let mut decoder = TcpDecoder::new(1024);
        decoder.framing = Framing::LengthPrefixed;
        let input = length_prefixed_text(b"{}");
        let mut buf = BytesMut::from(&input[..4]);
        assert_eq!(decoder.decode(&mut buf).expect("ok"), None);
        buf.extend_from_slice(&input[4..]);
        assert_eq!(
            decoder.decode(&mut buf).expect("ok"),
            Some(TcpFrame::Text(Bytes::from_static(b"{}")))
        );
    }

    #[test]
    fn oversized_and_empty_length_prefixed_frames_are_errors() {
        let mut decoder = TcpDecoder::new(16);
        decoder.framing = Framing::LengthPrefixed;
        let mut buf = BytesMut::from(&100u32.to_be_bytes()[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(TcpFrameError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&0u32.to_be_bytes()[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(TcpFrameError::Empty)
        ));
    }
}
