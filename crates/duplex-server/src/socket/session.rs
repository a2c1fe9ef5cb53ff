//! One connection's protocol state: the [`Session`] a socket task owns, how it reads a frame and
//! dispatches it, and how it answers. The requests themselves are in [`super::requests`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use duplex_proto::frames::{ClientFrame, Connected, ErrorFrame, Keepalive, Reply, to_json};
use duplex_proto::{DisconnectCode, ErrorCode, PROTOCOL_VERSION};
use serde::Serialize;

use super::{
    MAX_BAD_FRAMES_IN_A_ROW, SocketContext, Transport, clock_deadline, deadline_of, slots,
};
use crate::hub::connection::ConnectionHandle;
use crate::hub::idempotency::IdempotencyKey;
use crate::hub::publication::Payload;
use crate::hub::queue::OutgoingQueue;
use crate::hub::{ConnectionId, HubError};
use crate::metrics::{CodeLabels, Metrics};

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
    pub(super) id: ConnectionId,
    pub(super) transport: Transport,
    pub(super) context: Arc<SocketContext>,
    pub(super) queue: Arc<OutgoingQueue>,
    pub(super) connection: Arc<ConnectionHandle>,
    pub(super) bad_frames_in_a_row: u32,
    pub(super) publish_limiter: governor::DefaultDirectRateLimiter,
    /// The connection's place under the connection limits, given back when the session ends.
    _slot: slots::Slot,
    /// When the connection's token expires; kept here so the reader does not ask per frame.
    token_deadline: Option<tokio::time::Instant>,
    /// What the token says, kept here so publishing does not lock the shared handle.
    pub(super) auth: Arc<crate::hub::namespace::ClientAuth>,
    /// Whether the connection has connected (a `connect` that succeeded, or a token at the
    /// WebSocket upgrade): its identity is then fixed for its life.
    pub(super) connected: bool,
    /// A request that waits on the broker or the backend; the next frame is read once it is
    /// answered, so a connection's requests are answered in order.
    waiting: Option<Waiting>,
    /// The upgrade request's headers and cookies for the `connect` hook, until connected.
    pub(super) upgrade: Option<Box<crate::hooks::UpgradeContext>>,
    /// Whether the webhooks were told this connection opened (so they are told it closed).
    told_open: bool,
}

/// What a finished request does to its session (a hook's answer changing who it is).
pub(super) type Then = Box<dyn FnOnce(&mut Session) + Send>;

/// A request in progress.
struct Waiting(Pin<Box<dyn Future<Output = Option<Then>> + Send>>);

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiting")
    }
}

/// Queues the error a hub refusal gets.
pub(super) fn hub_error(queue: &OutgoingQueue, metrics: &Metrics, id: u64, error: &HubError) {
    push_error(queue, metrics, Some(id), error.code(), error.to_string());
}

/// Queues a `reply`.
pub(super) fn push_reply<T: Serialize>(queue: &OutgoingQueue, id: u64, result: T) {
    queue.push_control(Bytes::from(to_json(&Reply { id, result })));
}

/// Queues the `error` of a hook's refusal (the backend's code, or `unavailable`).
pub(super) fn push_denial(
    queue: &OutgoingQueue,
    metrics: &Metrics,
    id: Option<u64>,
    denial: &crate::hooks::Denial,
) {
    #[derive(Serialize)]
    #[serde(tag = "type", rename = "error")]
    struct Refused<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: &'a str,
        message: &'a str,
    }
    metrics
        .socket_errors
        .get_or_create(&CodeLabels { code: "hook" })
        .inc();
    queue.push_control(Bytes::from(to_json(&Refused {
        id,
        code: &denial.code,
        message: &denial.message,
    })));
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
            connect_required: context
                .hooks
                .as_ref()
                .is_some_and(|hooks| hooks.on(crate::hooks::Hook::Connect)),
        })));
        context
            .metrics
            .connections
            .get_or_create(&transport.label())
            .inc();
        context.hub.register(connection.clone());
        let told_open = context
            .webhooks
            .as_ref()
            .is_some_and(|webhooks| webhooks.connected(&connection));
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
            auth: crate::hub::namespace::ClientAuth::anonymous(),
            connected: false,
            waiting: None,
            upgrade: None,
            told_open,
        }
    }

    /// Runs a request; one that has to wait (on the broker) is kept, and no frame is read
    /// until it is done.
    pub(super) fn run(&mut self, request: impl Future<Output = ()> + Send + 'static) {
        self.run_then(async move {
            request.await;
            None
        });
    }

    /// Runs a request whose outcome changes the session: `Then` is applied once it is done,
    /// before the next frame is read.
    pub(super) fn run_then(
        &mut self,
        request: impl Future<Output = Option<Then>> + Send + 'static,
    ) {
        use futures_util::FutureExt;
        let mut request: Pin<Box<dyn Future<Output = Option<Then>> + Send>> = Box::pin(request);
        match request.as_mut().now_or_never() {
            None => self.waiting = Some(Waiting(request)),
            Some(Some(then)) => then(self),
            Some(None) => {}
        }
    }

    /// The hooks to call for `hook` (in `channel`'s namespace, when it is about a channel), if
    /// that hook is on.
    pub(super) fn hook(
        &self,
        hook: crate::hooks::Hook,
        channel: Option<&str>,
    ) -> Option<Arc<crate::hooks::Hooks>> {
        let hooks = self.context.hooks.as_ref()?;
        if !hooks.on(hook) {
            return None;
        }
        if let Some(channel) = channel
            && !self
                .context
                .hub
                .namespaces()
                .for_channel(channel)
                .hooks
                .has(hook)
        {
            return None;
        }
        Some(hooks.clone())
    }

    /// Keeps the upgrade request's headers and cookies the `connect` hook is to be given.
    pub(crate) fn keep_upgrade(&mut self, upgrade: Option<Box<crate::hooks::UpgradeContext>>) {
        self.upgrade = upgrade;
    }

    /// Whether a request must wait for `connect` (the `connect` hook is on and the connection
    /// has not connected); answers `not_connected` then.
    fn refused_before_connect(&mut self, id: Option<u64>) -> bool {
        if self.connected || self.hook(crate::hooks::Hook::Connect, None).is_none() {
            return false;
        }
        self.error(
            id,
            ErrorCode::NotConnected,
            "this server asks the application's backend who may connect: send connect first",
        );
        true
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
            let then = std::task::ready!(request.as_mut().poll(cx));
            self.waiting = None;
            if let Some(then) = then {
                then(self);
            }
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
    /// With the `connect` hook on, the backend is asked first, and a refusal closes the
    /// connection with `connect_refused`.
    pub(crate) fn connect_with(&mut self, auth: crate::hub::namespace::ClientAuth) {
        self.authenticate(auth);
        match self.hook(crate::hooks::Hook::Connect, None) {
            Some(hooks) => self.ask_connect(hooks, None, None, None),
            None => self.connected = true,
        }
    }

    /// Makes a verified token the connection's.
    pub(super) fn authenticate(&mut self, auth: crate::hub::namespace::ClientAuth) {
        self.token_deadline = deadline_of(auth.expires_at);
        self.connection
            .set_token_deadline(auth.expires_at.map(clock_deadline));
        if let Some(meta) = &auth.meta {
            self.connection.set_meta(Some(meta.clone()));
        }
        self.connection.set_auth(auth);
        self.auth = self.connection.auth();
        if self.told_open
            && self.auth.user.is_some()
            && let Some(webhooks) = &self.context.webhooks
        {
            webhooks.identified(&self.connection);
        }
    }

    pub(super) fn reply<T: Serialize>(&mut self, id: u64, result: T) {
        self.bad_frames_in_a_row = 0;
        push_reply(&self.queue, id, result);
    }

    pub(super) fn error(&mut self, id: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        push_error(&self.queue, &self.context.metrics, id, code, message);
    }

    /// An error caused by a malformed frame; too many in a row close the connection.
    pub(super) fn bad_frame(
        &mut self,
        id: Option<u64>,
        code: ErrorCode,
        message: impl Into<String>,
    ) {
        self.error(id, code, message);
        self.bad_frames_in_a_row += 1;
        if self.bad_frames_in_a_row >= MAX_BAD_FRAMES_IN_A_ROW {
            self.queue.close(DisconnectCode::TooManyErrors);
        }
    }

    pub(super) fn hub_error(&mut self, id: u64, error: &HubError) {
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
            | "presence" | "refresh" | "rpc" => {}
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
        if !matches!(kind, "connect" | "framing") && self.refused_before_connect(Some(id)) {
            return After::Continue;
        }
        match kind {
            "connect" => self.connect(id, &frame),
            "refresh" => self.refresh(id, frame.token.as_deref()),
            "rpc" => self.rpc(id, frame.method.as_deref(), frame.data),
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
                            let key =
                                match frame.idempotency_key.as_deref().map(IdempotencyKey::parse) {
                                    None => None,
                                    Some(Ok(key)) => Some(key),
                                    Some(Err(error)) => {
                                        self.hub_error(id, &error);
                                        return After::Continue;
                                    }
                                };
                            self.publish(id, channel, Payload::Json(data.to_owned()), key);
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
        if self.refused_before_connect(Some(id)) {
            return;
        }
        self.publish(id, &channel, Payload::Binary(payload), None);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.context.hub.deregister(&self.connection);
        if self.told_open
            && let Some(webhooks) = &self.context.webhooks
        {
            let reason = self
                .queue
                .closing_code()
                .map_or("closed", DisconnectCode::as_str);
            webhooks.disconnected(&self.connection, reason);
        }
        self.context
            .metrics
            .connections
            .get_or_create(&self.transport.label())
            .dec();
    }
}
