//! The servers a fan-out run can measure: duplex, or one of its peers — Node `ws` and
//! Socket.IO, small fan-out servers kept in `bench/peers/` and started as child processes
//! (`scripts/install-peers.sh` installs them) — and what each one's clients say on the wire.
//!
//! The load client is the same for every server; only these few frames differ:
//! - duplex: `subscribe` with a reply, `publish` frames, server-assigned offsets;
//! - `ws`: no handshake past the upgrade; the publisher's text frames, numbered by the
//!   publisher, are broadcast to every other client as they are;
//! - Socket.IO 4 (Engine.IO 4 over a WebSocket from the start, Socket.IO protocol 5): the open
//!   packet `0{…}`, `40` to join the main namespace, `421["subscribe",room]` answered by the ack
//!   `431[]`, `42["publish",room,data]` out and `42["message",data]` in, and `3` for every
//!   server ping `2`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Which server a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// duplex itself.
    Duplex,
    /// Node `ws` (`bench/peers/ws.mjs`).
    Ws,
    /// Socket.IO (`bench/peers/socketio.mjs`).
    SocketIo,
}

impl Protocol {
    /// The WebSocket path clients connect to.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Protocol::Duplex => "/ws",
            Protocol::Ws => "/",
            Protocol::SocketIo => "/socket.io/?EIO=4&transport=websocket",
        }
    }

    /// The peer server's script in `bench/peers/`; `None` for duplex.
    fn script(self) -> Option<&'static str> {
        match self {
            Protocol::Duplex => None,
            Protocol::Ws => Some("ws.mjs"),
            Protocol::SocketIo => Some("socketio.mjs"),
        }
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Duplex => "duplex",
            Protocol::Ws => "ws",
            Protocol::SocketIo => "socket.io",
        }
    }

    /// The text of publication `number` (from 1), due at `due_micros`, padded with `padding`.
    pub(crate) fn publication(
        self,
        out: &mut String,
        channel: &str,
        number: u64,
        due_micros: u64,
        padding: &str,
    ) {
        use std::fmt::Write as _;
        let _ = match self {
            // duplex numbers publications itself (the offset subscribers check).
            Protocol::Duplex => write!(
                out,
                r#"{{"type":"publish","id":{number},"channel":"{channel}","data":{{"t":{due_micros},"p":"{padding}"}}}}"#
            ),
            Protocol::Ws => write!(
                out,
                r#"{{"offset":{number},"t":{due_micros},"p":"{padding}"}}"#
            ),
            Protocol::SocketIo => write!(
                out,
                r#"42["publish","{channel}",{{"offset":{number},"t":{due_micros},"p":"{padding}"}}]"#
            ),
        };
    }

    /// Whether a text frame from the server is a Socket.IO ping, to be answered with `3`.
    pub(crate) fn is_ping(self, text: &[u8]) -> bool {
        self == Protocol::SocketIo && text == b"2"
    }
}

/// Where the peer servers are: `DUPLEX_PEERS_DIR`, else `bench/peers` of the source tree this
/// binary was built from.
pub fn peers_dir() -> PathBuf {
    std::env::var_os("DUPLEX_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/peers"))
}

/// The command that starts `protocol`'s peer server on a free loopback port, or why it cannot.
pub(crate) fn peer_command(
    protocol: Protocol,
    dir: &Path,
) -> anyhow::Result<std::process::Command> {
    let script = protocol
        .script()
        .context("duplex is not a peer: start it with `ServerProcess::start`")?;
    if !dir.join("node_modules").is_dir() {
        bail!(
            "the peer servers are not installed in {}: run scripts/install-peers.sh",
            dir.display()
        );
    }
    let mut command = std::process::Command::new("node");
    command
        .current_dir(dir)
        .args([script, "--port", "0"])
        .env("NODE_ENV", "production");
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_is_not_installed_says_how_to_install_it() {
        let empty = tempfile::tempdir().expect("tempdir");
        let error = peer_command(Protocol::Ws, empty.path()).expect_err("not installed");
        assert!(
            error.to_string().contains("scripts/install-peers.sh"),
            "{error}"
        );
        assert!(peer_command(Protocol::Duplex, empty.path()).is_err());
    }

    #[test]
    fn each_protocol_numbers_its_publications_where_the_client_reads_them() {
        for protocol in [Protocol::Duplex, Protocol::Ws, Protocol::SocketIo] {
            let mut text = String::new();
            protocol.publication(&mut text, "bench:x", 7, 1_700_000_000_000_001, "pp");
            assert!(text.contains(r#""t":1700000000000001"#), "{text}");
            // duplex assigns the offset itself; the peers carry the publisher's number.
            assert_eq!(
                text.contains(r#""offset":7"#),
                protocol != Protocol::Duplex,
                "{text}"
            );
        }
        assert!(Protocol::SocketIo.is_ping(b"2") && !Protocol::Ws.is_ping(b"2"));
    }
}
