//! The one place HTTP statuses for errors are chosen.
//!
//! Every error is an RFC 9457 `application/problem+json` body with a stable `code` (also the last
//! part of `type`), which is what clients should match on. Details of server-side failures (5xx)
//! are logged, never sent.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON.
    #[error("the body is not valid JSON: {0}")]
    BadJson(String),
    /// A query parameter is malformed or out of range.
    #[error("{0}")]
    InvalidQuery(String),
    /// The collection name breaks the naming rule.
    #[error("collection names are 1 to 64 of a-z, 0-9, '_' and '-'")]
    InvalidCollection,
    /// The record id breaks the naming rule.
    #[error("record ids are 1 to 64 of A-Z, a-z, 0-9, '_' and '-'")]
    InvalidId,
    /// A path segment is not valid percent-encoded UTF-8.
    #[error("the path is malformed: {0}")]
    InvalidPath(String),
    /// A header is malformed.
    #[error("{0}")]
    InvalidHeader(String),
    /// Nothing is at this path.
    #[error("{0}")]
    NotFound(String),
    /// The path exists but not for this method.
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    /// A concurrent write claimed the same record id.
    #[error("a record with this id already exists")]
    Conflict,
    /// `If-Match` / `If-None-Match` did not hold.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The body is larger than the configured limit.
    #[error("the body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body's media type is not one this endpoint reads.
    #[error("expected Content-Type {expected}")]
    UnsupportedMediaType {
        /// What the endpoint reads.
        expected: &'static str,
    },
    /// The body is valid JSON but not an acceptable value.
    #[error("{0}")]
    Validation(String),
    /// The channel name is not `namespace:name`.
    #[error("channel names are namespace:name")]
    InvalidChannel,
    /// The namespace does not take binary publications.
    #[error("this namespace does not take binary publications")]
    BinaryNotAllowed,
    /// The namespace keeps no presence.
    #[error("presence is off in this namespace")]
    PresenceDisabled,
    /// A connection token was refused.
    #[error("{0}")]
    Token(crate::auth::TokenError),
    /// The server API needs an API key and none was given.
    #[error("this endpoint needs Authorization: Bearer API_KEY")]
    Unauthorized,
    /// The credentials do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// The request body did not arrive within `body_read_timeout`.
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// The request body broke off or could not be read.
    #[error("{0}")]
    BadBody(String),
    /// A client did not answer the server's request in time.
    #[error("the client did not answer within {0:?}")]
    ClientTimeout(std::time::Duration),
    /// A client answered the server's request with an error.
    #[error("the client answered with an error: {code}: {message}")]
    ClientError {
        /// The client's code.
        code: String,
        /// The client's message.
        message: String,
    },
    /// A connection limit refused a socket or event stream.
    #[error("{0}; try again later")]
    TooManyConnections(String),
    /// The server holds as many channels as it may.
    #[error("the server holds as many channels as it may ({0}); try again later")]
    TooManyChannels(usize),
    /// `GET /ws` without a WebSocket upgrade.
    #[error("this endpoint speaks WebSocket: {0}")]
    UpgradeRequired(String),
    /// The store is not reachable right now.
    #[error("the store is unavailable")]
    Unavailable,
    /// The broker between nodes is not reachable right now.
    #[error("{0}")]
    BrokerUnavailable(String),
    /// An idempotency key was refused (malformed, used for other data, or under way).
    #[error("{0}")]
    Idempotency(crate::hub::HubError),
    /// Something failed on the server; the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status and the stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadJson(_) => (StatusCode::BAD_REQUEST, "bad_json"),
            ApiError::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            ApiError::InvalidCollection => (StatusCode::BAD_REQUEST, "invalid_collection"),
            ApiError::InvalidId => (StatusCode::BAD_REQUEST, "invalid_id"),
            ApiError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            ApiError::InvalidHeader(_) => (StatusCode::BAD_REQUEST, "invalid_header"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict => (StatusCode::CONFLICT, "conflict"),
            ApiError::PreconditionFailed(_) => {
                (StatusCode::PRECONDITION_FAILED, "precondition_failed")
            }
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UnsupportedMediaType { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            ApiError::InvalidChannel => (StatusCode::BAD_REQUEST, "invalid_channel"),
            ApiError::BinaryNotAllowed => (StatusCode::UNPROCESSABLE_ENTITY, "binary_not_allowed"),
            ApiError::PresenceDisabled => (StatusCode::FORBIDDEN, "presence_disabled"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Token(error) => (StatusCode::UNAUTHORIZED, error.code().as_str()),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::ClientTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_body"),
            ApiError::ClientError { .. } => (StatusCode::BAD_GATEWAY, "client_error"),
            ApiError::UpgradeRequired(_) => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            ApiError::Unavailable | ApiError::BrokerUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::TooManyConnections(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections")
            }
            ApiError::TooManyChannels(_) => (StatusCode::SERVICE_UNAVAILABLE, "too_many_channels"),
            ApiError::Idempotency(error) => {
                let status = match error {
                    crate::hub::HubError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
                    crate::hub::HubError::IdempotencyKeyInUse => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_REQUEST,
                };
                (status, error.code().as_str())
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// A 404 for a record.
    pub fn record_not_found() -> Self {
        ApiError::NotFound("no record with this id in this collection".into())
    }

    /// Whether the server itself failed (as opposed to a client, a limit or a client asked by
    /// the server): only these are worth an ERROR in the log.
    fn is_server_fault(&self) -> bool {
        matches!(
            self,
            ApiError::Internal(_) | ApiError::Unavailable | ApiError::BrokerUnavailable(_)
        )
    }
}

/// The longest detail the log repeats of a client-caused error.
const LOGGED_DETAIL: usize = 200;

/// `text` cut to at most `LOGGED_DETAIL` bytes, on a character boundary.
fn truncated(text: &str) -> &str {
    if text.len() <= LOGGED_DETAIL {
        return text;
    }
    let mut end = LOGGED_DETAIL;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The RFC 9457 body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:duplex:problem:{code}`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the status.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong in this case.
    pub detail: String,
    /// The stable code to match on.
    pub code: String,
    /// With `client_error`: what the client answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_error: Option<serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // Logged once, here (the trace layer does not log failures again). What a client
        // caused is a debug line with its text cut short; the server's own failures are errors.
        if self.is_server_fault() {
            tracing::error!(error = %self, detail = ?self, code, "request failed");
        } else {
            tracing::debug!(
                error = truncated(&self.to_string()),
                code,
                "request refused"
            );
        }
        let client_error = match &self {
            ApiError::ClientError { code, message } => {
                Some(serde_json::json!({"code": code, "message": message}))
            }
            _ => None,
        };
        let problem = Problem {
            kind: format!("urn:duplex:problem:{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: code.to_owned(),
            client_error,
        };
        let body = serde_json::to_vec(&problem).expect("a problem always serialises");
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::record_not_found(),
            StoreError::PreconditionFailed { current: Some(v) } => {
                ApiError::PreconditionFailed(format!("the record is at version {v} (ETag \"{v}\")"))
            }
            StoreError::PreconditionFailed { current: None } => {
                ApiError::PreconditionFailed("the record does not exist".into())
            }
            StoreError::Conflict => ApiError::Conflict,
            StoreError::NotAnObject => {
                ApiError::Validation("the patched record must remain a JSON object".into())
            }
            StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
            | StoreError::Unavailable(_) => ApiError::Unavailable,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::hub::HubError> for ApiError {
    fn from(error: crate::hub::HubError) -> Self {
        use crate::hub::HubError;
        match error {
            HubError::InvalidChannel => ApiError::InvalidChannel,
            HubError::BinaryNotAllowed => ApiError::BinaryNotAllowed,
            HubError::MessageTooLarge { limit } => ApiError::PayloadTooLarge { limit },
            HubError::PresenceDisabled => ApiError::PresenceDisabled,
            HubError::PermissionDenied(why) => ApiError::Forbidden(why.into()),
            HubError::Unavailable(why) => ApiError::BrokerUnavailable(why),
            HubError::TooManyChannels { limit } => ApiError::TooManyChannels(limit),
            HubError::NullData => ApiError::Validation(error.to_string()),
            HubError::InvalidIdempotencyKey
            | HubError::IdempotencyKeyReused
            | HubError::IdempotencyKeyInUse => ApiError::Idempotency(error),
            HubError::AlreadySubscribed | HubError::NotSubscribed => {
                ApiError::Internal(error.to_string())
            }
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::InvalidPath(rejection.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            // The limit itself is filled in by the caller, which knows the configuration.
            ApiError::PayloadTooLarge { limit: 0 }
        } else {
            ApiError::BadJson(rejection.body_text())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_documented_statuses() {
        let cases = [
            (StoreError::NotFound, 404, "not_found"),
            (
                StoreError::PreconditionFailed { current: Some(2) },
                412,
                "precondition_failed",
            ),
            (StoreError::Conflict, 409, "conflict"),
            (StoreError::NotAnObject, 422, "validation_failed"),
            (
                StoreError::Database(sqlx::Error::PoolTimedOut),
                503,
                "unavailable",
            ),
            (StoreError::Corrupt("x".into()), 500, "internal"),
        ];
        for (error, status, code) in cases {
            let (s, c) = ApiError::from(error).status_and_code();
            assert_eq!((s.as_u16(), c), (status, code));
        }
    }

    #[test]
    fn only_the_servers_own_failures_are_errors_and_client_text_is_cut_short() {
        assert!(ApiError::Internal("x".into()).is_server_fault());
        assert!(!ApiError::ClientTimeout(std::time::Duration::from_secs(1)).is_server_fault());
        assert!(
            !ApiError::ClientError {
                code: "x".into(),
                message: "y".into()
            }
            .is_server_fault()
        );
        assert!(!ApiError::TooManyConnections("x".into()).is_server_fault());
        let long = "é".repeat(300);
        let cut = truncated(&long);
        assert!(cut.len() <= LOGGED_DETAIL && long.starts_with(cut));
    }
}
