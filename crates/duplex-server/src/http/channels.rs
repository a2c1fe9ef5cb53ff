//! The channels side of the server API: publish from a backend, read history and presence,
//! list channels.

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
use crate::hub::idempotency::IdempotencyKey;
use crate::hub::namespace::Caller;
use crate::hub::publication::Payload;
use crate::socket::{history_json, presence_json};

const OCTET_STREAM: &str = "application/octet-stream";

/// The channel route that publishes (scope `channels:publish`).
pub(crate) fn publish_router() -> Router<AppState> {
    Router::new().route("/api/channels/{channel}/publish", post(publish))
}

/// The channel routes that read (scope `channels:read`).
pub(crate) fn read_router() -> Router<AppState> {
    Router::new()
        .route("/api/channels", get(list_channels))
        .route("/api/channels/{channel}", get(channel_info))
        .route("/api/channels/{channel}/history", get(history))
        .route("/api/channels/{channel}/presence", get(presence))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Published {
    offset: u64,
    epoch: String,
    /// True when this answers a retry with the same `Idempotency-Key`: the first
    /// publication's offset and epoch; nothing was published again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

/// The header that names a publication for retries.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Publishes on a channel: a JSON body as JSON data, an `application/octet-stream` body as
/// bytes (namespaces with `binary` on). With an `Idempotency-Key` header (1 to 128 visible
/// ASCII characters, a UUID say), a retry with the same key in the same channel within 2
/// minutes gets the first publication's answer (`replayed: true`, header
/// `Idempotent-Replayed: true`) instead of publishing again.
#[utoipa::path(post, path = "/api/channels/{channel}/publish", tag = "channels",
    params(("channel" = String, Path, description = "namespace:name")),
    request_body(content = Object, content_type = "application/json"),
    responses(
        (status = 200, description = "Published", body = Published),
        (status = 400, description = "Bad channel name or JSON", body = super::error::Problem),
        (status = 409, description = "A publication with this Idempotency-Key is under way", body = super::error::Problem),
        (status = 413, description = "Over the namespace's or the body limit", body = super::error::Problem),
        (status = 415, description = "Neither JSON nor octet-stream", body = super::error::Problem),
        (status = 422, description = "Binary where the namespace forbids it, or an Idempotency-Key used for other data", body = super::error::Problem)))]
pub(crate) async fn publish(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(channel) = path?;
    if !duplex_proto::is_valid_channel(&channel) {
        return Err(ApiError::InvalidChannel);
    }
    let key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| crate::hub::HubError::InvalidIdempotencyKey)
                .and_then(IdempotencyKey::parse)?,
        ),
    };
    super::check_media_type(&headers, &[JSON, OCTET_STREAM])?;
    let binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with(OCTET_STREAM));
    let body = super::body_bytes(&state, body)?;
    let payload = if binary {
        Payload::Binary(body)
    } else {
        let data: Box<RawValue> =
            serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
        Payload::Json(data)
    };
    let webhooks = state
        .sockets
        .webhooks
        .as_ref()
        .filter(|w| w.wants(crate::webhooks::EventKind::Published));
    let outcome = match webhooks {
        None => {
            state
                .hub
                .publish_told(&channel, payload, Caller::Server, None, key.as_ref())
                .await?
        }
        Some(webhooks) => {
            let (event, written) = tokio::sync::oneshot::channel();
            let told: crate::broker::Told = {
                let (webhooks, channel, copy) =
                    (webhooks.clone(), channel.clone(), payload.clone());
                Box::new(move |offset| {
                    let _ = event.send(webhooks.published(None, &channel, offset, &copy));
                })
            };
            let outcome = state
                .hub
                .publish_told(&channel, payload, Caller::Server, Some(told), key.as_ref())
                .await?;
            crate::webhooks::Webhooks::written(written.await.ok().flatten()).await;
            outcome
        }
    };
    let body = axum::Json(Published {
        offset: outcome.offset,
        epoch: outcome.epoch.to_string(),
        replayed: outcome.replayed,
    });
    if outcome.replayed {
        return Ok((
            [(
                header::HeaderName::from_static("idempotent-replayed"),
                header::HeaderValue::from_static("true"),
            )],
            body,
        )
            .into_response());
    }
    Ok(body.into_response())
}

/// A channel's recent publications: with `since`, the ones after that offset (and whether
/// any were lost: `recovered`); without, the last `limit`.
#[utoipa::path(get, path = "/api/channels/{channel}/history", tag = "channels",
    params(("channel" = String, Path),
        ("since" = Option<u64>, Query, description = "return publications after this offset"),
        ("epoch" = Option<String>, Query, description = "the epoch `since` belongs to"),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 100")),
    responses(
        (status = 200, description = "`{channel, offset, epoch, recovered?, reason?, publications}`", body = Object),
        (status = 400, description = "Bad parameter", body = super::error::Problem)))]
pub(crate) async fn history(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let Path(channel) = path?;
    let accepts = super::transports::Accepts {
        limit: true,
        wait: false,
        token: false,
    };
    let query = super::transports::parse_position_query(query.as_deref(), accepts)?;
    let (since, limit) = (query.since, query.limit);
    let page = state
        .hub
        .history(&channel, since.as_ref(), limit, Caller::Server)
        .await?;
    Ok((
        [(header::CONTENT_TYPE, JSON)],
        history_json(&channel, &page, None),
    )
        .into_response())
}

/// Who is subscribed to a channel (namespaces with presence on).
#[utoipa::path(get, path = "/api/channels/{channel}/presence", tag = "channels",
    params(("channel" = String, Path)),
    responses(
        (status = 200, description = "`{channel, clients: [{client, user, meta}]}`", body = Object),
        (status = 403, description = "Presence is off in this namespace", body = super::error::Problem)))]
pub(crate) async fn presence(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Path(channel) = path?;
    let connections = state.hub.presence(&channel, Caller::Server).await?;
    Ok(axum::Json(presence_json(&channel, &connections)))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ChannelList {
    items: Vec<ChannelItem>,
    /// The `cursor` of the next page; null on the last.
    next: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ChannelItem {
    channel: String,
    subscribers: usize,
    offset: u64,
    epoch: String,
    /// Publications per second over the last 10 s window.
    rate: f64,
}

/// Active channels (those with subscribers or history) by name, `limit` (1 to 1000, default
/// 100) at a time; `search` keeps the names that contain it.
#[utoipa::path(get, path = "/api/channels", tag = "channels",
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query, description = "`next` of the previous page"),
        ("search" = Option<String>, Query, description = "keep channels whose name contains this")),
    responses(
        (status = 200, description = "`{items, next}`", body = ChannelList),
        (status = 400, description = "Bad parameter", body = super::error::Problem)))]
pub(crate) async fn list_channels(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<ChannelList>, ApiError> {
    let query = super::parse_page_query(query.as_deref(), true)?;
    if let Some(cursor) = &query.cursor
        && !duplex_proto::is_valid_channel(cursor)
    {
        return Err(super::foreign_cursor());
    }
    let limit = query.limit;
    let mut page =
        state
            .hub
            .channels_page(query.cursor.as_deref(), query.search.as_deref(), limit + 1);
    let next = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|c| c.name.to_string()).unwrap_or_default()
    });
    let items = page
        .into_iter()
        .map(|c| ChannelItem {
            channel: c.name.to_string(),
            subscribers: c.subscribers,
            offset: c.offset,
            epoch: c.epoch.to_string(),
            rate: c.rate,
        })
        .collect();
    Ok(axum::Json(ChannelList { items, next }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ChannelInfo {
    channel: String,
    /// Whether the channel exists on this node now (subscribers, waiting polls or history).
    active: bool,
    subscribers: usize,
    offset: u64,
    epoch: Option<String>,
    rate: f64,
    /// The rules of the channel's namespace.
    #[schema(value_type = Object)]
    namespace: serde_json::Value,
}

/// One channel: its figures on this node (when active) and its namespace's rules.
#[utoipa::path(get, path = "/api/channels/{channel}", tag = "channels",
    params(("channel" = String, Path, description = "namespace:name")),
    responses(
        (status = 200, description = "`{channel, active, subscribers, offset, epoch, rate, namespace}`", body = ChannelInfo),
        (status = 400, description = "Bad channel name", body = super::error::Problem)))]
pub(crate) async fn channel_info(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<ChannelInfo>, ApiError> {
    let Path(channel) = path?;
    if !duplex_proto::is_valid_channel(&channel) {
        return Err(ApiError::InvalidChannel);
    }
    let rules = state.hub.namespaces().for_channel(&channel);
    let namespace = serde_json::json!({
        "name": rules.name,
        "publish": rules.publish,
        "subscribe": rules.subscribe,
        "read_presence": rules.read_presence,
        "read_history": rules.read_history,
        "presence": rules.presence,
        "binary": rules.binary,
        "history_size": rules.history_size,
        "history_bytes": rules.history_bytes,
        "history_ttl_seconds": rules.history_ttl.as_secs(),
        "max_message_size": rules.max_message_size,
        "slow_consumer": rules.slow_consumer,
    });
    let summary = state.hub.channel_summary(&channel);
    Ok(axum::Json(ChannelInfo {
        active: summary.is_some(),
        subscribers: summary.as_ref().map_or(0, |s| s.subscribers),
        offset: summary.as_ref().map_or(0, |s| s.offset),
        epoch: summary.as_ref().map(|s| s.epoch.to_string()),
        rate: summary.as_ref().map_or(0.0, |s| s.rate),
        channel,
        namespace,
    }))
}
