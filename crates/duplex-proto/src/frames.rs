//! JSON text frames: what clients send ([`ClientFrame`]) and what the server sends.
//!
//! Server frames are typed structs serialised once; a publication's `data` is carried as
//! [`RawValue`] so it is never decoded and re-encoded on its way through the server.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::codes::{DisconnectCode, ErrorCode};

/// A frame from a client. Requests carry an `id` and get exactly one `reply` or `error` with it.
///
/// One flat struct rather than an enum: fields borrow from the frame text (`data` stays raw),
/// and a missing field can be reported by name.
#[derive(Debug, Deserialize)]
pub struct ClientFrame<'a> {
    /// `connect`, `subscribe`, `unsubscribe`, `publish`, `rpc`, `ping`, `pong`, `framing`, …
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// The request id, echoed in the answer.
    #[serde(default)]
    pub id: Option<u64>,
    /// The channel of `subscribe`, `unsubscribe` and `publish`.
    #[serde(default, borrow)]
    pub channel: Option<Cow<'a, str>>,
    /// The payload of `publish`: any JSON value but null.
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
    /// The connection token of `connect`.
    #[serde(default)]
    pub token: Option<String>,
    /// Connection metadata of `connect`, such as a display name.
    #[serde(default, borrow)]
    pub meta: Option<&'a RawValue>,
    /// The protocol version a client speaks, in `connect`.
    #[serde(default)]
    pub version: Option<u32>,
    /// `lines` or `length_prefixed`, in `framing` (raw TCP only).
    #[serde(default, borrow)]
    pub mode: Option<Cow<'a, str>>,
    /// Where to resume: `{"offset", "epoch"}` in `subscribe`, an offset in `history`.
    #[serde(default)]
    pub since: Option<Since>,
    /// At most this many publications, in `history`.
    #[serde(default)]
    pub limit: Option<u32>,
    /// The result of a client's `reply` to a server `request`.
    #[serde(default, borrow)]
    pub result: Option<&'a RawValue>,
    /// The code of a client's `error` answer to a server `request`.
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    /// The message of a client's `error` answer to a server `request`.
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
    /// The backend method an `rpc` calls.
    #[serde(default, borrow)]
    pub method: Option<Cow<'a, str>>,
    /// A `publish`'s idempotency key: a retry with the same key in the same channel gets the
    /// first publication's reply instead of publishing again.
    #[serde(default, borrow)]
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// A position in a channel: an offset, with the epoch it belongs to when the client knows it.
///
/// Written as an object `{"offset": 41, "epoch": "5f0e3a12"}` or, in `history`, a bare offset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Since {
    /// `{"offset": …, "epoch": …}`.
    Position {
        /// The last offset the client has.
        offset: u64,
        /// The epoch that offset belongs to.
        #[serde(default)]
        epoch: Option<String>,
    },
    /// A bare offset.
    Offset(u64),
}

impl Since {
    /// The offset.
    pub fn offset(&self) -> u64 {
        match self {
            Since::Position { offset, .. } | Since::Offset(offset) => *offset,
        }
    }

    /// The epoch, when given.
    pub fn epoch(&self) -> Option<&str> {
        match self {
            Since::Position { epoch, .. } => epoch.as_deref(),
            Since::Offset(_) => None,
        }
    }
}

impl<'a> ClientFrame<'a> {
    /// Parses a text frame.
    pub fn parse(text: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(text)
    }
}

/// Limits a server announces in `connected`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// The largest frame the server reads, in bytes.
    pub max_frame: usize,
    /// How many subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// How many frames may wait for a slow reader before its namespace's policy applies.
    pub queue: usize,
    /// Milliseconds without any frame from the client before the server disconnects it.
    pub idle_timeout_ms: u64,
    /// Milliseconds between the server's keepalive pings.
    pub ping_interval_ms: u64,
    /// Publications per second one connection may make.
    pub publish_rate: u32,
    /// Publications that may come at once before the rate applies.
    pub publish_burst: u32,
    /// How many bytes of publications may wait for a slow reader before its namespace's
    /// policy applies (0 from servers that do not say).
    #[serde(default)]
    pub queue_bytes: usize,
}

/// The first frame on every connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename = "connected")]
pub struct Connected<'a> {
    /// The connection's id.
    pub client: Cow<'a, str>,
    /// The server's version.
    pub version: Cow<'a, str>,
    /// The protocol version, [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The connection's limits.
    pub limits: Limits,
    /// True when the server asks its application's backend who may connect: the client sends
    /// `connect` before anything else (absent otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub connect_required: bool,
}

/// The answer to a request that succeeded.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "reply")]
pub struct Reply<T> {
    /// The request's id.
    pub id: u64,
    /// What the request produced.
    pub result: T,
}

/// The answer to a request that failed, or a complaint about a frame that had no id.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "error")]
pub struct ErrorFrame<'a> {
    /// The request's id, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The stable code.
    pub code: ErrorCode,
    /// A sentence for people.
    pub message: Cow<'a, str>,
}

/// The last frame before the server closes a connection.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "disconnect")]
pub struct Disconnect {
    /// The stable code.
    pub code: DisconnectCode,
    /// A sentence for people.
    pub reason: &'static str,
    /// Whether the client should reconnect.
    pub reconnect: bool,
}

impl From<DisconnectCode> for Disconnect {
    fn from(code: DisconnectCode) -> Self {
        Disconnect {
            code,
            reason: code.reason(),
            reconnect: code.reconnect(),
        }
    }
}

/// The answer to `ping`, and the server's keepalive on raw TCP (`{"type":"ping"}`).
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum Keepalive {
    /// The server's answer to a client's ping.
    #[serde(rename = "pong")]
    Pong {
        /// The ping's id, when it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// The server checking that the client is there; answer with `{"type":"pong"}`.
    #[serde(rename = "ping")]
    Ping,
}

/// The result of `subscribe`: where the channel stands now.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Subscribed<'a> {
    /// The channel.
    pub channel: Cow<'a, str>,
    /// The offset of the last publication (0 before the first). With `since`, the publications
    /// `missed` counts, up to this offset, follow the reply.
    pub offset: u64,
    /// The channel's epoch; it changes when the channel's history is lost.
    pub epoch: Cow<'a, str>,
    /// With `since`: whether every publication after it follows the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// With `since`: how many publications follow the reply, before any live one: those after
    /// `since` when recovered; with `recovered: false` and `epoch_changed`, the new epoch's
    /// from its first offset when it keeps them all. Absent: none follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
    /// Why recovery failed: `epoch_changed`, `epoch_required`, `offset_ahead`, `history_trimmed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'a, str>>,
}

/// A request of the server's own: answer with `reply` (`id`, `result`) or `error` (`id`,
/// `code`, `message`).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "request")]
pub struct ServerRequest<'a> {
    /// The id, in the server's id space.
    pub id: u64,
    /// What the server asks.
    pub data: &'a RawValue,
}

/// The server ended a subscription: the connection's new token no longer allows it. The
/// client is not resubscribed; `code` says why (`permission_denied`).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "unsubscribed")]
pub struct Unsubscribed<'a> {
    /// The channel.
    pub channel: Cow<'a, str>,
    /// Why, as an error code.
    pub code: ErrorCode,
}

/// Someone subscribed to a channel with presence on.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "join")]
pub struct Join<'a> {
    /// The channel.
    pub channel: &'a str,
    /// Who joined.
    pub client: &'a str,
    /// Their user, if any.
    pub user: Option<&'a str>,
    /// Their `connect` metadata, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a RawValue>,
}

/// Someone left a channel with presence on (unsubscribed or disconnected).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "leave")]
pub struct Leave<'a> {
    /// The channel.
    pub channel: &'a str,
    /// Who left.
    pub client: &'a str,
    /// Their user, if any.
    pub user: Option<&'a str>,
}

/// One subscriber as presence lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PresenceEntry<'a> {
    /// The connection's id.
    pub client: String,
    /// The user its token named, if any.
    pub user: Option<&'a str>,
    /// The metadata it gave in `connect`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a RawValue>,
}

/// The result of `publish`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published<'a> {
    /// The publication's offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: Cow<'a, str>,
    /// True when this answers a retry: the idempotency key was used before in this channel,
    /// and this is the first publication's offset and epoch (nothing was published again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// The result of `connect`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectResult<'a> {
    /// The connection's id.
    pub client: Cow<'a, str>,
    /// The user the token named, if any.
    pub user: Option<Cow<'a, str>>,
}

/// Serialises a frame to JSON bytes.
pub fn to_json<T: Serialize>(frame: &T) -> Vec<u8> {
    serde_json::to_vec(frame).expect("protocol frames always serialise")
}

/// Appends a `message` frame for a JSON publication to `buf`:
/// `{"type":"message","channel":…,"offset":…,"data":…}`.
pub fn write_message(buf: &mut Vec<u8>, channel: &str, offset: u64, data: &RawValue) {
    #[derive(Serialize)]
    #[serde(tag = "type", rename = "message")]
    struct Message<'a> {
        channel: &'a str,
        offset: u64,
        data: &'a RawValue,
    }
    serde_json::to_writer(
        buf,
        &Message {
            channel,
            offset,
            data,
        },
    )
    .expect("writing to a Vec cannot fail");
}

/// Appends a `message` frame for a binary publication, for text-only readers (raw TCP in line
/// mode): `{"type":"message","channel":…,"offset":…,"binary":"<base64>"}`.
pub fn write_binary_message_as_text(buf: &mut Vec<u8>, channel: &str, offset: u64, payload: &[u8]) {
    use base64::Engine as _;
    #[derive(Serialize)]
    #[serde(tag = "type", rename = "message")]
    struct Message<'a> {
        channel: &'a str,
        offset: u64,
        binary: String,
    }
    serde_json::to_writer(
        buf,
        &Message {
            channel,
            offset,
            binary: base64::engine::general_purpose::STANDARD.encode(payload),
        },
    )
    .expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_borrow_their_data() {
        let text =
            br#"{"type":"publish","id":7,"channel":"chat:lobby","data":{"text":"hi \"you\""}}"#;
        let frame = ClientFrame::parse(text).expect("valid");
        assert_eq!(frame.kind, "publish");
        assert_eq!(frame.id, Some(7));
        assert_eq!(frame.channel.as_deref(), Some("chat:lobby"));
        assert_eq!(
            frame.data.map(RawValue::get),
            Some(r#"{"text":"hi \"you\""}"#)
        );
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let frame = ClientFrame::parse(br#"{"type":"ping","later":true}"#).expect("valid");
        assert_eq!(frame.kind, "ping");
        assert!(ClientFrame::parse(br#"{"id":1}"#).is_err());
        assert!(ClientFrame::parse(br#"{"type":1}"#).is_err());
        assert!(ClientFrame::parse(br#"{"type":"ping","id":-1}"#).is_err());
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let mut buf = Vec::new();
        let data = RawValue::from_string("{\"a\":1}".into()).expect("raw");
        write_message(&mut buf, "chat:lobby", 3, &data);
        assert_eq!(
            String::from_utf8(buf).expect("utf-8"),
            r#"{"type":"message","channel":"chat:lobby","offset":3,"data":{"a":1}}"#
        );
        let error = ErrorFrame {
            id: Some(2),
            code: ErrorCode::NotSubscribed,
            message: "x".into(),
        };
        assert_eq!(
            String::from_utf8(to_json(&error)).expect("utf-8"),
            r#"{"type":"error","id":2,"code":"not_subscribed","message":"x"}"#
        );
        let disconnect = Disconnect::from(DisconnectCode::SlowConsumer);
        assert_eq!(
            String::from_utf8(to_json(&disconnect)).expect("utf-8"),
            r#"{"type":"disconnect","code":"slow_consumer","reason":"the connection fell too far behind","reconnect":true}"#
        );
        assert_eq!(
            to_json(&Keepalive::Pong { id: None }),
            br#"{"type":"pong"}"#.to_vec()
        );
        assert_eq!(
            to_json(&Reply {
                id: 1,
                result: Published {
                    offset: 2,
                    epoch: "e".into(),
                    replayed: false,
                }
            }),
            br#"{"type":"reply","id":1,"result":{"offset":2,"epoch":"e"}}"#.to_vec()
        );
    }
}
