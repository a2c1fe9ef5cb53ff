//! Socket connections: the session logic shared by WebSocket ([`ws`]) and raw TCP ([`tcp`]).
//!
//! A WebSocket connection is one task (it owns the [`Session`], answers requests and drains the
//! connection's [`OutgoingQueue`] into one write per batch); a raw TCP connection is a reader
//! task and a writer task. One [`keepalive`] task pings WebSocket connections and closes idle,
//! expired and, at shutdown, all of them. The hub only ever pushes into a queue, so a slow
//! socket never blocks a publisher.

pub(crate) mod keepalive;
pub(crate) mod slots;
pub(crate) mod tcp;
pub(crate) mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use duplex_proto::frames::{
    ClientFrame, ConnectResult, Connected, ErrorFrame, Keepalive, Limits, Published, Reply, to_json,
};
use duplex_proto::{DisconnectCode, ErrorCode, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Present;
use crate::hub::connection::{ClientAnswer, ConnectionHandle};
use crate::hub::namespace::Caller;
use crate::hub::publication::Payload;
use crate::hub::queue::{Outgoing, OutgoingQueue, QueueLimits};
use crate::hub::{ConnectionId, Hub, HubError};
use crate::metrics::{CodeLabels, Metrics, TransportLabels};

/// Publications a `history` request returns when it names no `limit`, and at most.
pub(crate) const HISTORY_DEFAULT_LIMIT: usize = 100;
/// The largest `limit` of a `history` request.
pub(crate) const HISTORY_MAX_LIMIT: usize = 1000;

/// After this many bad frames in a row a connection is closed with `too_many_errors`.
const MAX_BAD_FRAMES_IN_A_ROW: u32 = 20;

/// How long a closing connection's writer gets to send what is queued and the `disconnect`.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Per-connection limits, from the configuration.
#[derive(Debug, Clone)]
pub struct SocketLimits {
    /// Largest frame read, in bytes.
    pub max_frame: usize,
    /// Publications queued per connection before the slow-consumer policy applies.
    pub queue_size: usize,
    /// Bytes of publications queued per connection before the slow-consumer policy applies
    /// (whichever of this and `queue_size` is reached first).
    pub queue_bytes: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Time between keepalive pings.
    pub ping_interval: Duration,
    /// Time without any frame from the client before it is disconnected.
    pub idle_timeout: Duration,
    /// Publications per second one connection may make (a token bucket refilled at this rate).
    pub publish_rate: u32,
    /// How many publications may come at once before the rate applies.
    pub publish_burst: u32,
    /// Socket connections (WebSocket, raw TCP, SSE) the server holds at most.
    pub max_connections: usize,
    /// Socket connections one IP address may hold.
    pub max_connections_per_ip: usize,
}

impl SocketLimits {
    pub(crate) fn announced(&self) -> Limits {
        Limits {
            max_frame: self.max_frame,
            max_subscriptions: self.max_subscriptions,
            queue: self.queue_size,
            idle_timeout_ms: u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            ping_interval_ms: u64::try_from(self.ping_interval.as_millis()).unwrap_or(u64::MAX),
            publish_rate: self.publish_rate,
            publish_burst: self.publish_burst,
            queue_bytes: self.queue_bytes,
        }
    }

    /// The bounds of one connection's outgoing queue.
    pub(crate) fn queue(&self) -> QueueLimits {
        QueueLimits {
            publications: self.queue_size,
            bytes: self.queue_bytes,
        }
    }
}

/// What socket tasks share.
#[derive(Debug, Clone)]
pub(crate) struct SocketContext {
    pub(crate) hub: Arc<Hub>,
    pub(crate) tokens: Option<crate::auth::TokenVerifier>,
    pub(crate) limits: Arc<SocketLimits>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) slots: Arc<slots::ConnectionSlots>,
}

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Tcp => "tcp",
        }
    }

    fn label(self) -> TransportLabels {
        TransportLabels {
            transport: self.name(),
        }
    }
}

/// What the reader must do after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    Continue,
    /// Raw TCP: read length-prefixed frames from now on.
    SwitchToLengthPrefixed,
}

/// One connection's protocol state.
#[derive(Debug)]
pub(crate) struct Session {
    id: ConnectionId,
    transport: Transport,
    context: Arc<SocketContext>,
    queue: Arc<OutgoingQueue>,
    connection: Arc<ConnectionHandle>,
    bad_frames_in_a_row: u32,
    publish_limiter: governor::DefaultDirectRateLimiter,
    /// The connection's place under the connection limits, given back when the session ends.
    _slot: slots::Slot,
    /// When the connection's token expires; kept here so the reader does not ask per frame.
    token_deadline: Option<tokio::time::Instant>,
    /// What the token says, kept here so publishing does not lock the shared handle.
    auth: Arc<crate::hub::namespace::ClientAuth>,
    /// Whether the connection has connected (a `connect` that succeeded, or a token at the
    /// WebSocket upgrade): its identity is then fixed for its life.
    connected: bool,
    /// A request that waits on the broker; the next frame is read once it is answered, so a
    /// connection's requests are answered in order.
    waiting: Option<Waiting>,
}

/// A request in progress.
struct Waiting(Pin<Box<dyn Future<Output = ()> + Send>>);

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiting")
    }
}

/// Queues the error a hub refusal gets.
fn hub_error(queue: &OutgoingQueue, metrics: &Metrics, id: u64, error: &HubError) {
    push_error(queue, metrics, Some(id), error.code(), error.to_string());
}

/// Queues a `reply`.
fn push_reply<T: Serialize>(queue: &OutgoingQueue, id: u64, result: T) {
    queue.push_control(Bytes::from(to_json(&Reply { id, result })));
}

/// Queues an `error` and counts it.
fn push_error(
    queue: &OutgoingQueue,
    metrics: &Metrics,
    id: Option<u64>,
    code: ErrorCode,
    message: impl Into<String>,
) {
    metrics
        .socket_errors
        .get_or_create(&CodeLabels {
            code: code.as_str(),
        })
        .inc();
    queue.push_control(Bytes::from(to_json(&ErrorFrame {
        id,
        code,
        message: message.into().into(),
    })));
}

/// A connection's publish rate limiter: `rate` a second, `burst` at once.
fn publish_limiter(rate: u32, burst: u32) -> governor::DefaultDirectRateLimiter {
    let rate = std::num::NonZeroU32::new(rate).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
    governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst))
}

impl Session {
    /// Starts a session, registers the connection with the hub and queues `connected`.
    pub(crate) fn start(
        context: Arc<SocketContext>,
        transport: Transport,
        remote: Option<SocketAddr>,
        slot: slots::Slot,
    ) -> Session {
        let id = ConnectionId::random();
        let queue = Arc::new(context.hub.outgoing_queue(context.limits.queue()));
        let connection = Arc::new(ConnectionHandle::new(
            id,
            transport.name(),
            remote,
            queue.clone(),
        ));
        let client = id.to_string();
        queue.push_control(Bytes::from(to_json(&Connected {
            client: client.as_str().into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            limits: context.limits.announced(),
        })));
        context
            .metrics
            .connections
            .get_or_create(&transport.label())
            .inc();
        context.hub.register(connection.clone());
        let publish_limiter =
            publish_limiter(context.limits.publish_rate, context.limits.publish_burst);
        Session {
            id,
            transport,
            context,
            queue,
            connection,
            bad_frames_in_a_row: 0,
            publish_limiter,
            _slot: slot,
            token_deadline: None,
            auth: Arc::default(),
            connected: false,
            waiting: None,
        }
    }

    /// Runs a request; one that has to wait (on the broker) is kept, and no frame is read
    /// until it is done.
    fn run(&mut self, request: impl Future<Output = ()> + Send + 'static) {
        use futures_util::FutureExt;
        let mut request = Box::pin(request);
        if request.as_mut().now_or_never().is_none() {
            self.waiting = Some(Waiting(request));
        }
    }

    /// Whether a request is in progress.
    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Completes the request in progress (cancel-safe: it stays kept until done).
    pub(crate) async fn finish_waiting(&mut self) {
        std::future::poll_fn(|cx| self.poll_waiting(cx)).await;
    }

    /// Polls the request in progress; ready once there is none.
    pub(crate) fn poll_waiting(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if let Some(Waiting(request)) = &mut self.waiting {
            std::task::ready!(request.as_mut().poll(cx));
            self.waiting = None;
        }
        std::task::Poll::Ready(())
    }

    /// When the connection's token runs out, if it has one.
    pub(crate) fn token_deadline(&self) -> Option<tokio::time::Instant> {
        self.token_deadline
    }

    pub(crate) fn queue(&self) -> &Arc<OutgoingQueue> {
        &self.queue
    }

    pub(crate) fn connection(&self) -> &Arc<ConnectionHandle> {
        &self.connection
    }

    /// Connects the connection with a token already verified (WebSocket `?token=`): a later
    /// `connect` is refused, as a second one would be.
    pub(crate) fn connect_with(&mut self, auth: crate::hub::namespace::ClientAuth) {
        self.authenticate(auth);
        self.connected = true;
    }

    /// Makes a verified token the connection's.
    fn authenticate(&mut self, auth: crate::hub::namespace::ClientAuth) {
        self.token_deadline = deadline_of(auth.expires_at);
        self.connection
            .set_token_deadline(auth.expires_at.map(clock_deadline));
        if let Some(meta) = &auth.meta {
            self.connection.set_meta(Some(meta.clone()));
        }
        self.connection.set_auth(auth);
        self.auth = self.connection.auth();
    }

    fn reply<T: Serialize>(&mut self, id: u64, result: T) {
        self.bad_frames_in_a_row = 0;
        push_reply(&self.queue, id, result);
    }

    fn error(&mut self, id: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        push_error(&self.queue, &self.context.metrics, id, code, message);
    }

    /// An error caused by a malformed frame; too many in a row close the connection.
    fn bad_frame(&mut self, id: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.error(id, code, message);
        self.bad_frames_in_a_row += 1;
        if self.bad_frames_in_a_row >= MAX_BAD_FRAMES_IN_A_ROW {
            self.queue.close(DisconnectCode::TooManyErrors);
        }
    }

    fn hub_error(&mut self, id: u64, error: &HubError) {
        self.bad_frames_in_a_row = 0;
        hub_error(&self.queue, &self.context.metrics, id, error);
    }

    /// Handles a text frame that may not be UTF-8 (raw TCP).
    pub(crate) fn on_unchecked_text(&mut self, text: &[u8]) -> After {
        match std::str::from_utf8(text) {
            Ok(text) => self.on_text(text),
            Err(error) => {
                self.bad_frame(
                    None,
                    ErrorCode::BadFrame,
                    format!("a text frame must be UTF-8: {error}"),
                );
                After::Continue
            }
        }
    }

    /// Handles a JSON text frame.
    pub(crate) fn on_text(&mut self, text: &str) -> After {
        let frame = match ClientFrame::parse(text.as_bytes()) {
            Ok(frame) => frame,
            Err(error) => {
                self.bad_frame(
                    None,
                    ErrorCode::BadFrame,
                    format!("expected a JSON object with a string \"type\": {error}"),
                );
                return After::Continue;
            }
        };
        let kind = frame.kind.as_ref();
        match kind {
            "ping" => {
                self.bad_frames_in_a_row = 0;
                self.queue
                    .push_control(Bytes::from(to_json(&Keepalive::Pong { id: frame.id })));
                return After::Continue;
            }
            "pong" => return After::Continue,
            "reply" | "error" => {
                self.answer(&frame);
                return After::Continue;
            }
            "connect" | "subscribe" | "unsubscribe" | "publish" | "framing" | "history"
            | "presence" | "refresh" => {}
            _ => {
                self.bad_frame(
                    frame.id,
                    ErrorCode::UnknownType,
                    format!("unknown frame type {kind:?}"),
                );
                return After::Continue;
            }
        }
        let Some(id) = frame.id else {
            self.bad_frame(
                None,
                ErrorCode::MissingId,
                format!("a {kind} request needs an unsigned integer \"id\""),
            );
            return After::Continue;
        };
        match kind {
            "connect" => self.connect(id, &frame),
            "refresh" => self.refresh(id, frame.token.as_deref()),
            "framing" => return self.framing(id, frame.mode.as_deref()),
            _ => {
                let Some(channel) = frame.channel.as_deref() else {
                    self.bad_frame(
                        Some(id),
                        ErrorCode::BadRequest,
                        format!("a {kind} request needs a \"channel\""),
                    );
                    return After::Continue;
                };
                match kind {
                    "subscribe" => self.subscribe(id, channel, frame.since.as_ref()),
                    "unsubscribe" => self.unsubscribe(id, channel),
                    "history" => self.history(id, channel, frame.since.as_ref(), frame.limit),
                    "presence" => self.presence(id, channel),
                    _ => match frame.data {
                        Some(data) => {
                            self.publish(id, channel, Payload::Json(data.to_owned()));
                        }
                        None => self.bad_frame(
                            Some(id),
                            ErrorCode::BadRequest,
                            "a publish request needs \"data\" (any JSON value but null)",
                        ),
                    },
                }
            }
        }
        After::Continue
    }

    /// Handles a binary frame (kind byte first).
    pub(crate) fn on_binary(&mut self, frame: Bytes) {
        let (id, channel, payload) = match duplex_proto::binary::decode_publish(&frame) {
            Ok(publish) => {
                let start = frame.len() - publish.payload.len();
                (
                    u64::from(publish.id),
                    publish.channel.to_owned(),
                    frame.slice(start..),
                )
            }
            Err(error) => {
                self.bad_frame(None, ErrorCode::BadFrame, error.to_string());
                return;
            }
        };
        self.publish(id, &channel, Payload::Binary(payload));
    }

    /// `connect`: once per connection. A refused `connect` changes nothing (the client may try
    /// again); one that succeeded fixes who the connection is, so a second is `already_connected`.
    fn connect(&mut self, id: u64, frame: &ClientFrame<'_>) {
        if let Some(version) = frame.version
            && !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
        {
            self.error(
                Some(id),
                ErrorCode::Unsupported,
                format!(
                    "this server speaks protocol versions {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}, not {version}"
                ),
            );
            return;
        }
        if self.connected {
            let who = match self.connection.user() {
                Some(user) => format!("as {user:?}"),
                None => "anonymously".to_owned(),
            };
            self.error(
                Some(id),
                ErrorCode::AlreadyConnected,
                format!(
                    "this connection already connected {who}; open a new connection to connect otherwise (refresh renews a token)"
                ),
            );
            return;
        }
        if let Some(token) = &frame.token
            && !self.accept_token(id, token)
        {
            return;
        }
        self.connected = true;
        // The token's meta is the server's word; the client's own is a fallback.
        let meta = self
            .auth
            .meta
            .clone()
            .or_else(|| frame.meta.map(|meta| Arc::from(meta.to_owned())));
        self.connection.set_meta(meta);
        let client = self.id.to_string();
        let user = self.connection.user();
        self.reply(
            id,
            ConnectResult {
                client: client.into(),
                user: user.as_deref().map(Into::into),
            },
        );
    }

    /// Verifies a token and makes it the connection's; answers the error and returns false when
    /// it is refused.
    fn accept_token(&mut self, id: u64, token: &str) -> bool {
        let verified = match &self.context.tokens {
            Some(verifier) => verifier.verify(token),
            None => Err(crate::auth::TokenError::NotConfigured),
        };
        match verified {
            Ok(auth) => {
                self.authenticate(auth);
                true
            }
            Err(error) => {
                self.error(Some(id), error.code(), error.to_string());
                false
            }
        }
    }

    /// `refresh`: a fresh token for the same user before the current one expires. Only a
    /// connection that connected with a token has one to renew; an anonymous one is told to
    /// `connect` instead. What the new token no longer allows ends at once: each such
    /// subscription gets an `unsubscribed` push after the reply.
    fn refresh(&mut self, id: u64, token: Option<&str>) {
        let Some(token) = token else {
            self.bad_frame(
                Some(id),
                ErrorCode::BadRequest,
                "a refresh request needs a \"token\"",
            );
            return;
        };
        let Some(before) = self.connection.user() else {
            self.error(
                Some(id),
                ErrorCode::BadRequest,
                "refresh renews the token of a connection that connected with one; an anonymous connection sends connect with a token",
            );
            return;
        };
        let verified = match &self.context.tokens {
            Some(verifier) => verifier.verify(token),
            None => Err(crate::auth::TokenError::NotConfigured),
        };
        match verified {
            Ok(auth) if auth.user.as_deref() != Some(&*before) => self.error(
                Some(id),
                ErrorCode::InvalidToken,
                "a refresh token must name the same user",
            ),
            Ok(auth) => {
                let expires_at = auth.expires_at;
                self.authenticate(auth);
                self.reply(id, serde_json::json!({ "expires_at": expires_at }));
                self.context
                    .hub
                    .end_disallowed_subscriptions(&self.connection, &self.auth);
            }
            Err(error) => self.error(Some(id), error.code(), error.to_string()),
        }
    }

    /// A client's `reply` or `error` to one of the server's requests.
    fn answer(&mut self, frame: &ClientFrame<'_>) {
        let Some(id) = frame.id else {
            self.bad_frame(
                None,
                ErrorCode::MissingId,
                format!("a {} needs the \"id\" of the server's request", frame.kind),
            );
            return;
        };
        let answer = if frame.kind == "reply" {
            ClientAnswer::Result(
                frame
                    .result
                    .map(ToOwned::to_owned)
                    .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON")),
            )
        } else {
            ClientAnswer::Error {
                code: frame.code.as_deref().unwrap_or("error").to_owned(),
                message: frame.message.as_deref().unwrap_or("").to_owned(),
            }
        };
        self.bad_frames_in_a_row = 0;
        if !self.connection.answer(id, answer) {
            // Late (after the timeout), repeated, or for an id never asked: counted, not fatal.
            self.context.metrics.unmatched_answers.inc();
        }
    }

    fn framing(&mut self, id: u64, mode: Option<&str>) -> After {
        if self.transport != Transport::Tcp {
            self.error(
                Some(id),
                ErrorCode::Unsupported,
                "framing is chosen on raw TCP only",
            );
            return After::Continue;
        }
        match mode {
            Some("length_prefixed") => {
                self.reply(id, serde_json::json!({"mode": "length_prefixed"}));
                self.queue.push_other(Outgoing::SwitchToLengthPrefixed);
                After::SwitchToLengthPrefixed
            }
            _ => {
                self.error(
                    Some(id),
                    ErrorCode::Unsupported,
                    "mode must be \"length_prefixed\"",
                );
                After::Continue
            }
        }
    }

    fn subscribe(&mut self, id: u64, channel: &str, since: Option<&duplex_proto::frames::Since>) {
        if self.connection.is_subscribed(channel) {
            self.hub_error(id, &HubError::AlreadySubscribed);
            return;
        }
        if self.connection.subscription_count() >= self.context.limits.max_subscriptions {
            let max = self.context.limits.max_subscriptions;
            self.error(
                Some(id),
                ErrorCode::TooManySubscriptions,
                format!("a connection may hold at most {max} subscriptions"),
            );
            return;
        }
        self.bad_frames_in_a_row = 0;
        let hub = self.context.hub.clone();
        let metrics = self.context.metrics.clone();
        let connection = self.connection.clone();
        let channel = channel.to_owned();
        let since = since.cloned();
        self.run(async move {
            if let Err(error) = hub
                .subscribe(&channel, &connection, id, since.as_ref())
                .await
            {
                hub_error(&connection.queue, &metrics, id, &error);
            }
        });
    }

    fn unsubscribe(&mut self, id: u64, channel: &str) {
        match self.context.hub.unsubscribe(channel, &self.connection) {
            Ok(()) => self.reply(id, serde_json::json!({})),
            Err(error) => self.hub_error(id, &error),
        }
    }

    fn history(
        &mut self,
        id: u64,
        channel: &str,
        since: Option<&duplex_proto::frames::Since>,
        limit: Option<u32>,
    ) {
        let limit = limit.map_or(HISTORY_DEFAULT_LIMIT, |l| l as usize);
        if limit == 0 || limit > HISTORY_MAX_LIMIT {
            self.bad_frame(
                Some(id),
                ErrorCode::BadRequest,
                format!("limit must be from 1 to {HISTORY_MAX_LIMIT}"),
            );
            return;
        }
        self.bad_frames_in_a_row = 0;
        let auth = self.auth.clone();
        let hub = self.context.hub.clone();
        let metrics = self.context.metrics.clone();
        let queue = self.queue.clone();
        let channel = channel.to_owned();
        let since = since.cloned();
        self.run(async move {
            match hub
                .history(&channel, since.as_ref(), limit, Caller::Client(&auth))
                .await
            {
                Ok(page) => {
                    let mut result = history_json(&channel, &page, None);
                    let reply = format!("{{\"type\":\"reply\",\"id\":{id},\"result\":");
                    result.splice(0..0, reply.into_bytes());
                    result.push(b'}');
                    queue.push_control(Bytes::from(result));
                }
                Err(error) => hub_error(&queue, &metrics, id, &error),
            }
        });
    }

    fn presence(&mut self, id: u64, channel: &str) {
        self.bad_frames_in_a_row = 0;
        let auth = self.auth.clone();
        let hub = self.context.hub.clone();
        let metrics = self.context.metrics.clone();
        let queue = self.queue.clone();
        let channel = channel.to_owned();
        self.run(async move {
            match hub.presence(&channel, Caller::Client(&auth)).await {
                Ok(present) => push_reply(&queue, id, presence_json(&channel, &present)),
                Err(error) => hub_error(&queue, &metrics, id, &error),
            }
        });
    }

    fn publish(&mut self, id: u64, channel: &str, payload: Payload) {
        if self.publish_limiter.check().is_err() {
            self.context.metrics.rate_limited.inc();
            let limits = &self.context.limits;
            self.error(
                Some(id),
                ErrorCode::RateLimited,
                format!(
                    "at most {} publications a second (bursts of {})",
                    limits.publish_rate, limits.publish_burst
                ),
            );
            return;
        }
        self.bad_frames_in_a_row = 0;
        let auth = self.auth.clone();
        let hub = self.context.hub.clone();
        let metrics = self.context.metrics.clone();
        let queue = self.queue.clone();
        let channel = channel.to_owned();
        self.run(async move {
            match hub.publish(&channel, payload, Caller::Client(&auth)).await {
                Ok(outcome) => push_reply(
                    &queue,
                    id,
                    Published {
                        offset: outcome.offset,
                        epoch: (*outcome.epoch).into(),
                    },
                ),
                Err(error) => hub_error(&queue, &metrics, id, &error),
            }
        });
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.context.hub.deregister(&self.connection);
        self.context
            .metrics
            .connections
            .get_or_create(&self.transport.label())
            .dec();
    }
}

/// The monotonic deadline of a token expiring at `expires_at` (seconds since the Unix epoch).
/// When a token whose `exp` is `expires_at` runs out, on tokio's clock.
pub(crate) fn deadline_of(expires_at: Option<u64>) -> Option<tokio::time::Instant> {
    let expires_at = expires_at?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Some(tokio::time::Instant::now() + Duration::from_secs(expires_at.saturating_sub(now)))
}

/// A token's `exp` (seconds since the Unix epoch) on [`crate::hub::connection::clock_ms`].
fn clock_deadline(expires_at: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::hub::connection::clock_ms() + expires_at.saturating_sub(now) * 1000
}

/// Counts a `disconnect` the server sends.
pub(crate) fn count_disconnect(metrics: &Metrics, code: DisconnectCode) {
    metrics
        .disconnects
        .get_or_create(&CodeLabels {
            code: code.as_str(),
        })
        .inc();
}

/// Waits for a connection's next incoming item, unless the connection must end first: at
/// shutdown, when its queue closes, when its token expires or when nothing arrives within the
/// idle timeout. Returns `None` when the reader should stop (the close code, if any, is set).
pub(crate) async fn next_incoming<T>(
    context: &SocketContext,
    queue: &OutgoingQueue,
    token_deadline: Option<tokio::time::Instant>,
    next: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    tokio::select! {
        () = context.shutdown.cancelled() => {
            queue.close(DisconnectCode::Shutdown);
            None
        }
        () = queue.closed() => None,
        () = token_expiry(token_deadline) => {
            queue.close(DisconnectCode::TokenExpired);
            None
        }
        next = tokio::time::timeout(context.limits.idle_timeout, next) => match next {
            Ok(next) => next,
            Err(_) => {
                queue.close(DisconnectCode::IdleTimeout);
                None
            }
        },
    }
}

/// Completes when the token deadline passes; never without one.
pub(crate) async fn token_expiry(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits for a closing connection's writer to finish, then gives up on it.
async fn finish_writer(writer: tokio::task::JoinHandle<()>, queue: &OutgoingQueue) {
    let mut writer = writer;
    if queue.is_closing() {
        if tokio::time::timeout(CLOSE_GRACE, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    } else {
        writer.abort();
    }
}

/// `{"channel","offset","epoch","recovered"?,"reason"?,"publications":[message frames]}`,
/// spliced from the publications' encoded frames.
pub(crate) fn history_json(
    channel: &str,
    page: &crate::hub::HistoryPage,
    next: Option<u64>,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Head<'a> {
        channel: &'a str,
        offset: u64,
        epoch: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        next: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    }
    let mut out = to_json(&Head {
        channel,
        offset: page.offset,
        epoch: &page.epoch,
        next,
        recovered: page.recovered.map(|r| r.is_ok()),
        reason: page.recovered.and_then(|r| r.err()).map(|e| e.as_str()),
    });
    out.pop();
    out.extend_from_slice(b",\"publications\":[");
    for (i, publication) in page.publications.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match publication.json_frame() {
            Some(frame) => out.extend_from_slice(&frame),
            None => {
                let line = publication.line();
                out.extend_from_slice(&line[..line.len() - 1]);
            }
        }
    }
    out.extend_from_slice(b"]}");
    out
}

/// `{"channel","clients":[{"client","user","meta"?}]}`.
pub(crate) fn presence_json(channel: &str, present: &[Present]) -> serde_json::Value {
    serde_json::json!({"channel": channel, "clients": present})
}
