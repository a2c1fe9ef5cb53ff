//! `GET /ws`: checks the origin and the token of a browser's or a client's request, takes a place
//! under the connection limits, and upgrades it to a WebSocket that [`crate::socket`] serves.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;

use super::{ApiError, AppState};
use crate::socket::ws::{MAX_WRITE_BUFFER, READ_BUFFER, WRITE_FLUSH_THRESHOLD, serve};

/// Upgrades `GET /ws` to a WebSocket connection.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    super::check_origin(&state, &headers)?;
    // Browsers cannot set headers on a WebSocket: a token may come as `?token=`.
    let token = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned());
    let auth = match token {
        Some(token) => Some(super::verify_token(&state, &token)?),
        None => None,
    };
    let upgrade = upgrade.map_err(|rejection| ApiError::UpgradeRequired(rejection.body_text()))?;
    let context = state.sockets.clone();
    let slot = context.slots.acquire(Some(remote.ip())).map_err(|limit| {
        context.metrics.connection_refusals.inc();
        ApiError::TooManyConnections(limit.to_string())
    })?;
    let upgrade_context = context
        .hooks
        .as_ref()
        .filter(|hooks| hooks.on(crate::hooks::Hook::Connect))
        .and_then(|hooks| crate::hooks::upgrade_context(hooks.settings(), &headers));
    let max_frame = context.limits.max_frame;
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_FLUSH_THRESHOLD)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| {
            let tracker = context.tracker.clone();
            tracker.track_future(serve(socket, remote, context, slot, auth, upgrade_context))
        }))
}
