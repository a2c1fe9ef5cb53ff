//! Channels for clients that can only speak HTTP: short polling, long polling and Server-Sent
//! Events. They obey the same namespace rules as sockets and are not behind the API key.
//!
//! Polls read the channel's history (or, in namespaces that keep none, its latest
//! publication); a long poll waits on the channel's `Notify`. An SSE stream is a subscriber like
//! a socket connection (same queue, same slow-consumer policy, same gapless recovery from
//! `Last-Event-ID`), rendered as `text/event-stream`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use duplex_proto::DisconnectCode;
use duplex_proto::frames::{Disconnect, Since, to_json};
use futures_util::Stream;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::{AppState, JSON};
use crate::hub::connection::ConnectionHandle;
use crate::hub::namespace::{Caller, ClientAuth};
use crate::hub::publication::Publication;
use crate::hub::queue::{Outgoing, OutgoingQueue};
use crate::hub::{ConnectionId, Hub, NotRecovered};
use crate::metrics::{Metrics, TransportLabels};
use crate::socket::{HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT, history_json};
use crate::units::parse_duration;

/// The longest `wait` of a long poll.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(60);

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/channels/{channel}/poll", get(poll))
        .route("/api/channels/{channel}/events", get(events))
}

/// `since`, `epoch`, `limit`, `wait` and `token` of history, polls and event streams.
pub(super) struct PositionQuery {
    pub(super) since: Option<Since>,
    pub(super) limit: usize,
    pub(super) wait: Duration,
    /// A connection token given as `?token=` (for `EventSource`, which cannot set headers).
    pub(super) token: Option<String>,
}

/// Which of `limit` and `wait` an endpoint takes (`since` and `epoch` every one does).
#[derive(Clone, Copy)]
pub(super) struct Accepts {
    pub(super) limit: bool,
    pub(super) wait: bool,
    pub(super) token: bool,
}

/// Parses a position query; unknown or malformed parameters are 400s.
pub(super) fn parse_position_query(
    query: Option<&str>,
    accepts: Accepts,
) -> Result<PositionQuery, ApiError> {
    let mut since = None;
    let mut epoch = None;
    let mut limit = HISTORY_DEFAULT_LIMIT;
    let mut wait = Duration::ZERO;
    let mut token = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "token" if accepts.token => token = Some(value.into_owned()),
            "since" => {
                since = Some(value.parse::<u64>().map_err(|_| {
                    ApiError::InvalidQuery(format!("since must be an offset, not {value:?}"))
                })?);
            }
            "epoch" => epoch = Some(value.into_owned()),
            "limit" if accepts.limit => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=HISTORY_MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::InvalidQuery(format!(
                            "limit must be from 1 to {HISTORY_MAX_LIMIT}, not {value:?}"
                        ))
                    })?;
            }
            "wait" if accepts.wait => {
                wait = parse_duration(&value)
                    .filter(|w| *w <= MAX_WAIT)
                    .ok_or_else(|| {
                        ApiError::InvalidQuery(format!(
                            "wait must be a duration such as 500ms or 30s, at most 60s, not {value:?}"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {other:?}"
                )));
            }
        }
    }
    let since = match (since, epoch) {
        (Some(offset), epoch) => Some(Since::Position { offset, epoch }),
        (None, Some(_)) => return Err(ApiError::InvalidQuery("epoch goes with since".into())),
        (None, None) => None,
    };
    Ok(PositionQuery {
        since,
        limit,
        wait,
        token,
    })
}

/// Short poll (no `wait`) or long poll (`wait=30s`): the publications after `since`, and
/// `next`, the offset to ask from next time. Without `since`: where the channel stands.
#[utoipa::path(get, path = "/api/channels/{channel}/poll", tag = "transports",
    params(("channel" = String, Path),
        ("since" = Option<u64>, Query, description = "the last offset the client has"),
        ("epoch" = Option<String>, Query, description = "the epoch of that offset"),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"),
        ("wait" = Option<String>, Query, description = "hold the request up to this long (at most 60s) until a publication arrives")),
    responses(
        (status = 200, description = "`{channel, offset, epoch, next, recovered?, reason?, publications}`", body = Object),
        (status = 400, description = "Bad parameter", body = super::error::Problem),
        (status = 403, description = "The namespace forbids it", body = super::error::Problem)))]
pub(crate) async fn poll(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(channel) = path?;
    let query = parse_position_query(
        query.as_deref(),
        Accepts {
            limit: true,
            wait: true,
            token: true,
        },
    )?;
    let auth = client_auth(&state, &headers, query.token.as_deref())?;
    let wait = query.wait;
    let shutdown = state.sockets.shutdown.clone();
    let page = tokio::select! {
        page = state.hub.poll(&channel, query.since.as_ref(), query.limit, wait, Caller::Client(&auth)) => page?,
        // A long poll ends early at shutdown, answering where the channel stands.
        () = shutdown.cancelled() => {
            state
                .hub
                .poll(&channel, query.since.as_ref(), query.limit, Duration::ZERO, Caller::Client(&auth))
                .await?
        }
    };
    let next = match (page.publications.last(), &query.since, page.recovered) {
        (Some(last), _, _) => last.offset(),
        (None, Some(since), Some(Ok(()))) => since.offset(),
        _ => page.offset,
    };
    let body = history_json(&channel, &page, Some(next));
    Ok(([(header::CONTENT_TYPE, JSON)], body).into_response())
}

/// Server-Sent Events: `id: EPOCH:OFFSET` and `data: {message frame}` per publication (and on
/// `subscribed`, the offset the stream goes on from), heartbeat comments, resumable with
/// `Last-Event-ID` (or `?since=&epoch=`): the missed publications come first, or an explicit
/// `event: not_recovered`.
#[utoipa::path(get, path = "/api/channels/{channel}/events", tag = "transports",
    params(("channel" = String, Path),
        ("since" = Option<u64>, Query), ("epoch" = Option<String>, Query),
        ("Last-Event-ID" = Option<String>, Header, description = "EPOCH:OFFSET of the last event received")),
    responses(
        (status = 200, description = "text/event-stream"),
        (status = 403, description = "The namespace forbids it", body = super::error::Problem)))]
pub(crate) async fn events(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(channel) = path?;
    super::check_origin(&state, &headers)?;
    let accepts = Accepts {
        limit: false,
        wait: false,
        token: true,
    };
    let query = parse_position_query(query.as_deref(), accepts)?;
    let mut since = query.since;
    if let Some(last) = headers.get("last-event-id") {
        since = Some(parse_last_event_id(last)?);
    }
    let auth = client_auth(&state, &headers, query.token.as_deref())?;
    state.hub.check_readable(&channel, Caller::Client(&auth))?;

    let context = &state.sockets;
    let slot = context.slots.acquire(Some(remote.ip())).map_err(|limit| {
        state.metrics.connection_refusals.inc();
        ApiError::TooManyConnections(limit.to_string())
    })?;
    let queue = Arc::new(state.hub.outgoing_queue(context.limits.queue()));
    let connection = Arc::new(ConnectionHandle::new(
        ConnectionId::random(),
        "sse",
        Some(remote),
        queue.clone(),
    ));
    // An event stream ends with `token_expired` when its token runs out, as a socket does.
    let token_deadline = crate::socket::deadline_of(auth.expires_at);
    connection.set_auth(auth);
    state.hub.register(connection.clone());
    let guard = SseConnection {
        hub: state.hub.clone(),
        metrics: state.metrics.clone(),
        connection: connection.clone(),
        _slot: slot,
    };
    state.metrics.connections.get_or_create(&SSE).inc();
    state
        .hub
        .subscribe(&channel, &connection, 0, since.as_ref())
        .await?;

    let stream = event_stream(SseState {
        metrics: state.metrics.clone(),
        queue,
        batch: VecDeque::new(),
        ready: VecDeque::new(),
        epoch: String::new(),
        shutdown: context.shutdown.clone(),
        token_deadline,
        done: false,
        _guard: guard,
    });
    let mut response = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(context.limits.ping_interval)
                .text("ping"),
        )
        .into_response();
    // Proxies such as nginx would otherwise buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

const SSE: TransportLabels = TransportLabels { transport: "sse" };

/// What the request's token (`Authorization: Bearer …` or `?token=`) says; anonymous without one.
fn client_auth(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<ClientAuth, ApiError> {
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = header_token.or(query_token) else {
        return Ok(ClientAuth::default());
    };
    super::verify_token(state, token)
}

fn parse_last_event_id(value: &HeaderValue) -> Result<Since, ApiError> {
    let invalid = || ApiError::InvalidHeader("Last-Event-ID must be EPOCH:OFFSET".into());
    let text = value.to_str().map_err(|_| invalid())?.trim();
    match text.split_once(':') {
        Some((epoch, offset)) => Ok(Since::Position {
            offset: offset.parse().map_err(|_| invalid())?,
            epoch: Some(epoch.to_owned()),
        }),
        None => Ok(Since::Offset(text.parse().map_err(|_| invalid())?)),
    }
}

/// Unsubscribes and unregisters an SSE stream when the response is dropped.
struct SseConnection {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    connection: Arc<ConnectionHandle>,
    _slot: crate::socket::slots::Slot,
}

impl Drop for SseConnection {
    fn drop(&mut self) {
        self.hub.deregister(&self.connection);
        self.metrics.connections.get_or_create(&SSE).dec();
    }
}

struct SseState {
    metrics: Arc<Metrics>,
    queue: Arc<OutgoingQueue>,
    batch: VecDeque<Outgoing>,
    ready: VecDeque<Event>,
    epoch: String,
    shutdown: CancellationToken,
    token_deadline: Option<tokio::time::Instant>,
    done: bool,
    _guard: SseConnection,
}

impl SseState {
    fn publication_event(&self, publication: &Publication) -> Event {
        let data = match publication.json_frame() {
            Some(frame) => String::from_utf8_lossy(&frame).into_owned(),
            None => {
                let line = publication.line();
                String::from_utf8_lossy(&line[..line.len() - 1]).into_owned()
            }
        };
        Event::default()
            .id(format!("{}:{}", self.epoch, publication.offset()))
            .data(data)
    }

    /// Turns control frames into named events: the subscription's reply becomes `subscribed`
    /// (and `not_recovered` when a resume failed); `join` and `leave` keep their names.
    fn control_event(&mut self, frame: &[u8]) -> Vec<Event> {
        let Ok(value) = serde_json::from_slice::<Value>(frame) else {
            return Vec::new();
        };
        match value["type"].as_str() {
            Some("reply") => {
                let result = &value["result"];
                self.epoch = result["epoch"].as_str().unwrap_or_default().to_owned();
                let mut events = Vec::new();
                if result["recovered"] == false {
                    let reason = result["reason"]
                        .as_str()
                        .unwrap_or(NotRecovered::HistoryTrimmed.as_str());
                    let mut info = serde_json::json!({
                        "reason": reason,
                        "offset": result["offset"],
                        "epoch": result["epoch"],
                    });
                    if let Some(missed) = result.get("missed") {
                        // A new epoch kept whole: its publications follow from its first offset.
                        info["missed"] = missed.clone();
                    }
                    events.push(
                        Event::default()
                            .event("not_recovered")
                            .data(info.to_string()),
                    );
                }
                // The event's id is where the stream goes on from: the offset after which the
                // publications that follow come (`offset - missed`). A browser that loses the
                // stream before its first publication then resumes from here with
                // `Last-Event-ID` instead of subscribing afresh past what it missed meanwhile.
                let offset = result["offset"].as_u64().unwrap_or_default();
                let missed = result["missed"].as_u64().unwrap_or_default();
                events.push(
                    Event::default()
                        .event("subscribed")
                        .id(format!("{}:{}", self.epoch, offset.saturating_sub(missed)))
                        .data(result.to_string()),
                );
                events
            }
            Some(kind @ ("join" | "leave")) => {
                vec![Event::default().event(kind).data(value.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

fn event_stream(state: SseState) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.ready.pop_front() {
                return Some((Ok(event), state));
            }
            if state.done {
                return None;
            }
            let queue = state.queue.clone();
            let expiry = state.token_deadline;
            let closing = tokio::select! {
                closing = queue.next_batch(&mut state.batch) => closing,
                () = state.shutdown.cancelled() => Some(DisconnectCode::Shutdown),
                () = crate::socket::token_expiry(expiry) => Some(DisconnectCode::TokenExpired),
            };
            let batch = std::mem::take(&mut state.batch);
            for item in batch {
                match item {
                    Outgoing::Publication(publication) => {
                        let event = state.publication_event(&publication);
                        state.ready.push_back(event);
                    }
                    Outgoing::Latest(slot) => {
                        if let Some(publication) = slot.take() {
                            let event = state.publication_event(&publication);
                            state.ready.push_back(event);
                        }
                    }
                    Outgoing::Control(frame) => {
                        let events = state.control_event(&frame);
                        state.ready.extend(events);
                    }
                    Outgoing::SwitchToLengthPrefixed | Outgoing::Ping => {}
                }
            }
            if let Some(code) = closing {
                crate::socket::count_disconnect(&state.metrics, code);
                let disconnect =
                    String::from_utf8_lossy(&to_json(&Disconnect::from(code))).into_owned();
                state
                    .ready
                    .push_back(Event::default().event("disconnect").data(disconnect));
                state.done = true;
            }
        }
    })
}
