//! Webhooks: the application's backend is told what happened — connections, subscriptions,
//! publications, record writes — at least once, in order per connection and per channel, and
//! every `connected` is followed by exactly one `disconnected`, even when the node that held
//! the connection was killed.
//!
//! How:
//! - Events are written to the **outbox in the store** ([`crate::store::outbox`]): record
//!   events in the record write's own transaction; connection events by one recorder task that
//!   gathers them into one transaction per batch, with the change to the node's table of open
//!   connections; `published` before the publisher is answered.
//! - One delivery task per node POSTs its events in order, in batches, signed, and retries a
//!   failed batch with backoff (0.5 s doubling to 30 s) until it is taken or older than
//!   `max_age`; a batch is removed from the outbox only once the backend answered 2xx.
//! - Each node says it is alive every `node_expiry / 3`. A node that starts, and every node
//!   now and then, takes over the nodes not heard from within `node_expiry` (a SQLite file has
//!   one server: whatever another node left in it is taken at start): their open connections
//!   get `disconnected` with `reason: "node_lost"`, their undelivered events become the
//!   taker's.
//! - The outbox is bounded (`max_events` per node): a full outbox drops new events (counted in
//!   `duplex_webhook_events_dropped_total{reason="full"}`, logged) and never holds up publishing.

mod deliver;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::hub::connection::ConnectionHandle;
use crate::hub::publication::Payload;
use crate::metrics::Metrics;
use crate::store::outbox::{Live, NewEvent};

pub(crate) use deliver::start;

/// What the backend can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum EventKind {
    /// A socket connection opened.
    #[serde(rename = "connected")]
    Connected,
    /// A socket connection closed (or its node was lost).
    #[serde(rename = "disconnected")]
    Disconnected,
    /// A connection subscribed to a channel.
    #[serde(rename = "subscribed")]
    Subscribed,
    /// A connection's subscription ended (its own `unsubscribe`, or the server's).
    #[serde(rename = "unsubscribed")]
    Unsubscribed,
    /// A publication was made (by a client or the server API).
    #[serde(rename = "published")]
    Published,
    /// A record was created.
    #[serde(rename = "record.created")]
    RecordCreated,
    /// A record was updated.
    #[serde(rename = "record.updated")]
    RecordUpdated,
    /// A record was deleted.
    #[serde(rename = "record.deleted")]
    RecordDeleted,
}

impl EventKind {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// `[webhooks]` in `duplex.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where duplex POSTs the events (`http://`).
    pub url: String,
    /// The key of the `Duplex-Signature` HMAC; unsigned without one.
    #[serde(default)]
    pub secret: Option<String>,
    /// Which events are sent.
    pub events: Vec<EventKind>,
    /// How long an event is retried before it is dropped (`1d` by default).
    #[serde(default)]
    pub max_age: Option<String>,
    /// How many events one node keeps waiting at most (1,000,000 by default).
    #[serde(default)]
    pub max_events: Option<u64>,
    /// Events per POST at most (100 by default).
    #[serde(default)]
    pub batch: Option<usize>,
    /// How long one POST may take (`10s` by default).
    #[serde(default)]
    pub timeout: Option<String>,
    /// After how long without a sign of life a node is taken for lost (`30s` by default).
    #[serde(default)]
    pub node_expiry: Option<String>,
}

/// The webhooks in effect, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Where duplex POSTs.
    pub url: String,
    /// The signature key.
    pub secret: Option<String>,
    events: u8,
    /// How long an event is retried.
    pub max_age: Duration,
    /// Events one node keeps waiting at most.
    pub max_events: u64,
    /// Events per POST.
    pub batch: usize,
    /// How long one POST may take.
    pub timeout: Duration,
    /// After how long without a sign of life a node is lost.
    pub node_expiry: Duration,
}

impl WebhooksConfig {
    /// Checks the table.
    pub fn settings(self) -> Result<WebhookSettings, String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "url: {:?} must be http:// (webhooks go to a backend on a private network)",
                self.url
            ));
        }
        if self.events.is_empty() {
            return Err("events: name at least one event".into());
        }
        let duration = |key: &str, text: &Option<String>, default: Duration| match text {
            Some(text) => crate::units::parse_duration(text)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("{key}: {text:?} is not a duration such as 30s or 1d")),
            None => Ok(default),
        };
        let batch = self.batch.unwrap_or(100);
        if !(1..=10_000).contains(&batch) {
            return Err("batch: from 1 to 10000 events".into());
        }
        Ok(WebhookSettings {
            url: self.url,
            secret: self.secret.filter(|s| !s.is_empty()),
            events: self.events.iter().fold(0, |set, kind| set | kind.bit()),
            max_age: duration("max_age", &self.max_age, Duration::from_secs(86_400))?,
            max_events: self.max_events.unwrap_or(1_000_000).max(1),
            batch,
            timeout: duration("timeout", &self.timeout, Duration::from_secs(10))?,
            node_expiry: duration("node_expiry", &self.node_expiry, Duration::from_secs(30))?,
        })
    }
}

impl WebhookSettings {
    /// Whether `kind` is sent.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events & kind.bit() != 0
    }
}

/// The JSON of one event: `{"id","event","at","node","client","user", …fields}`; `fields` is
/// the event's own members, already JSON (`"channel":"chat:a","offset":3`), or empty.
pub(crate) fn event_body(
    event: &str,
    at_us: i64,
    node: &str,
    client: Option<&str>,
    user: Option<&str>,
    fields: &str,
) -> String {
    #[derive(Serialize)]
    struct Head<'a> {
        id: String,
        event: &'a str,
        at: String,
        node: &'a str,
        client: Option<&'a str>,
        user: Option<&'a str>,
    }
    let mut body = serde_json::to_string(&Head {
        id: uuid::Uuid::new_v4().simple().to_string(),
        event,
        at: crate::store::rfc3339_micros(at_us),
        node,
        client,
        user,
    })
    .expect("an event head serializes");
    if !fields.is_empty() {
        body.pop();
        body.push(',');
        body.push_str(fields);
        body.push('}');
    }
    body
}

/// What a connection's events say about it, kept in the node's table of open connections so
/// that its `disconnected` can be sent by another node.
#[derive(Debug, Serialize, Deserialize)]
struct ConnectionInfo {
    client: String,
    user: Option<String>,
    transport: String,
    address: Option<String>,
    node: String,
}

/// One event on its way to the outbox.
#[derive(Debug)]
struct Emitted {
    event: NewEvent,
    live: Option<Live>,
    /// Told once the event is in the outbox.
    done: Option<oneshot::Sender<()>>,
}

/// How many events a node has waiting, against its bound.
#[derive(Debug)]
pub(crate) struct Budget {
    waiting: AtomicU64,
    max: u64,
    /// Whether the last event found the outbox full (logged once per filling).
    full: AtomicBool,
}

impl Budget {
    pub(crate) fn new(max: u64) -> Budget {
        Budget {
            waiting: AtomicU64::new(0),
            max,
            full: AtomicBool::new(false),
        }
    }

    /// Takes room for one event, or says the outbox is full (and logs it once per filling).
    pub(crate) fn take(&self, metrics: &Metrics) -> bool {
        let taken = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            self.full.store(false, Ordering::Relaxed);
        } else {
            metrics
                .webhook_dropped
                .get_or_create(&crate::metrics::ReasonLabels { reason: "full" })
                .inc();
            if !self.full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_events = self.max,
                    "the webhook outbox is full: new events are dropped until the backend takes some"
                );
            }
        }
        taken
    }

    /// Counts `n` events whatever the bound (a `disconnected` owed).
    pub(crate) fn add(&self, n: u64) {
        self.waiting.fetch_add(n, Ordering::Relaxed);
    }

    /// Gives back room for `n` events (delivered, dropped, or never written).
    pub(crate) fn release(&self, n: u64) {
        let _ = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_sub(n))
            });
    }

    /// Sets the count from the outbox itself.
    pub(crate) fn set(&self, n: u64) {
        self.waiting.store(n, Ordering::Relaxed);
    }

    /// Events waiting.
    pub(crate) fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// How long a publisher waits at most for its `published` event to be in the outbox.
const PUBLISHED_WAIT: Duration = Duration::from_secs(5);

/// Events queued for the recorder at most; past that they are dropped as if the outbox were
/// full (the recorder cannot keep up with the store).
const QUEUE: usize = 65_536;

/// A node's webhooks: what emits events.
#[derive(Debug)]
pub(crate) struct Webhooks {
    settings: WebhookSettings,
    node: String,
    queue: mpsc::Sender<Emitted>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// The webhooks of `node`, and the receiving end the recorder drains.
    fn new(
        settings: WebhookSettings,
        node: String,
        budget: Arc<Budget>,
        metrics: Arc<Metrics>,
    ) -> (Webhooks, mpsc::Receiver<Emitted>) {
        let (queue, receiver) = mpsc::channel(QUEUE);
        (
            Webhooks {
                settings,
                node,
                queue,
                budget,
                metrics,
            },
            receiver,
        )
    }

    /// Whether `kind` is sent.
    pub(crate) fn wants(&self, kind: EventKind) -> bool {
        self.settings.wants(kind)
    }

    /// Queues an event for the outbox; false when it was dropped. A full outbox drops new
    /// events, an opening connection's whole (no `connected`, no row: no `disconnected` owed
    /// either), but never a `disconnected` owed for a `connected` it took: those go past the
    /// bound (at most one per connection it told about), so every pair stays whole.
    fn emit(&self, emitted: Emitted) -> bool {
        let counted = is_event(&emitted.event);
        if counted {
            if matches!(emitted.live, Some(Live::Closed { .. })) {
                self.budget.add(1);
            } else if !self.budget.take(&self.metrics) {
                return false;
            }
        }
        match self.queue.try_send(emitted) {
            Ok(()) => true,
            Err(_) => {
                if counted {
                    self.budget.release(1);
                }
                self.metrics
                    .webhook_dropped
                    .get_or_create(&crate::metrics::ReasonLabels { reason: "full" })
                    .inc();
                false
            }
        }
    }

    fn info(&self, connection: &ConnectionHandle) -> ConnectionInfo {
        ConnectionInfo {
            client: connection.id.to_string(),
            user: connection.user().map(|u| u.to_string()),
            transport: connection.transport.to_owned(),
            address: connection.remote.map(|a| a.to_string()),
            node: self.node.clone(),
        }
    }

    fn connection_event(&self, kind: &str, info: &ConnectionInfo, fields: &str) -> NewEvent {
        let at_us = crate::store::now_micros();
        let mut all = format!(
            "\"transport\":{},\"address\":{}",
            json_string(&info.transport),
            info.address
                .as_deref()
                .map_or_else(|| "null".to_owned(), json_string)
        );
        if !fields.is_empty() {
            all.push(',');
            all.push_str(fields);
        }
        NewEvent {
            at_us,
            body: event_body(
                kind,
                at_us,
                &info.node,
                Some(&info.client),
                info.user.as_deref(),
                &all,
            ),
        }
    }

    /// A socket connection opened: `connected`, and its row among the open connections (even
    /// when `connected` is not sent, so that `disconnected` can be). False when nothing was
    /// queued (not wanted, or the outbox is full): the connection's later events about its
    /// row (`identified`, `disconnected`) are then not sent either.
    pub(crate) fn connected(&self, connection: &ConnectionHandle) -> bool {
        let info = self.info(connection);
        let event = self.connection_event("connected", &info, "");
        let live = Live::Open {
            client: info.client.clone(),
            info: serde_json::to_string(&info).expect("connection info serializes"),
        };
        if self.wants(EventKind::Connected) || self.wants(EventKind::Disconnected) {
            // Without `connected` wanted, the row alone is written (an event-less append).
            let event = if self.wants(EventKind::Connected) {
                event
            } else {
                no_event()
            };
            self.emit(Emitted {
                event,
                live: Some(live),
                done: None,
            })
        } else {
            false
        }
    }

    /// A connection's user became known (`connect`): its row is updated, so that a
    /// `disconnected` sent by another node names it.
    pub(crate) fn identified(&self, connection: &ConnectionHandle) {
        if !self.wants(EventKind::Disconnected) {
            return;
        }
        let info = self.info(connection);
        self.emit(Emitted {
            event: no_event(),
            live: Some(Live::Open {
                client: info.client.clone(),
                info: serde_json::to_string(&info).expect("connection info serializes"),
            }),
            done: None,
        });
    }

    /// A socket connection closed, for `reason`.
    pub(crate) fn disconnected(&self, connection: &ConnectionHandle, reason: &str) {
        if !(self.wants(EventKind::Connected) || self.wants(EventKind::Disconnected)) {
            return;
        }
        let info = self.info(connection);
        let event = if self.wants(EventKind::Disconnected) {
            self.connection_event(
                "disconnected",
                &info,
                &format!("\"reason\":{}", json_string(reason)),
            )
        } else {
            no_event()
        };
        self.emit(Emitted {
            event,
            live: Some(Live::Closed {
                client: info.client,
            }),
            done: None,
        });
    }

    /// A connection subscribed.
    pub(crate) fn subscribed(&self, connection: &ConnectionHandle, channel: &str) {
        if !self.wants(EventKind::Subscribed) {
            return;
        }
        let info = self.info(connection);
        let event = self.connection_event(
            "subscribed",
            &info,
            &format!("\"channel\":{}", json_string(channel)),
        );
        self.emit(Emitted {
            event,
            live: None,
            done: None,
        });
    }

    /// A connection's subscription ended: `client` (its own `unsubscribe`) or
    /// `permission_denied` (the server ended it).
    pub(crate) fn unsubscribed(&self, connection: &ConnectionHandle, channel: &str, reason: &str) {
        if !self.wants(EventKind::Unsubscribed) {
            return;
        }
        let info = self.info(connection);
        let event = self.connection_event(
            "unsubscribed",
            &info,
            &format!(
                "\"channel\":{},\"reason\":{}",
                json_string(channel),
                json_string(reason)
            ),
        );
        self.emit(Emitted {
            event,
            live: None,
            done: None,
        });
    }

    /// A publication was made (by `connection`, or by the server API when `None`): queues its
    /// event (in the channel's order when called under the channel's lock, as
    /// [`crate::hub::Hub::publish_told`] does); await [`Webhooks::written`] with what it
    /// returns before answering the publisher.
    pub(crate) fn published(
        &self,
        connection: Option<&ConnectionHandle>,
        channel: &str,
        offset: u64,
        payload: &Payload,
    ) -> Option<oneshot::Receiver<()>> {
        if !self.wants(EventKind::Published) {
            return None;
        }
        let data = match payload {
            Payload::Json(data) => format!("\"data\":{}", data.get()),
            Payload::Binary(bytes) => {
                use base64::Engine as _;
                format!(
                    "\"data\":\"{}\",\"encoding\":\"base64\"",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                )
            }
        };
        let fields = format!(
            "\"channel\":{},\"offset\":{offset},{data}",
            json_string(channel)
        );
        let at_us = crate::store::now_micros();
        let user = connection.and_then(|c| c.user());
        let client = connection.map(|c| c.id.to_string());
        let event = NewEvent {
            at_us,
            body: event_body(
                "published",
                at_us,
                &self.node,
                client.as_deref(),
                user.as_deref(),
                &fields,
            ),
        };
        let (done, written) = oneshot::channel();
        self.emit(Emitted {
            event,
            live: None,
            done: Some(done),
        })
        .then_some(written)
    }

    /// Completes once a `published` event is in the outbox: the publisher is answered after.
    /// A store that does not answer must not hold publishing up for good: past
    /// [`PUBLISHED_WAIT`] the publisher is answered, and the event is written when the store is
    /// back.
    pub(crate) async fn written(written: Option<oneshot::Receiver<()>>) {
        if let Some(written) = written
            && tokio::time::timeout(PUBLISHED_WAIT, written).await.is_err()
        {
            tracing::warn!(
                "a published event is not in the outbox yet; answering the publisher anyway"
            );
        }
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// The `disconnected` event of a connection a lost node held, sent by `taker`.
fn lost_event(info: &str, taker: &str) -> NewEvent {
    let at_us = crate::store::now_micros();
    let info: ConnectionInfo = serde_json::from_str(info).unwrap_or(ConnectionInfo {
        client: String::new(),
        user: None,
        transport: String::new(),
        address: None,
        node: String::new(),
    });
    let fields = format!(
        "\"transport\":{},\"address\":{},\"reason\":\"node_lost\",\"taken_over_by\":{}",
        json_string(&info.transport),
        info.address
            .as_deref()
            .map_or_else(|| "null".to_owned(), json_string),
        json_string(taker)
    );
    NewEvent {
        at_us,
        body: event_body(
            "disconnected",
            at_us,
            &info.node,
            Some(&info.client),
            info.user.as_deref(),
            &fields,
        ),
    }
}

/// Whether `outbox` events are real (an append of a row change alone carries an empty one).
fn is_event(event: &NewEvent) -> bool {
    !event.body.is_empty()
}

/// What a row change that tells nothing carries.
fn no_event() -> NewEvent {
    NewEvent {
        at_us: 0,
        body: String::new(),
    }
}

/// Wakes the delivery task.
pub(crate) type Wake = Arc<Notify>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_check_the_table() {
        let table: WebhooksConfig = toml::from_str(
            "url = \"http://127.0.0.1:9/e\"\nevents = [\"connected\", \"record.created\"]\nmax_age = \"1h\"\nnode_expiry = \"5s\"",
        )
        .expect("toml");
        let settings = table.settings().expect("valid");
        assert!(settings.wants(EventKind::Connected) && settings.wants(EventKind::RecordCreated));
        assert!(!settings.wants(EventKind::Published));
        assert_eq!(settings.max_age, Duration::from_secs(3600));
        assert_eq!(settings.node_expiry, Duration::from_secs(5));
        assert_eq!((settings.batch, settings.max_events), (100, 1_000_000));
        for bad in [
            "url = \"https://x\"\nevents = [\"connected\"]",
            "url = \"http://x\"\nevents = []",
            "url = \"http://x\"\nevents = [\"connected\"]\nmax_age = \"soon\"",
            "url = \"http://x\"\nevents = [\"connected\"]\nbatch = 0",
        ] {
            let table: WebhooksConfig = toml::from_str(bad).expect("toml");
            assert!(table.settings().is_err(), "{bad}");
        }
        assert!(
            toml::from_str::<WebhooksConfig>("url = \"http://x\"\nevents = [\"kicked\"]").is_err()
        );
    }

    #[test]
    fn an_event_is_one_json_object_with_its_head_and_fields() {
        let body = event_body(
            "subscribed",
            1_700_000_000_000_001,
            "n1",
            Some("abc"),
            None,
            "\"channel\":\"chat:a\"",
        );
        let event: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(event["event"], "subscribed");
        assert_eq!(event["node"], "n1");
        assert_eq!(event["client"], "abc");
        assert_eq!(event["user"], serde_json::Value::Null);
        assert_eq!(event["channel"], "chat:a");
        assert_eq!(event["at"], "2023-11-14T22:13:20.000001Z");
        assert_eq!(event["id"].as_str().map(str::len), Some(32));
        let other = event_body("subscribed", 0, "n1", None, None, "");
        assert_ne!(
            serde_json::from_str::<serde_json::Value>(&other).expect("JSON")["id"],
            event["id"]
        );
    }

    #[test]
    fn a_lost_connection_s_disconnected_names_its_node_user_and_taker() {
        let info = serde_json::to_string(&ConnectionInfo {
            client: "c1".into(),
            user: Some("ana".into()),
            transport: "websocket".into(),
            address: Some("127.0.0.1:5".into()),
            node: "dead".into(),
        })
        .expect("JSON");
        let event: serde_json::Value =
            serde_json::from_str(&lost_event(&info, "alive").body).expect("JSON");
        assert_eq!(event["event"], "disconnected");
        assert_eq!(event["reason"], "node_lost");
        assert_eq!(event["client"], "c1");
        assert_eq!(event["user"], "ana");
        assert_eq!(event["node"], "dead");
        assert_eq!(event["taken_over_by"], "alive");
    }

    #[test]
    fn the_budget_bounds_waiting_events() {
        let metrics = Metrics::new();
        let budget = Budget::new(2);
        assert!(budget.take(&metrics) && budget.take(&metrics));
        assert!(!budget.take(&metrics));
        budget.release(1);
        assert!(budget.take(&metrics));
        assert_eq!(budget.waiting(), 2);
    }
}
