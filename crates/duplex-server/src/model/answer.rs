//! What a client answers when the server asks it something, and why it may not.

use serde_json::value::RawValue;

/// What a client answered to a server request.
#[derive(Debug)]
pub enum ClientAnswer {
    /// `{"type":"reply","id":…,"result":…}`.
    Result(Box<RawValue>),
    /// `{"type":"error","id":…,"code":…,"message":…}`.
    Error {
        /// The client's code.
        code: String,
        /// The client's message.
        message: String,
    },
}

/// Why a server request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such connection on this node.
    #[error("no connection with this id is connected here")]
    NotConnected,
    /// The client has too many unanswered requests.
    #[error("the connection has too many unanswered requests")]
    TooManyPending,
    /// No answer within the timeout.
    #[error("the client did not answer in time")]
    Timeout,
    /// The connection closed before answering.
    #[error("the connection closed before answering")]
    Closed,
    /// The broker that reaches other nodes is down.
    #[error("the broker between nodes is unavailable")]
    BrokerUnavailable,
}

/// One connection's answer to a user-wide request: its id and what it answered.
pub type UserAnswer = (String, Result<ClientAnswer, RequestError>);
