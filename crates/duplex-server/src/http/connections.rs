//! The connections side of the server API: list connections, and ask a connected client
//! something, returning its answer as the HTTP response.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::error::ApiError;
use super::{AppState, JSON};
use crate::hub::ConnectionId;
use crate::hub::connection::{ClientAnswer, ConnectionHandle, RequestError};
use crate::units::parse_duration;

/// How long a server request waits when the caller names no `timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `timeout` a caller may name.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/connections", get(list_connections))
        .route(
            "/api/connections/{id}",
            axum::routing::delete(disconnect_connection),
        )
        .route("/api/connections/{id}/request", post(request_connection))
        .route("/api/users/{user}/request", post(request_user))
        .route("/api/nodes", get(list_nodes))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ConnectionItem {
    client: String,
    transport: &'static str,
    user: Option<String>,
    remote: Option<String>,
    subscriptions: Vec<String>,
    connected: String,
    /// Publications waiting in its outgoing queue.
    queued: usize,
    /// Bytes waiting in its outgoing queue (publications and control frames).
    queued_bytes: usize,
}

impl From<&ConnectionHandle> for ConnectionItem {
    fn from(c: &ConnectionHandle) -> Self {
        ConnectionItem {
            client: c.id.to_string(),
            transport: c.transport,
            user: c.user().map(|u| u.to_string()),
            remote: c.remote.map(|r| r.to_string()),
            subscriptions: c.subscriptions(),
            connected: c.connected_at(),
            queued: c.queue.queued_publications(),
            queued_bytes: c.queue.queued_bytes(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ConnectionList {
    items: Vec<ConnectionItem>,
    next: Option<String>,
}

/// Disconnects a connection of this node: it gets `disconnect` with `kicked` (do not
/// reconnect) and is closed.
#[utoipa::path(delete, path = "/api/connections/{id}", tag = "connections",
    params(("id" = String, Path, description = "16 hex digits")),
    responses(
        (status = 204, description = "Disconnected"),
        (status = 404, description = "Not connected to this node", body = super::error::Problem)))]
pub(crate) async fn disconnect_connection(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::http::StatusCode, ApiError> {
    let Path(id) = path?;
    let connection = parse_connection_id(&id)
        .and_then(|id| state.hub.connection(id))
        .ok_or_else(|| ApiError::NotFound("no connection with this id on this node".into()))?;
    connection.queue.close(duplex_proto::DisconnectCode::Kicked);
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn parse_connection_id(text: &str) -> Option<ConnectionId> {
    (text.len() == 16)
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
        .map(ConnectionId)
}

/// Connections on this node, by id, `limit` (1 to 1000, default 100) at a time.
#[utoipa::path(get, path = "/api/connections", tag = "connections",
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses(
        (status = 200, description = "`{items, next}`", body = ConnectionList),
        (status = 400, description = "Bad parameter", body = super::error::Problem)))]
pub(crate) async fn list_connections(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<ConnectionList>, ApiError> {
    let query = super::parse_page_query(query.as_deref(), false)?;
    let after = match &query.cursor {
        Some(cursor) => Some(parse_connection_id(cursor).ok_or_else(super::foreign_cursor)?),
        None => None,
    };
    let limit = query.limit;
    let mut page = state.hub.connections_page(after, limit + 1);
    let next = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|c| c.id.to_string()).unwrap_or_default()
    });
    Ok(axum::Json(ConnectionList {
        items: page.iter().map(|c| ConnectionItem::from(&**c)).collect(),
        next,
    }))
}

fn request_timeout(query: Option<&str>) -> Result<Duration, ApiError> {
    let mut timeout = DEFAULT_REQUEST_TIMEOUT;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "timeout" => {
                timeout = parse_duration(&value)
                    .filter(|t| !t.is_zero() && *t <= MAX_REQUEST_TIMEOUT)
                    .ok_or_else(|| {
                        ApiError::InvalidQuery(format!(
                            "timeout must be a duration such as 500ms or 5s, at most 60s, not {value:?}"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {other:?}: expected timeout"
                )));
            }
        }
    }
    Ok(timeout)
}

fn request_data(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Box<RawValue>, ApiError> {
    super::check_media_type(headers, &[JSON])?;
    let body = super::body_bytes(state, body)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// Sends the body to a connected client as a `request` frame and answers with its reply:
/// 200 with the client's result, 502 with its error, 504 when it does not answer in time.
#[utoipa::path(post, path = "/api/connections/{id}/request", tag = "connections",
    params(("id" = String, Path, description = "the connection's client id"),
        ("timeout" = Option<String>, Query, description = "500ms, 5s…; default 5s, at most 60s")),
    request_body(content = Object, content_type = "application/json"),
    responses(
        (status = 200, description = "The client's result", body = Object),
        (status = 404, description = "Not connected here", body = super::error::Problem),
        (status = 502, description = "The client answered with an error", body = super::error::Problem),
        (status = 504, description = "No answer in time", body = super::error::Problem)))]
pub(crate) async fn request_connection(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = path?;
    let timeout = request_timeout(query.as_deref())?;
    let data = request_data(&state, &headers, body)?;
    let not_connected = || ApiError::NotFound("no connection with this id is connected".into());
    let id = parse_connection_id(&id).ok_or_else(not_connected)?;
    // A connection of another node is asked through the broker.
    let answer = match (state.hub.connection(id), state.hub.broker()) {
        (Some(connection), _) => connection.request(&data, timeout).await,
        (None, Some(broker)) => broker.request(id, &data, timeout).await,
        (None, None) => return Err(not_connected()),
    };
    match answer {
        Ok(ClientAnswer::Result(result)) => {
            Ok(([(header::CONTENT_TYPE, JSON)], result.get().to_owned()).into_response())
        }
        Ok(ClientAnswer::Error { code, message }) => Err(ApiError::ClientError { code, message }),
        Err(error) => Err(request_error(error, timeout)),
    }
}

fn request_error(error: RequestError, timeout: Duration) -> ApiError {
    match error {
        RequestError::Timeout => ApiError::ClientTimeout(timeout),
        RequestError::NotConnected | RequestError::Closed => ApiError::NotFound(error.to_string()),
        RequestError::TooManyPending => ApiError::Unavailable,
        RequestError::BrokerUnavailable => ApiError::BrokerUnavailable(error.to_string()),
    }
}

/// Asks every connection of a user at once (on every node, with a broker) and returns every
/// answer:
/// `{"replies": [{"client", "result"} | {"client", "error": {code, message}}]}`.
#[utoipa::path(post, path = "/api/users/{user}/request", tag = "connections",
    params(("user" = String, Path), ("timeout" = Option<String>, Query)),
    request_body(content = Object, content_type = "application/json"),
    responses(
        (status = 200, description = "Every connection's answer", body = Object),
        (status = 404, description = "The user has no connection", body = super::error::Problem)))]
pub(crate) async fn request_user(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Path(user) = path?;
    let timeout = request_timeout(query.as_deref())?;
    let data: Arc<RawValue> = Arc::from(request_data(&state, &headers, body)?);
    let connections = state.hub.connections_of_user(&user);
    let asks = connections.into_iter().map(|connection| {
        let data = data.clone();
        async move {
            let answer = connection.request(&data, timeout).await;
            (connection.id.to_string(), answer)
        }
    });
    // With a broker, the other nodes' connections of the user are asked at the same time.
    let elsewhere = async {
        match state.hub.broker() {
            Some(broker) => broker.request_user(&user, &data, timeout).await,
            None => Ok(Vec::new()),
        }
    };
    let (mut answers, elsewhere) = tokio::join!(futures_util::future::join_all(asks), elsewhere);
    answers.extend(elsewhere.map_err(|e| ApiError::BrokerUnavailable(e.to_string()))?);
    if answers.is_empty() {
        return Err(ApiError::NotFound("this user has no connection".into()));
    }
    let replies: Vec<serde_json::Value> = answers
        .into_iter()
        .map(|(client, answer)| match answer {
            Ok(ClientAnswer::Result(result)) => {
                serde_json::json!({"client": client, "result": result})
            }
            Ok(ClientAnswer::Error { code, message }) => serde_json::json!(
                {"client": client, "error": {"code": code, "message": message}}
            ),
            Err(error) => {
                let (status, code) = request_error(error, timeout).status_and_code();
                serde_json::json!({"client": client, "error": {"code": code, "message": error.to_string(), "status": status.as_u16()}})
            }
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "replies": replies })))
}

/// The live nodes: this one alone with the in-process broker; with Redis, every node whose
/// heartbeat is fresher than `presence_ttl`.
#[utoipa::path(get, path = "/api/nodes", tag = "connections",
    responses(
        (status = 200, description = "`{items: [{id, http, tcp, connections, version, started_at}]}`", body = Object),
        (status = 503, description = "The broker is unreachable", body = super::error::Problem)))]
pub(crate) async fn list_nodes(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let nodes = state.hub.nodes().await?;
    Ok(axum::Json(serde_json::json!({ "items": nodes })))
}
