//! The duplex wire protocol, shared by the server and the clients. No I/O here.
//!
//! Text frames are JSON objects with a `type` ([`frames`]); binary publications travel in binary
//! frames whose layout [`binary`] defines; raw TCP wraps both in lines or length-prefixed frames
//! ([`tcp`]). Errors and disconnects carry the stable codes of [`codes`]. `docs/protocol.md` is
//! the human-readable version of this crate.

pub mod binary;
pub mod codes;
pub mod frames;
pub mod tcp;

pub use codes::{DisconnectCode, ErrorCode};

/// The protocol version this crate speaks; `connected` announces it. Version 2 added the
/// `unsubscribed` push, the `already_connected`, `token_not_yet_valid` and `too_many_channels`
/// codes and `limits.queue_bytes`: additions a version 1 client can ignore. Version 3 added the
/// `rpc` request, the `not_connected` code, the `connect_refused` disconnect and the codes of the
/// application's backend (any `[a-z0-9_.-]` code in an `error` when hooks are on).
pub const PROTOCOL_VERSION: u32 = 3;

/// The oldest protocol version a server still serves (`connect` with `version` below it is
/// refused).
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;

/// Whether `name` is a valid channel name: `namespace:name`, where the namespace is
/// `[a-z0-9_-]{1,32}` and the name 1 to 128 of `[A-Za-z0-9_\-.:@/=]`.
pub fn is_valid_channel(name: &str) -> bool {
    let Some((namespace, rest)) = name.split_once(':') else {
        return false;
    };
    is_valid_namespace(namespace)
        && !rest.is_empty()
        && rest.len() <= 128
        && rest.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/' | b'=')
        })
}

/// Whether `name` is a valid namespace: `[a-z0-9_-]{1,32}`.
pub fn is_valid_namespace(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_namespace_colon_name() {
        assert!(is_valid_channel("chat:lobby"));
        assert!(is_valid_channel("records:posts"));
        assert!(is_valid_channel("game:arena:42"));
        assert!(is_valid_channel("user:ana@example.com"));
        assert!(!is_valid_channel("lobby"));
        assert!(!is_valid_channel(":lobby"));
        assert!(!is_valid_channel("chat:"));
        assert!(!is_valid_channel("Chat:lobby"));
        assert!(!is_valid_channel("chat:lob by"));
        assert!(!is_valid_channel(&format!("chat:{}", "x".repeat(129))));
    }
}
