//! The little of RFC 6455 a load client needs, by hand: the upgrade request, masked client
//! frames, and reading unmasked server frames in place.
//!
//! A load client built on a full WebSocket library (allocating a message per frame, checking
//! UTF-8, one task wake-up per frame) costs about as much CPU per delivery as the server it
//! measures, and on a shared machine its cost shows up as the server's latency. This one reads
//! whatever the socket holds into one buffer and walks the frames in it; the server itself
//! still uses a maintained WebSocket crate.

use anyhow::{Context as _, bail};

/// Opcodes this client handles.
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// The upgrade request for `path` on `host` (a fixed key: the server's accept value is not
/// checked, only its 101).
pub(crate) fn upgrade_request(host: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Once `buf` holds the whole response head: how many bytes it takes (the rest are frames).
/// `Ok(None)` while the head is incomplete.
pub(crate) fn upgrade_response(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            bail!("the upgrade response head is over 16 KiB");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("the upgrade response is not UTF-8")?;
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        bail!("the server refused the upgrade: {status}");
    }
    Ok(Some(end + 4))
}

/// Appends one masked client frame (FIN set) to `out`.
pub(crate) fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    // Any key is valid; a fixed one keeps the client cheap (the server unmasks either way).
    const KEY: [u8; 4] = [0x3a, 0x91, 0x5c, 0x07];
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&KEY);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
}

/// One server frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (0 for a continuation).
    pub opcode: u8,
    /// Where the payload lies in the buffer.
    pub payload: std::ops::Range<usize>,
}

/// Parses the frame at the start of `buf`; `Ok(None)` when it is not all there yet.
pub(crate) fn server_frame(buf: &[u8]) -> anyhow::Result<Option<Frame>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 != 0 {
        bail!("the server sent a masked frame");
    }
    let (len, header) = match buf[1] & 0x7F {
        126 if buf.len() < 4 => return Ok(None),
        126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("eight bytes")),
            10,
        ),
        len => (u64::from(len), 2),
    };
    let len = usize::try_from(len).context("frame longer than memory")?;
    if buf.len() < header + len {
        return Ok(None);
    }
    Ok(Some(Frame {
        fin: buf[0] & 0x80 != 0,
        opcode: buf[0] & 0x0F,
        payload: header..header + len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_are_masked_and_sized() {
        let mut out = Vec::new();
        client_frame(&mut out, OP_TEXT, b"hi");
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x82);
        let key = &out[2..6];
        assert_eq!([out[6] ^ key[0], out[7] ^ key[1]], *b"hi");
        out.clear();
        client_frame(&mut out, 0x2, &[7; 300]);
        assert_eq!(&out[..4], &[0x82, 0x80 | 126, 1, 44]);
        assert_eq!(out.len(), 4 + 4 + 300);
    }

    #[test]
    fn server_frames_are_read_in_place_and_waited_for_when_partial() {
        let mut buf = vec![0x81, 3, b'a', b'b', b'c', 0x89, 0];
        let frame = server_frame(&buf).expect("valid").expect("whole");
        assert_eq!(frame.opcode, OP_TEXT);
        assert!(frame.fin);
        assert_eq!(&buf[frame.payload.clone()], b"abc");
        let ping = server_frame(&buf[frame.payload.end..]).expect("valid");
        assert_eq!(ping.map(|f| f.opcode), Some(OP_PING));
        assert_eq!(server_frame(&buf[..4]).expect("valid"), None);
        buf = vec![0x82, 126, 1, 0];
        assert_eq!(
            server_frame(&buf).expect("valid"),
            None,
            "256 bytes announced"
        );
        buf.extend([0; 256]);
        assert_eq!(
            server_frame(&buf).expect("valid").map(|f| f.payload),
            Some(4..260)
        );
        assert!(server_frame(&[0x81, 0x80]).is_err(), "masked server frame");
    }

    #[test]
    fn the_upgrade_response_is_read_to_its_blank_line() {
        let response = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x01x";
        assert_eq!(upgrade_response(&response[..20]).expect("partial"), None);
        assert_eq!(
            upgrade_response(response).expect("valid"),
            Some(response.len() - 3)
        );
        assert!(upgrade_response(b"HTTP/1.1 400 Bad Request\r\n\r\n").is_err());
    }
}
