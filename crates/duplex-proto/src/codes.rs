//! The documented error and disconnect codes. Clients match on these strings; they never change
//! meaning, and new ones are only added.

use serde::Serialize;

/// Why a request failed (the `code` of an `error` frame). The connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a JSON object with a string `type`.
    BadFrame,
    /// The `type` is not one this server knows.
    UnknownType,
    /// A request type that needs an `id` came without one.
    MissingId,
    /// A field is missing or has the wrong type.
    BadRequest,
    /// The channel name is not `namespace:name`.
    InvalidChannel,
    /// The namespace's rules forbid this.
    PermissionDenied,
    /// The connection is already subscribed to the channel.
    AlreadySubscribed,
    /// The connection is not subscribed to the channel.
    NotSubscribed,
    /// The connection holds as many subscriptions as it may.
    TooManySubscriptions,
    /// The publication is larger than the namespace allows.
    MessageTooLarge,
    /// The namespace does not take binary publications.
    BinaryNotAllowed,
    /// The protocol version or framing asked for is not supported.
    Unsupported,
    /// The token's signature, algorithm or claims are not valid.
    InvalidToken,
    /// The token has expired.
    TokenExpired,
    /// The connection publishes faster than its rate limit; wait and retry.
    RateLimited,
    /// The server failed; nothing the client can fix.
    Internal,
    /// The broker between nodes cannot be reached; retry later.
    Unavailable,
    /// The token's `nbf` (not before) is still ahead.
    TokenNotYetValid,
    /// The connection already connected (with `connect`, or a token at the WebSocket upgrade):
    /// a connection keeps the identity it started with.
    AlreadyConnected,
    /// The server holds as many channels as it may; retry later.
    TooManyChannels,
    /// The server's `connect` hook is on: a connection sends `connect` (and is allowed) before
    /// anything else.
    NotConnected,
    /// An idempotency key is not 1 to 128 visible ASCII characters.
    InvalidIdempotencyKey,
    /// The idempotency key was used, within its window, for a different publication in this
    /// channel; nothing was published.
    IdempotencyKeyReused,
    /// A publication with this idempotency key is still under way; retry when it answered.
    IdempotencyKeyInUse,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingId => "missing_id",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::BinaryNotAllowed => "binary_not_allowed",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TokenNotYetValid => "token_not_yet_valid",
            ErrorCode::AlreadyConnected => "already_connected",
            ErrorCode::TooManyChannels => "too_many_channels",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::InvalidIdempotencyKey => "invalid_idempotency_key",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::IdempotencyKeyInUse => "idempotency_key_in_use",
        }
    }
}

/// Why the server closed a connection (the `code` of a `disconnect` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectCode {
    /// The server is shutting down; reconnect (to another node).
    Shutdown,
    /// The client did not read fast enough and the namespace's policy is to disconnect.
    SlowConsumer,
    /// Nothing arrived from the client within the idle timeout.
    IdleTimeout,
    /// A frame was larger than the connection's limit.
    FrameTooLarge,
    /// The byte stream could not be read as frames (invalid UTF-8, broken framing).
    ProtocolError,
    /// The client sent too many bad frames in a row.
    TooManyErrors,
    /// The server, or the client's address, holds as many connections as it may.
    TooManyConnections,
    /// The connection's token expired and was not refreshed.
    TokenExpired,
    /// This node lost track of a subscribed channel (its link to the broker broke, or the
    /// broker lost the channel's history): reconnect and resubscribe `since` the last offset to
    /// learn whether anything was missed.
    InsufficientState,
    /// The client took nothing the server wrote for `write_timeout`: it stopped reading. It is
    /// never sent (the client is not reading); it names the disconnect in metrics and logs.
    WriteTimeout,
    /// The server's operator disconnected this connection (`DELETE /api/connections/{id}`).
    Kicked,
    /// The application's backend refused a connection opened with a token (the `connect` hook).
    ConnectRefused,
}

impl DisconnectCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectCode::Shutdown => "shutdown",
            DisconnectCode::SlowConsumer => "slow_consumer",
            DisconnectCode::IdleTimeout => "idle_timeout",
            DisconnectCode::FrameTooLarge => "frame_too_large",
            DisconnectCode::ProtocolError => "protocol_error",
            DisconnectCode::TooManyErrors => "too_many_errors",
            DisconnectCode::TooManyConnections => "too_many_connections",
            DisconnectCode::TokenExpired => "token_expired",
            DisconnectCode::InsufficientState => "insufficient_state",
            DisconnectCode::WriteTimeout => "write_timeout",
            DisconnectCode::Kicked => "kicked",
            DisconnectCode::ConnectRefused => "connect_refused",
        }
    }

    /// Whether a client should reconnect after this.
    pub fn reconnect(self) -> bool {
        match self {
            DisconnectCode::Shutdown
            | DisconnectCode::SlowConsumer
            | DisconnectCode::IdleTimeout
            | DisconnectCode::TooManyConnections
            | DisconnectCode::TokenExpired
            | DisconnectCode::InsufficientState
            | DisconnectCode::WriteTimeout => true,
            DisconnectCode::FrameTooLarge
            | DisconnectCode::ProtocolError
            | DisconnectCode::TooManyErrors
            | DisconnectCode::Kicked
            | DisconnectCode::ConnectRefused => false,
        }
    }

    /// The WebSocket close code that goes with it.
    pub fn websocket_close_code(self) -> u16 {
        match self {
            DisconnectCode::Shutdown => 1001,
            DisconnectCode::FrameTooLarge => 1009,
            DisconnectCode::ProtocolError => 1007,
            DisconnectCode::SlowConsumer => 4001,
            DisconnectCode::IdleTimeout => 4002,
            DisconnectCode::TooManyErrors => 4003,
            DisconnectCode::TooManyConnections => 1013,
            DisconnectCode::TokenExpired => 4004,
            DisconnectCode::InsufficientState => 4005,
            DisconnectCode::WriteTimeout => 4006,
            DisconnectCode::Kicked => 4007,
            DisconnectCode::ConnectRefused => 4008,
        }
    }

    /// A sentence for people.
    pub fn reason(self) -> &'static str {
        match self {
            DisconnectCode::Shutdown => "the server is shutting down",
            DisconnectCode::SlowConsumer => "the connection fell too far behind",
            DisconnectCode::IdleTimeout => "nothing was received within the idle timeout",
            DisconnectCode::FrameTooLarge => "a frame exceeded the size limit",
            DisconnectCode::ProtocolError => "the stream could not be read as frames",
            DisconnectCode::TooManyErrors => "too many bad frames",
            DisconnectCode::TooManyConnections => "too many connections; try again later",
            DisconnectCode::TokenExpired => "the token expired; reconnect with a fresh one",
            DisconnectCode::InsufficientState => {
                "this node lost track of a channel; reconnect and resubscribe since your last offset"
            }
            DisconnectCode::WriteTimeout => "the client took nothing the server wrote in time",
            DisconnectCode::Kicked => "the server's operator disconnected this connection",
            DisconnectCode::ConnectRefused => "the application's backend refused the connection",
        }
    }
}
