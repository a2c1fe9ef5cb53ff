//! The one error type of the client.

use serde::Deserialize;

/// An RFC 9457 problem the server answered with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Problem {
    /// The HTTP status.
    #[serde(default)]
    pub status: u16,
    /// The stable code, such as `not_found` or `precondition_failed`.
    #[serde(default)]
    pub code: String,
    /// A short summary of the status.
    #[serde(default)]
    pub title: String,
    /// What went wrong, for people.
    #[serde(default)]
    pub detail: String,
}

/// Everything that can go wrong talking to a duplex server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered an HTTP request with an error.
    #[error("{} {}: {}", .0.status, .0.code, .0.detail)]
    Api(Problem),
    /// The server answered a socket request with an `error` frame.
    #[error("{code}: {message}")]
    Refused {
        /// The protocol's error code, such as `permission_denied`.
        code: String,
        /// What went wrong, for people.
        message: String,
    },
    /// The server could not be reached (refused, unknown host, TLS handshake failed).
    #[error("cannot reach the server: {0}")]
    Unreachable(String),
    /// An HTTP exchange broke off.
    #[error("HTTP: {0}")]
    Http(String),
    /// The socket could not be opened or broke.
    #[error("socket: {0}")]
    Socket(String),
    /// The connection was lost before the answer came; the request may or may not have run.
    #[error("the connection was lost before the server answered")]
    ConnectionLost,
    /// The connection is closed for good (closed by you, or the server said not to reconnect).
    #[error("the connection is closed{}", .0.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Closed(Option<String>),
    /// The server said something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A URL is not one this client can use.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
    /// A request took longer than allowed.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl Error {
    /// The stable code of a server refusal (HTTP problem or socket `error`), if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api(problem) => Some(&problem.code),
            Error::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}
