//! The socket side: one [`Connection`] that reconnects by itself and resubscribes every channel
//! `since` the last offset it delivered, so a [`Subscription`] has no gaps across reconnects, or
//! says plainly ([`Event::Gap`]) when the server could not replay what was missed.
//!
//! One task per connection owns the socket; handles talk to it over a bounded channel. While it
//! reconnects, requests wait in that channel; a request already sent when the socket broke fails
//! with [`Error::ConnectionLost`] (it may or may not have run).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use url::Url;

use crate::Error;
use crate::http::{PresenceEntry, Published};
use crate::transport::{Frame, Transport, check_url};

/// A publication's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// JSON data.
    Json(Value),
    /// Bytes (namespaces with `binary` on).
    Binary(Bytes),
}

/// One publication delivered to a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The channel.
    pub channel: String,
    /// Its offset in the channel (1, 2, 3, … within an epoch).
    pub offset: u64,
    /// The channel's epoch when it was delivered.
    pub epoch: String,
    /// The content.
    pub data: Payload,
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A publication.
    Message(Message),
    /// Someone subscribed (namespaces with presence).
    Join(PresenceEntry),
    /// Someone left (namespaces with presence).
    Leave(PresenceEntry),
    /// After a reconnect the server could not replay what was published meanwhile: the stream
    /// goes on live from `resumed_at`, and publications after `last_seen` up to it are missing
    /// (refetch them over HTTP if they matter).
    Gap {
        /// The server's `reason`: `epoch_changed`, `history_trimmed`, `offset_ahead`, …
        reason: String,
        /// The last offset this subscription delivered before (in the old epoch).
        last_seen: u64,
        /// The channel's offset the stream resumes after.
        resumed_at: u64,
        /// The channel's epoch from now on.
        epoch: String,
    },
    /// The subscription ended: the server refused it on resubscribe, or the connection closed
    /// for good. The stream ends after this.
    Ended {
        /// Why, as a protocol code (`permission_denied`, `closed`, a disconnect code, …).
        code: String,
    },
}

/// The connection's state, from [`Connection::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connected, with the server's id for this connection.
    Connected {
        /// The connection id the server gave (what `/api/connections/{id}/request` takes).
        client: String,
    },
    /// The socket broke; reconnecting (attempt number, from 1).
    Reconnecting(u32),
    /// Closed for good, with the server's disconnect code when it said not to reconnect.
    Closed(Option<String>),
}

/// A client's refusal of a server request: the `error` frame it answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// A code of your choosing, such as `busy`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

type Handler = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<Value, RequestError>> + Send + Sync>;

/// How to open a [`Connection`].
#[derive(Clone)]
pub struct ConnectOptions {
    url: String,
    token: Option<String>,
    meta: Option<Value>,
    ca_certs: Vec<Vec<u8>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    handler: Option<Handler>,
    reconnect: bool,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("url", &self.url)
            .field("meta", &self.meta)
            .field("reconnect", &self.reconnect)
            .finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// Options for `url`: `ws://HOST:PORT/ws`, `wss://…`, `tcp://HOST:PORT` or `tcps://HOST:PORT`.
    pub fn new(url: &str) -> Self {
        ConnectOptions {
            url: url.to_owned(),
            token: None,
            meta: None,
            ca_certs: Vec::new(),
            tls: None,
            handler: None,
            reconnect: true,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }

    /// A connection token (JWT), sent in `connect` on every (re)connection.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// What presence shows for this connection (unless the token has its own `meta`).
    pub fn meta(mut self, meta: Value) -> Self {
        self.meta = Some(meta);
        self
    }

    /// Trusts the PEM certificates in `pem` for wss:// and tcps://.
    pub fn ca_cert_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certs.push(pem.into());
        self
    }

    pub(crate) fn tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Whether to reconnect after the socket breaks (default: yes, with exponential backoff and
    /// jitter); a server `disconnect` that says not to reconnect is always honoured.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// The first and the longest wait between reconnection attempts (default 100 ms and 10 s);
    /// each wait doubles the last and is then jittered down by up to half.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// Answers the server's `request`s: the handler gets the request's `data` and returns the
    /// reply's `result`, or a [`RequestError`]. Without one, requests are declined with
    /// `no_handler`.
    pub fn on_request<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, RequestError>> + Send + 'static,
    {
        self.handler = Some(Arc::new(move |data| Box::pin(handler(data))));
        self
    }
}

/// What the server said when a subscription started.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Subscribed {
    /// The channel's last offset when the subscription started.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// With `since`: whether everything after it follows.
    #[serde(default)]
    pub recovered: Option<bool>,
    /// With `recovered: true`: how many publications are replayed.
    #[serde(default)]
    pub missed: Option<u64>,
    /// With `recovered: false`: why not.
    #[serde(default)]
    pub reason: Option<String>,
}

enum Command {
    Request {
        frame: Value,
        reply: oneshot::Sender<Result<Value, Error>>,
    },
    PublishBytes {
        channel: String,
        payload: Bytes,
        reply: oneshot::Sender<Result<Value, Error>>,
    },
    Subscribe {
        channel: String,
        since: Option<(u64, String)>,
        events: mpsc::Sender<Event>,
        reply: oneshot::Sender<Result<Subscribed, Error>>,
    },
    Unsubscribe {
        channel: String,
    },
    Close,
}

/// A socket connection to a duplex server. Cheap to clone; the connection closes when the last
/// clone is dropped or [`Connection::close`] is called.
#[derive(Debug, Clone)]
pub struct Connection {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
}

/// How many commands wait for the connection (in the channel, and again while reconnecting).
const COMMAND_QUEUE: usize = 256;

/// How many events a subscription buffers before the connection waits for its reader (and the
/// server's slow-consumer policy takes over).
const SUBSCRIPTION_BUFFER: usize = 1024;

impl Connection {
    /// Connects, sends `connect` (with the token and meta, if any) and returns once the server
    /// accepted; later breaks are healed in the background.
    pub async fn connect(options: ConnectOptions) -> Result<Connection, Error> {
        let url = check_url(&options.url)?;
        let tls = match &options.tls {
            Some(tls) => tls.clone(),
            None => crate::tls::client_config(&options.ca_certs)?,
        };
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let mut driver = Driver {
            url,
            tls,
            options,
            commands,
            subs: HashMap::new(),
            deferred: VecDeque::new(),
            next_id: 1,
            status: watch::channel(Status::Reconnecting(0)).0,
        };
        let session = driver.open().await?;
        let status = driver.status.subscribe();
        tokio::spawn(driver.run(session));
        Ok(Connection {
            commands: commands_tx,
            status,
        })
    }

    /// The connection's state now; `.changed().await` on the receiver to follow it.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The server's id of the current connection (it changes on reconnect).
    pub fn client_id(&self) -> Option<String> {
        match &*self.status.borrow() {
            Status::Connected { client } => Some(client.clone()),
            _ => None,
        }
    }

    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| self.closed())?;
        answer.await.map_err(|_| self.closed())?
    }

    fn closed(&self) -> Error {
        match &*self.status.borrow() {
            Status::Closed(code) => Error::Closed(code.clone()),
            _ => Error::Closed(None),
        }
    }

    /// Sends a request frame (`type` and its fields; the id is added) and returns the reply's
    /// `result`, or the server's `error` as [`Error::Refused`].
    pub async fn request(&self, frame: Value) -> Result<Value, Error> {
        self.command(|reply| Command::Request { frame, reply })
            .await
    }

    /// Subscribes to a channel from now on.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, Error> {
        self.subscribe_from(channel, None).await
    }

    /// Subscribes and first replays what was published after `offset` of `epoch` (from a
    /// previous run); if the server cannot, the stream starts with [`Event::Gap`].
    pub async fn subscribe_since(
        &self,
        channel: &str,
        offset: u64,
        epoch: &str,
    ) -> Result<Subscription, Error> {
        self.subscribe_from(channel, Some((offset, epoch.to_owned())))
            .await
    }

    async fn subscribe_from(
        &self,
        channel: &str,
        since: Option<(u64, String)>,
    ) -> Result<Subscription, Error> {
        let (events, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let subscribed = self
            .command(|reply| Command::Subscribe {
                channel: channel.to_owned(),
                since,
                events,
                reply,
            })
            .await?;
        Ok(Subscription {
            channel: channel.to_owned(),
            subscribed,
            events: receiver,
            commands: self.commands.clone(),
        })
    }

    /// Publishes JSON on a channel.
    pub async fn publish(&self, channel: &str, data: &impl Serialize) -> Result<Published, Error> {
        let data = serde_json::to_value(data)
            .map_err(|e| Error::Protocol(format!("the data is not JSON: {e}")))?;
        let result = self
            .request(json!({"type": "publish", "channel": channel, "data": data}))
            .await?;
        parse(result)
    }

    /// Publishes bytes on a channel of a namespace with `binary` on, in a binary frame.
    pub async fn publish_bytes(&self, channel: &str, payload: Bytes) -> Result<Published, Error> {
        let result = self
            .command(|reply| Command::PublishBytes {
                channel: channel.to_owned(),
                payload,
                reply,
            })
            .await?;
        parse(result)
    }

    /// Who is subscribed to a channel with presence.
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, Error> {
        #[derive(Deserialize)]
        struct List {
            clients: Vec<PresenceEntry>,
        }
        let result = self
            .request(json!({"type": "presence", "channel": channel}))
            .await?;
        Ok(parse::<List>(result)?.clients)
    }

    /// A channel's last `limit` publications (`message` frames), or the ones after `since`.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Value, Error> {
        let mut frame = json!({"type": "history", "channel": channel});
        if let Some(since) = since {
            frame["since"] = since.into();
        }
        if let Some(limit) = limit {
            frame["limit"] = limit.into();
        }
        self.request(frame).await
    }

    /// Hands the server a fresh token for the same user before the current one expires.
    pub async fn refresh(&self, token: &str) -> Result<Value, Error> {
        self.request(json!({"type": "refresh", "token": token}))
            .await
    }

    /// Closes the connection; every subscription ends with [`Event::Ended`] (`closed`).
    pub async fn close(self) {
        let _ = self.commands.send(Command::Close).await;
        let mut status = self.status.clone();
        let _ = status.wait_for(|s| matches!(s, Status::Closed(_))).await;
    }
}

fn parse<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|e| Error::Protocol(format!("unexpected reply: {e}")))
}

/// The events of one channel; a [`Stream`] of [`Event`]s. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    subscribed: Subscribed,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// What the server said when the subscription started (offset, epoch, recovery).
    pub fn subscribed(&self) -> &Subscribed {
        &self.subscribed
    }

    /// The next event; `None` once the subscription ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Stream for Subscription {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Best effort: a full command queue means the connection is busy or gone; the driver
        // also unsubscribes when it finds the stream dropped.
        let _ = self.commands.try_send(Command::Unsubscribe {
            channel: std::mem::take(&mut self.channel),
        });
    }
}

/// A subscription as the driver keeps it across reconnects.
struct Sub {
    events: mpsc::Sender<Event>,
    /// The last offset delivered (or the channel's offset when the subscription started).
    offset: u64,
    epoch: Option<String>,
    state: SubState,
}

/// Where a subscription's stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// Publications are delivered as they come.
    Live,
    /// The reader fell a whole buffer behind: publications are dropped (not delivered, the
    /// offset stays) until there is room again, then the driver resubscribes `since` the last
    /// delivered offset so the server replays what was dropped. The driver never waits on a
    /// slow reader, so replies and other channels keep flowing.
    Lagging,
    /// A `subscribe` (after a reconnect or a lag) is on its way: everything is dropped until
    /// its reply, after which the replay comes in order.
    Resyncing,
}

enum Pending {
    Request(oneshot::Sender<Result<Value, Error>>),
    Subscribe {
        channel: String,
        reply: Option<oneshot::Sender<Result<Subscribed, Error>>>,
        /// The offset and epoch asked for with `since`, to report a gap from.
        since: Option<(u64, String)>,
    },
    Unsubscribe,
}

/// One live socket and what waits on it.
struct Session {
    transport: Transport,
    pending: HashMap<u64, Pending>,
    answers: mpsc::UnboundedReceiver<String>,
    answers_tx: mpsc::UnboundedSender<String>,
    /// How long the server may stay silent before the socket counts as dead.
    silence: Duration,
}

/// Why a session ended.
enum End {
    /// Closed by the client, or every handle dropped.
    Closed,
    /// The server said not to reconnect.
    Refused(String),
    /// The socket broke (or the server said to reconnect).
    Lost,
}

/// The fields of any server frame this client reads.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    reconnect: Option<bool>,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    meta: Option<Value>,
    #[serde(default)]
    limits: Option<Value>,
}

struct Driver {
    url: Url,
    tls: Arc<rustls::ClientConfig>,
    options: ConnectOptions,
    commands: mpsc::Receiver<Command>,
    subs: HashMap<String, Sub>,
    /// Commands taken while reconnecting, for the next session.
    deferred: VecDeque<Command>,
    next_id: u64,
    status: watch::Sender<Status>,
}

impl Driver {
    fn id(&mut self) -> u64 {
        let id = self.next_id;
        // Binary publishes carry a u32 id; stay inside it.
        self.next_id = if self.next_id >= u64::from(u32::MAX) {
            1
        } else {
            self.next_id + 1
        };
        id
    }

    /// Opens a socket and does the handshake: `connected`, length-prefixed framing on raw TCP,
    /// `connect` with the token and meta, and resubscribing every channel `since` its last offset.
    async fn open(&mut self) -> Result<Session, Error> {
        let mut transport = Transport::open(&self.url, &self.tls).await?;
        let connected = match tokio::time::timeout(Duration::from_secs(10), transport.next()).await
        {
            Ok(Some(Ok(Frame::Text(text)))) => serde_json::from_slice::<Incoming>(&text)
                .map_err(|e| Error::Protocol(format!("the first frame is not JSON: {e}")))?,
            Ok(Some(Err(error))) => return Err(error),
            Ok(_) => return Err(Error::Protocol("the server did not send connected".into())),
            Err(_) => return Err(Error::Timeout(Duration::from_secs(10))),
        };
        if connected.kind == "disconnect" {
            return Err(Error::Refused {
                code: connected.code.unwrap_or_default(),
                message: connected.message.unwrap_or_default(),
            });
        }
        if connected.kind != "connected" {
            return Err(Error::Protocol(format!(
                "expected connected, got {}",
                connected.kind
            )));
        }
        let client = connected.client.unwrap_or_default();
        let ping_ms = connected
            .limits
            .as_ref()
            .and_then(|l| l["ping_interval_ms"].as_u64())
            .unwrap_or(25_000);
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let mut session = Session {
            transport,
            pending: HashMap::new(),
            answers,
            answers_tx,
            silence: Duration::from_millis(ping_ms * 2 + 5_000),
        };
        if session.transport.is_tcp() {
            let id = self.id();
            let frame = json!({"type": "framing", "id": id, "mode": "length_prefixed"});
            self.handshake(&mut session, frame, id).await?;
            session.transport.switch_to_length_prefixed();
        }
        if self.options.token.is_some() || self.options.meta.is_some() {
            let id = self.id();
            let mut frame = json!({"type": "connect", "id": id});
            if let Some(token) = &self.options.token {
                frame["token"] = token.clone().into();
            }
            if let Some(meta) = &self.options.meta {
                frame["meta"] = meta.clone();
            }
            self.handshake(&mut session, frame, id).await?;
        }
        let channels: Vec<(String, Option<(u64, String)>)> = self
            .subs
            .iter()
            .map(|(channel, sub)| {
                let since = sub.epoch.clone().map(|epoch| (sub.offset, epoch));
                (channel.clone(), since)
            })
            .collect();
        for (channel, since) in channels {
            if let Some(sub) = self.subs.get_mut(&channel) {
                sub.state = SubState::Resyncing;
            }
            self.send_subscribe(&mut session, channel, since, None)
                .await?;
        }
        self.status.send_replace(Status::Connected { client });
        Ok(session)
    }

    /// Sends a request during the handshake and waits for its reply (nothing else is pending).
    async fn handshake(
        &mut self,
        session: &mut Session,
        frame: Value,
        id: u64,
    ) -> Result<(), Error> {
        session.transport.send_text(frame.to_string()).await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), session.transport.next())
                .await
                .map_err(|_| Error::Timeout(Duration::from_secs(10)))?
                .ok_or(Error::ConnectionLost)??;
            let Frame::Text(text) = frame else { continue };
            let incoming: Incoming = serde_json::from_slice(&text)
                .map_err(|e| Error::Protocol(format!("not JSON: {e}")))?;
            if incoming.id != Some(id) {
                continue;
            }
            return match incoming.kind.as_str() {
                "reply" => Ok(()),
                _ => Err(Error::Refused {
                    code: incoming.code.unwrap_or_default(),
                    message: incoming.message.unwrap_or_default(),
                }),
            };
        }
    }

    async fn send_subscribe(
        &mut self,
        session: &mut Session,
        channel: String,
        since: Option<(u64, String)>,
        reply: Option<oneshot::Sender<Result<Subscribed, Error>>>,
    ) -> Result<(), Error> {
        let id = self.id();
        let mut frame = json!({"type": "subscribe", "id": id, "channel": channel});
        if let Some((offset, epoch)) = &since {
            frame["since"] = json!({"offset": offset, "epoch": epoch});
        }
        session.pending.insert(
            id,
            Pending::Subscribe {
                channel,
                reply,
                since,
            },
        );
        session.transport.send_text(frame.to_string()).await
    }

    /// Serves sessions, reconnecting with backoff, until closed.
    async fn run(mut self, mut session: Session) {
        loop {
            let end = self.serve(&mut session).await;
            session.transport.close().await;
            for (_, pending) in session.pending.drain() {
                match pending {
                    Pending::Request(reply) => {
                        let _ = reply.send(Err(Error::ConnectionLost));
                    }
                    Pending::Subscribe {
                        reply: Some(reply), ..
                    } => {
                        let _ = reply.send(Err(Error::ConnectionLost));
                    }
                    Pending::Subscribe { .. } | Pending::Unsubscribe => {}
                }
            }
            let code = match end {
                End::Lost if self.options.reconnect => None,
                End::Lost => Some("connection_lost".to_owned()),
                End::Closed => Some("closed".to_owned()),
                End::Refused(code) => Some(code),
            };
            if let Some(code) = code {
                self.finish(code).await;
                return;
            }
            match self.reconnect().await {
                Some(next) => session = next,
                None => {
                    self.finish("closed".into()).await;
                    return;
                }
            }
        }
    }

    /// Ends every subscription and fails every waiting command.
    async fn finish(&mut self, code: String) {
        for (_, sub) in self.subs.drain() {
            let _ = sub.events.try_send(Event::Ended { code: code.clone() });
        }
        let closed_code = (code != "closed").then(|| code.clone());
        self.status
            .send_replace(Status::Closed(closed_code.clone()));
        self.commands.close();
        let mut waiting = std::mem::take(&mut self.deferred);
        while let Some(command) = self.commands.recv().await {
            waiting.push_back(command);
        }
        for command in waiting {
            let error = || Error::Closed(closed_code.clone());
            match command {
                Command::Request { reply, .. } | Command::PublishBytes { reply, .. } => {
                    let _ = reply.send(Err(error()));
                }
                Command::Subscribe { reply, .. } => {
                    let _ = reply.send(Err(error()));
                }
                Command::Unsubscribe { .. } | Command::Close => {}
            }
        }
    }

    /// Tries again and again with exponential backoff and jitter; `None` if every handle went
    /// away (or `close` was called) meanwhile. Commands that come in while it waits are kept,
    /// in order, for the next session.
    async fn reconnect(&mut self) -> Option<Session> {
        let mut attempt: u32 = 0;
        let mut wait = self.options.min_backoff;
        loop {
            attempt = attempt.saturating_add(1);
            self.status.send_replace(Status::Reconnecting(attempt));
            // Full jitter in [wait/2, wait], so a crowd of clients does not come back at once.
            let pause = tokio::time::sleep(wait.mul_f64(0.5 + fastrand::f64() * 0.5));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    // Bounded like the channel: past it, callers wait on the channel.
                    command = self.commands.recv(), if self.deferred.len() < COMMAND_QUEUE => match command {
                        None | Some(Command::Close) => return None,
                        Some(command) => self.deferred.push_back(command),
                    },
                }
            }
            match self.open().await {
                Ok(session) => return Some(session),
                Err(error) => {
                    tracing::debug!(%error, attempt, "reconnect failed");
                    wait = (wait * 2).min(self.options.max_backoff);
                }
            }
        }
    }

    async fn serve(&mut self, session: &mut Session) -> End {
        while let Some(command) = self.deferred.pop_front() {
            match self.on_command(session, command).await {
                Ok(true) => {}
                Ok(false) => return End::Closed,
                Err(_) => return End::Lost,
            }
        }
        let mut silence = Box::pin(tokio::time::sleep(session.silence));
        let mut lag_check = tokio::time::interval(Duration::from_millis(50));
        lag_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Only a lagging subscription needs the periodic check; an idle connection sleeps.
            let lagging = self.subs.values().any(|sub| sub.state == SubState::Lagging);
            tokio::select! {
                _ = lag_check.tick(), if lagging => {
                    if self.resync_lagging(session).await.is_err() {
                        return End::Lost;
                    }
                }
                frame = session.transport.next() => {
                    silence.as_mut().reset(tokio::time::Instant::now() + session.silence);
                    match frame {
                        Some(Ok(frame)) => {
                            if let Some(end) = self.on_frame(session, frame).await {
                                return end;
                            }
                        }
                        Some(Err(error)) => {
                            tracing::debug!(%error, "socket broke");
                            return End::Lost;
                        }
                        None => return End::Lost,
                    }
                }
                Some(answer) = session.answers.recv() => {
                    if session.transport.send_text(answer).await.is_err() {
                        return End::Lost;
                    }
                }
                command = self.commands.recv() => {
                    let Some(command) = command else { return End::Closed };
                    match self.on_command(session, command).await {
                        Ok(true) => {}
                        Ok(false) => return End::Closed,
                        Err(_) => return End::Lost,
                    }
                }
                () = &mut silence => {
                    tracing::debug!("the server went silent");
                    return End::Lost;
                }
            }
        }
    }

    /// Resubscribes, `since` their last delivered offset, the lagging subscriptions whose
    /// readers caught up by half a buffer.
    async fn resync_lagging(&mut self, session: &mut Session) -> Result<(), Error> {
        let ready: Vec<(String, Option<(u64, String)>)> = self
            .subs
            .iter_mut()
            .filter(|(_, sub)| {
                sub.state == SubState::Lagging && sub.events.capacity() >= SUBSCRIPTION_BUFFER / 2
            })
            .map(|(channel, sub)| {
                sub.state = SubState::Resyncing;
                (channel.clone(), sub.epoch.clone().map(|e| (sub.offset, e)))
            })
            .collect();
        for (channel, since) in ready {
            let id = self.id();
            session.pending.insert(id, Pending::Unsubscribe);
            let frame = json!({"type": "unsubscribe", "id": id, "channel": channel});
            session.transport.send_text(frame.to_string()).await?;
            self.send_subscribe(session, channel, since, None).await?;
        }
        Ok(())
    }

    /// Handles one command; `Ok(false)` to close.
    async fn on_command(&mut self, session: &mut Session, command: Command) -> Result<bool, Error> {
        match command {
            Command::Request { mut frame, reply } => {
                let id = self.id();
                frame["id"] = id.into();
                session.pending.insert(id, Pending::Request(reply));
                session.transport.send_text(frame.to_string()).await?;
            }
            Command::PublishBytes {
                channel,
                payload,
                reply,
            } => {
                let id = self.id();
                let frame = duplex_proto::binary::encode_publish(
                    u32::try_from(id).unwrap_or(u32::MAX),
                    &channel,
                    &payload,
                );
                session.pending.insert(id, Pending::Request(reply));
                session.transport.send_binary(frame).await?;
            }
            Command::Subscribe {
                channel,
                since,
                events,
                reply,
            } => {
                if self.subs.contains_key(&channel) {
                    let _ = reply.send(Err(Error::Refused {
                        code: "already_subscribed".into(),
                        message: format!("this connection already follows {channel}"),
                    }));
                    return Ok(true);
                }
                self.subs.insert(
                    channel.clone(),
                    Sub {
                        events,
                        offset: since.as_ref().map_or(0, |(offset, _)| *offset),
                        epoch: since.as_ref().map(|(_, epoch)| epoch.clone()),
                        state: SubState::Resyncing,
                    },
                );
                self.send_subscribe(session, channel, since, Some(reply))
                    .await?;
            }
            Command::Unsubscribe { channel } => {
                if self.subs.remove(&channel).is_some() {
                    let id = self.id();
                    session.pending.insert(id, Pending::Unsubscribe);
                    let frame = json!({"type": "unsubscribe", "id": id, "channel": channel});
                    session.transport.send_text(frame.to_string()).await?;
                }
            }
            Command::Close => return Ok(false),
        }
        Ok(true)
    }

    /// Handles one frame; `Some` when the session ends.
    async fn on_frame(&mut self, session: &mut Session, frame: Frame) -> Option<End> {
        let text = match frame {
            Frame::Binary(bytes) => {
                if let Ok(message) = duplex_proto::binary::decode_message(&bytes) {
                    let payload =
                        Payload::Binary(bytes.slice(bytes.len() - message.payload.len()..));
                    let channel = message.channel.to_owned();
                    self.deliver(session, &channel, message.offset, payload)
                        .await;
                }
                return None;
            }
            Frame::Text(text) => text,
        };
        let incoming: Incoming = match serde_json::from_slice(&text) {
            Ok(incoming) => incoming,
            Err(error) => {
                tracing::warn!(%error, "the server sent a frame this client cannot read");
                return None;
            }
        };
        match incoming.kind.as_str() {
            "message" => {
                let (Some(channel), Some(offset)) = (incoming.channel, incoming.offset) else {
                    return None;
                };
                let payload = Payload::Json(incoming.data.unwrap_or(Value::Null));
                self.deliver(session, &channel, offset, payload).await;
            }
            "reply" | "error" => return self.on_answer(session, incoming).await,
            "request" => {
                let id = incoming.id?;
                let data = incoming.data.unwrap_or(Value::Null);
                let answers = session.answers_tx.clone();
                let handler = self.options.handler.clone();
                tokio::spawn(async move {
                    let answer = match handler {
                        Some(handler) => handler(data).await,
                        None => Err(RequestError {
                            code: "no_handler".into(),
                            message: "this client answers no requests".into(),
                        }),
                    };
                    let frame = match answer {
                        Ok(result) => json!({"type": "reply", "id": id, "result": result}),
                        Err(e) => {
                            json!({"type": "error", "id": id, "code": e.code, "message": e.message})
                        }
                    };
                    let _ = answers.send(frame.to_string());
                });
            }
            kind @ ("join" | "leave") => {
                let channel = incoming.channel?;
                let entry = PresenceEntry {
                    client: incoming.client.unwrap_or_default(),
                    user: incoming.user,
                    meta: incoming.meta,
                };
                let event = if kind == "join" {
                    Event::Join(entry)
                } else {
                    Event::Leave(entry)
                };
                // Presence events are advisory: a full buffer drops them (ask `presence` again).
                if let Some(sub) = self.subs.get(&channel)
                    && sub.state == SubState::Live
                {
                    let _ = sub.events.try_send(event);
                }
            }
            "unsubscribed" => {
                // The server ended the subscription (the connection's refreshed token no longer
                // allows it): it is not resubscribed.
                let channel = incoming.channel?;
                if let Some(sub) = self.subs.remove(&channel) {
                    let code = incoming.code.unwrap_or_else(|| "unsubscribed".to_owned());
                    tracing::info!(channel, code, "the server ended a subscription");
                    let _ = sub.events.try_send(Event::Ended { code });
                }
            }
            "ping" => {
                let pong = session
                    .transport
                    .send_text(r#"{"type":"pong"}"#.to_owned())
                    .await;
                return pong.is_err().then_some(End::Lost);
            }
            "disconnect" => {
                let code = incoming.code.unwrap_or_default();
                tracing::info!(
                    code,
                    reason = incoming.message.as_deref(),
                    "the server disconnected"
                );
                return Some(if incoming.reconnect.unwrap_or(true) {
                    End::Lost
                } else {
                    End::Refused(code)
                });
            }
            _ => {}
        }
        None
    }

    /// Handles a `reply` or `error`; `Some` when the connection should be dropped and made
    /// again (a resubscription the server could not serve for now).
    async fn on_answer(&mut self, session: &mut Session, incoming: Incoming) -> Option<End> {
        let Some(pending) = incoming.id.and_then(|id| session.pending.remove(&id)) else {
            if incoming.kind == "error" {
                tracing::warn!(
                    code = incoming.code,
                    message = incoming.message,
                    "server error"
                );
            }
            return None;
        };
        let refused = || Error::Refused {
            code: incoming.code.clone().unwrap_or_default(),
            message: incoming.message.clone().unwrap_or_default(),
        };
        let ok = incoming.kind == "reply";
        match pending {
            Pending::Request(reply) => {
                let answer = if ok {
                    Ok(incoming.result.clone().unwrap_or(Value::Null))
                } else {
                    Err(refused())
                };
                let _ = reply.send(answer);
            }
            Pending::Unsubscribe => {}
            Pending::Subscribe {
                channel,
                reply,
                since,
            } => {
                if !ok {
                    let error = refused();
                    // The node cannot reach its broker right now: keep the subscription and
                    // try again on a fresh connection, after the usual backoff (perhaps on
                    // another node).
                    if reply.is_none() && error.code() == Some("unavailable") {
                        tracing::warn!(channel, "resubscribing failed for now; reconnecting");
                        return Some(End::Lost);
                    }
                    if let Some(sub) = self.subs.remove(&channel) {
                        let code = error.code().unwrap_or("refused").to_owned();
                        if reply.is_none() {
                            let _ = sub.events.try_send(Event::Ended { code });
                        }
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(error));
                    }
                    return None;
                }
                let subscribed: Subscribed =
                    match serde_json::from_value(incoming.result.clone().unwrap_or(Value::Null)) {
                        Ok(subscribed) => subscribed,
                        Err(e) => {
                            if let Some(reply) = reply {
                                let _ = reply.send(Err(Error::Protocol(e.to_string())));
                            }
                            return None;
                        }
                    };
                let sub = self.subs.get_mut(&channel)?;
                let gap = match (&since, subscribed.recovered) {
                    (Some((last_seen, _)), Some(false)) => Some(Event::Gap {
                        reason: subscribed.reason.clone().unwrap_or_default(),
                        last_seen: *last_seen,
                        resumed_at: subscribed.offset,
                        epoch: subscribed.epoch.clone(),
                    }),
                    _ => None,
                };
                // Live from the channel's offset, unless the missed ones are being replayed.
                if subscribed.recovered != Some(true) {
                    sub.offset = subscribed.offset;
                }
                sub.epoch = Some(subscribed.epoch.clone());
                sub.state = SubState::Live;
                if let Some(gap) = gap {
                    // Resubscribing waits for half a free buffer, so this fits.
                    let _ = sub.events.try_send(gap);
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(subscribed));
                }
            }
        }
        None
    }

    /// Delivers a publication to its subscription, once: offsets at or below the last one
    /// delivered are replays already seen. Never waits: a full buffer makes the subscription
    /// lag (see [`SubState::Lagging`]).
    async fn deliver(&mut self, session: &mut Session, channel: &str, offset: u64, data: Payload) {
        let Some(sub) = self.subs.get_mut(channel) else {
            return;
        };
        if sub.state != SubState::Live || offset <= sub.offset {
            return;
        }
        let message = Message {
            channel: channel.to_owned(),
            offset,
            epoch: sub.epoch.clone().unwrap_or_default(),
            data,
        };
        match sub.events.try_send(Event::Message(message)) {
            Ok(()) => sub.offset = offset,
            Err(mpsc::error::TrySendError::Full(_)) => sub.state = SubState::Lagging,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.subs.remove(channel);
                let id = self.id();
                session.pending.insert(id, Pending::Unsubscribe);
                let frame = json!({"type": "unsubscribe", "id": id, "channel": channel});
                let _ = session.transport.send_text(frame.to_string()).await;
            }
        }
    }
}
