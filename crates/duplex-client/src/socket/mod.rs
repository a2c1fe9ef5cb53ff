//! The socket side: one [`Connection`] that reconnects by itself and resubscribes every channel
//! `since` the last offset it delivered, so a [`Subscription`] has no gaps across reconnects, or
//! says plainly ([`Event::Gap`]) when the server could not replay what was missed.
//!
//! One task per connection owns the socket; handles talk to it over a bounded channel. While it
//! reconnects, requests wait in that channel; a request already sent when the socket broke fails
//! with [`Error::ConnectionLost`] (it may or may not have run).

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

use crate::Error;
use crate::http::{PresenceEntry, Published};
use crate::transport::check_url;
use driver::Driver;

mod driver;
mod incoming;

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
    /// goes on after `resumed_at`, and publications after `last_seen` up to it are missing
    /// (refetch them over HTTP if they matter). With `epoch_changed`, what is missing is the old
    /// epoch's tail; `resumed_at` 0 means the new epoch follows whole, from its first offset.
    Gap {
        /// The server's `reason`: `epoch_changed`, `history_trimmed`, `offset_ahead`, …
        reason: String,
        /// The last offset this subscription delivered before (in the old epoch).
        last_seen: u64,
        /// The offset the stream resumes after, in the new epoch: the channel's offset, or 0
        /// when the new epoch is replayed from its first publication.
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
    /// How many publications follow the reply, replayed: those after `since` when recovered;
    /// with `recovered: false` (`epoch_changed`), the new epoch's from its first offset when the
    /// server keeps them all.
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
pub(super) const COMMAND_QUEUE: usize = 256;

/// How many events a subscription buffers before the connection waits for its reader (and the
/// server's slow-consumer policy takes over).
pub(super) const SUBSCRIPTION_BUFFER: usize = 1024;

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
        let mut driver = Driver::new(url, tls, options, commands);
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

    /// [`publish`](Self::publish) with an idempotency key: a retry with the same key and data
    /// within 2 minutes (after [`Error::ConnectionLost`], say, when the first attempt may or
    /// may not have run) gets the first publication's answer (`replayed`) instead of
    /// publishing again.
    pub async fn publish_once(
        &self,
        channel: &str,
        data: &impl Serialize,
        key: &str,
    ) -> Result<Published, Error> {
        let data = serde_json::to_value(data)
            .map_err(|e| Error::Protocol(format!("the data is not JSON: {e}")))?;
        let result = self
            .request(json!({"type": "publish", "channel": channel, "data": data, "idempotency_key": key}))
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

    /// Calls the application's backend through the server (its `rpc` hook): the backend's
    /// `result`, or its refusal as [`Error::Refused`] with the backend's own code.
    pub async fn rpc(&self, method: &str, data: &impl Serialize) -> Result<Value, Error> {
        let data = serde_json::to_value(data)
            .map_err(|e| Error::Protocol(format!("the data is not JSON: {e}")))?;
        self.request(json!({"type": "rpc", "method": method, "data": data}))
            .await
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
