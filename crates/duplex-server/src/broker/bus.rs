//! What every broker engine sends between nodes besides publications, in the same form: a
//! message whose first byte says what it is.
//!
//! - `e` a presence frame: `u16 channel length | channel | u64 client | frame`, for the
//!   subscribers of the channel on every node but `client`;
//! - `q` a server request for a connection on some node (JSON [`BusRequest`]);
//! - `a` its answer (JSON [`BusAnswer`]), addressed to the asking node. Every other live node
//!   answers `absent`, so a connection nobody holds is known at once instead of timing out;
//! - `u` a server request for every connection of a user (JSON [`BusUserRequest`]), and `v`
//!   each other node's answers (JSON [`BusUserAnswers`], perhaps none).
//!
//! An engine carries these on one channel or subject all nodes listen to ([`BusLink`]) and
//! hands what arrives to [`Bus::on_message`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use duplex_proto::frames::{Join, Leave, to_json};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::{BrokerError, BrokerEvents, NodeInfo, Present, UserAnswer};
use crate::model::{ClientAnswer, ConnectionId, RequestError};

/// Sends a message to every node.
#[async_trait]
pub(crate) trait BusLink: Send + Sync + 'static {
    /// Sends `message` on the bus.
    async fn send(&self, message: Vec<u8>) -> Result<(), BrokerError>;
}

/// A request waiting for another node's answer.
struct Waiting {
    /// Nodes that have yet to say the connection is not theirs.
    absent_left: usize,
    answer: oneshot::Sender<Result<ClientAnswer, RequestError>>,
}

/// A server request on the bus.
#[derive(Debug, Serialize, Deserialize)]
struct BusRequest<'a> {
    from: &'a str,
    id: u64,
    client: &'a str,
    timeout_ms: u64,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// An answer to a [`BusRequest`].
#[derive(Debug, Serialize, Deserialize)]
struct BusAnswer<'a> {
    to: &'a str,
    id: u64,
    /// `result`, `error`, `absent`, `timeout`, `closed` or `busy`.
    outcome: &'a str,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// A user-wide request on the bus.
#[derive(Debug, Serialize, Deserialize)]
struct BusUserRequest<'a> {
    from: &'a str,
    id: u64,
    user: &'a str,
    timeout_ms: u64,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// One node's answers to a [`BusUserRequest`].
#[derive(Debug, Serialize, Deserialize)]
struct BusUserAnswers<'a> {
    to: &'a str,
    id: u64,
    #[serde(borrow)]
    answers: Vec<BusOutcome<'a>>,
}

/// One connection's answer, as [`BusAnswer`] carries it.
#[derive(Debug, Serialize, Deserialize)]
struct BusOutcome<'a> {
    #[serde(default, skip_serializing_if = "str::is_empty")]
    client: &'a str,
    /// `result`, `error`, `absent`, `timeout`, `closed` or `busy`.
    outcome: &'a str,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl<'a> BusOutcome<'a> {
    fn of(client: &'a str, answer: &'a Result<ClientAnswer, RequestError>) -> Self {
        let (outcome, result, code, message) = match answer {
            Ok(ClientAnswer::Result(result)) => ("result", Some(&**result), None, None),
            Ok(ClientAnswer::Error { code, message }) => {
                ("error", None, Some(code.clone()), Some(message.clone()))
            }
            Err(RequestError::NotConnected) => ("absent", None, None, None),
            Err(RequestError::Timeout) => ("timeout", None, None, None),
            Err(RequestError::Closed) => ("closed", None, None, None),
            Err(RequestError::TooManyPending | RequestError::BrokerUnavailable) => {
                ("busy", None, None, None)
            }
        };
        BusOutcome {
            client,
            outcome,
            result,
            code,
            message,
        }
    }

    fn answer(self) -> Result<ClientAnswer, RequestError> {
        match self.outcome {
            "result" => Ok(ClientAnswer::Result(self.result.map_or_else(
                || RawValue::from_string("null".into()).expect("null is JSON"),
                ToOwned::to_owned,
            ))),
            "error" => Ok(ClientAnswer::Error {
                code: self.code.unwrap_or_default(),
                message: self.message.unwrap_or_default(),
            }),
            "absent" => Err(RequestError::NotConnected),
            "timeout" => Err(RequestError::Timeout),
            "busy" => Err(RequestError::TooManyPending),
            _ => Err(RequestError::Closed),
        }
    }
}

/// A user-wide request waiting for the other nodes.
struct WaitingForUser {
    /// Nodes yet to answer.
    left: usize,
    answers: Vec<UserAnswer>,
    done: Option<oneshot::Sender<Vec<UserAnswer>>>,
}

/// This node's side of the bus: its id and the requests it waits on.
pub(crate) struct Bus {
    node: String,
    requests: Mutex<HashMap<u64, Waiting>>,
    users: Mutex<HashMap<u64, WaitingForUser>>,
    next_request: AtomicU64,
}

impl Bus {
    pub(crate) fn new(node: String) -> Self {
        Bus {
            node,
            requests: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        }
    }

    /// Handles an `e`, `q` or `a` message; false for any other kind.
    pub(crate) fn on_message(
        self: &Arc<Self>,
        link: &Arc<dyn BusLink>,
        events: &Arc<dyn BrokerEvents>,
        message: &[u8],
    ) -> bool {
        let Some((&kind, rest)) = message.split_first() else {
            return false;
        };
        match kind {
            b'e' => {
                let Some((channel, rest)) = split_channel(rest) else {
                    return true;
                };
                let Some((client, frame)) = rest.split_first_chunk::<8>() else {
                    return true;
                };
                events.presence_event(
                    channel,
                    ConnectionId(u64::from_be_bytes(*client)),
                    Bytes::copy_from_slice(frame),
                );
            }
            b'q' => self.on_request(link, events, rest),
            b'a' => self.on_answer(rest),
            b'u' => self.on_user_request(link, events, rest),
            b'v' => self.on_user_answers(rest),
            _ => return false,
        }
        true
    }

    fn on_request(
        self: &Arc<Self>,
        link: &Arc<dyn BusLink>,
        events: &Arc<dyn BrokerEvents>,
        body: &[u8],
    ) {
        let Ok(request) = serde_json::from_slice::<BusRequest<'_>>(body) else {
            tracing::warn!("unreadable request on the broker bus");
            return;
        };
        if request.from == self.node {
            return;
        }
        let to = request.from.to_owned();
        let id = request.id;
        let data: Box<RawValue> = request.data.to_owned();
        let timeout = Duration::from_millis(request.timeout_ms);
        let asking = u64::from_str_radix(request.client, 16)
            .ok()
            .and_then(|client| events.ask_local(ConnectionId(client), data, timeout));
        let link = link.clone();
        tokio::spawn(async move {
            let result = match asking {
                Some(asking) => asking.await,
                None => Err(RequestError::NotConnected),
            };
            answer(&*link, &to, id, result).await;
        });
    }

    fn on_answer(&self, body: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<BusAnswer<'_>>(body) else {
            tracing::warn!("unreadable answer on the broker bus");
            return;
        };
        if answer.to != self.node {
            return;
        }
        let mut requests = self.requests.lock();
        let Some(waiting) = requests.get_mut(&answer.id) else {
            return;
        };
        if answer.outcome == "absent" {
            waiting.absent_left = waiting.absent_left.saturating_sub(1);
            if waiting.absent_left > 0 {
                return;
            }
        }
        let result = BusOutcome {
            client: "",
            outcome: answer.outcome,
            result: answer.result,
            code: answer.code,
            message: answer.message,
        }
        .answer();
        if let Some(waiting) = requests.remove(&answer.id) {
            let _ = waiting.answer.send(result);
        }
    }

    fn on_user_request(
        self: &Arc<Self>,
        link: &Arc<dyn BusLink>,
        events: &Arc<dyn BrokerEvents>,
        body: &[u8],
    ) {
        let Ok(request) = serde_json::from_slice::<BusUserRequest<'_>>(body) else {
            tracing::warn!("unreadable user request on the broker bus");
            return;
        };
        if request.from == self.node {
            return;
        }
        let data: Arc<RawValue> = Arc::from(request.data.to_owned());
        let timeout = Duration::from_millis(request.timeout_ms);
        let asks = events.ask_local_user(request.user, data, timeout);
        let to = request.from.to_owned();
        let id = request.id;
        let link = link.clone();
        tokio::spawn(async move {
            let answers = futures_util::future::join_all(asks).await;
            let reply = BusUserAnswers {
                to: &to,
                id,
                answers: answers
                    .iter()
                    .map(|(client, answer)| BusOutcome::of(client, answer))
                    .collect(),
            };
            let mut message = vec![b'v'];
            if serde_json::to_writer(&mut message, &reply).is_ok()
                && let Err(error) = link.send(message).await
            {
                tracing::warn!(%error, "could not answer a user request from another node");
            }
        });
    }

    fn on_user_answers(&self, body: &[u8]) {
        let Ok(reply) = serde_json::from_slice::<BusUserAnswers<'_>>(body) else {
            tracing::warn!("unreadable user answers on the broker bus");
            return;
        };
        if reply.to != self.node {
            return;
        }
        let mut users = self.users.lock();
        let Some(waiting) = users.get_mut(&reply.id) else {
            return;
        };
        for outcome in reply.answers {
            let client = outcome.client.to_owned();
            waiting.answers.push((client, outcome.answer()));
        }
        waiting.left = waiting.left.saturating_sub(1);
        if waiting.left == 0
            && let Some(waiting) = users.remove(&reply.id)
            && let Some(done) = waiting.done
        {
            let _ = done.send(waiting.answers);
        }
    }

    /// How many of the live `nodes` are not this one.
    fn others(&self, nodes: &[NodeInfo]) -> usize {
        nodes.iter().filter(|n| n.id != self.node).count()
    }

    /// Asks every connection of `user` on the other live `nodes`; what they answered
    /// by the deadline (a node that does not answer in time adds nothing).
    pub(crate) async fn request_user(
        &self,
        link: &dyn BusLink,
        nodes: Result<Vec<NodeInfo>, BrokerError>,
        user: &str,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<Vec<UserAnswer>, BrokerError> {
        let others = self.others(&nodes?);
        if others == 0 {
            return Ok(Vec::new());
        }
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (done, finished) = oneshot::channel();
        self.users.lock().insert(
            id,
            WaitingForUser {
                left: others,
                answers: Vec::new(),
                done: Some(done),
            },
        );
        let _entry = UserEntry { bus: self, id };
        let request = BusUserRequest {
            from: &self.node,
            id,
            user,
            timeout_ms: timeout.as_millis() as u64,
            data,
        };
        let mut message = vec![b'u'];
        serde_json::to_writer(&mut message, &request).map_err(|e| BrokerError(e.to_string()))?;
        link.send(message).await?;
        match tokio::time::timeout(timeout + Duration::from_secs(1), finished).await {
            Ok(Ok(answers)) => Ok(answers),
            // Some node never answered: what the others said.
            _ => Ok(self
                .users
                .lock()
                .remove(&id)
                .map(|waiting| waiting.answers)
                .unwrap_or_default()),
        }
    }

    /// Asks a connection held by one of the other live `nodes`.
    pub(crate) async fn request(
        &self,
        link: &dyn BusLink,
        nodes: Result<Vec<NodeInfo>, BrokerError>,
        client: ConnectionId,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<ClientAnswer, RequestError> {
        let nodes = nodes.map_err(|_| RequestError::BrokerUnavailable)?;
        let others = self.others(&nodes);
        if others == 0 {
            return Err(RequestError::NotConnected);
        }
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.requests.lock().insert(
            id,
            Waiting {
                absent_left: others,
                answer: sender,
            },
        );
        // Removes the entry however this ends, the caller giving up included.
        let _entry = RequestEntry { bus: self, id };
        let client = client.to_string();
        let request = BusRequest {
            from: &self.node,
            id,
            client: &client,
            timeout_ms: timeout.as_millis() as u64,
            data,
        };
        let mut message = vec![b'q'];
        serde_json::to_writer(&mut message, &request).map_err(|_| RequestError::Closed)?;
        if link.send(message).await.is_err() {
            return Err(RequestError::BrokerUnavailable);
        }
        // The other node times the client out; this margin covers the trip back.
        match tokio::time::timeout(timeout + Duration::from_secs(1), receiver).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(RequestError::Closed),
            Err(_) => Err(RequestError::Timeout),
        }
    }
}

async fn answer(link: &dyn BusLink, to: &str, id: u64, answer: Result<ClientAnswer, RequestError>) {
    let outcome = BusOutcome::of("", &answer);
    let answer = BusAnswer {
        to,
        id,
        outcome: outcome.outcome,
        result: outcome.result,
        code: outcome.code,
        message: outcome.message,
    };
    let mut message = vec![b'a'];
    if serde_json::to_writer(&mut message, &answer).is_err() {
        return;
    }
    if let Err(error) = link.send(message).await {
        tracing::warn!(%error, "could not answer a request from another node");
    }
}

struct UserEntry<'a> {
    bus: &'a Bus,
    id: u64,
}

impl Drop for UserEntry<'_> {
    fn drop(&mut self) {
        self.bus.users.lock().remove(&self.id);
    }
}

struct RequestEntry<'a> {
    bus: &'a Bus,
    id: u64,
}

impl Drop for RequestEntry<'_> {
    fn drop(&mut self) {
        self.bus.requests.lock().remove(&self.id);
    }
}

/// Splits a `u16 length | channel | rest` body.
pub(crate) fn split_channel(body: &[u8]) -> Option<(&str, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let channel = std::str::from_utf8(body.get(2..2 + len)?).ok()?;
    Some((channel, &body[2 + len..]))
}

/// `e | u16 channel length | channel | u64 client | frame`.
pub(crate) fn presence_message(channel: &str, client: ConnectionId, frame: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(11 + channel.len() + frame.len());
    message.push(b'e');
    message.extend_from_slice(&(channel.len() as u16).to_be_bytes());
    message.extend_from_slice(channel.as_bytes());
    message.extend_from_slice(&client.0.to_be_bytes());
    message.extend_from_slice(frame);
    message
}

/// The `join` and `leave` bus messages of a client in a channel.
pub(crate) fn presence_messages(
    channel: &str,
    present: &Present,
) -> Result<(Vec<u8>, Vec<u8>), BrokerError> {
    let client = ConnectionId(
        u64::from_str_radix(&present.client, 16)
            .map_err(|_| BrokerError("presence client ids are hex".into()))?,
    );
    let join = to_json(&Join {
        channel,
        client: &present.client,
        user: present.user.as_deref(),
        meta: present.meta.as_deref(),
    });
    let leave = to_json(&Leave {
        channel,
        client: &present.client,
        user: present.user.as_deref(),
    });
    Ok((
        presence_message(channel, client, &join),
        presence_message(channel, client, &leave),
    ))
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh channel epoch: 8 hex digits.
pub(crate) fn new_epoch() -> String {
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    format!("{:08x}", (high ^ low) as u32)
}

/// Up to half of `delay`, in whole milliseconds, at random.
pub(crate) fn jitter_ms(delay: Duration) -> u64 {
    let half = (delay.as_millis() as u64 / 2).max(1);
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    (high ^ low) % half
}

/// The URL without our own `prefix` parameter, and the prefix (default `duplex`).
pub(crate) fn split_prefix(url: &str) -> Result<(String, String), BrokerError> {
    let mut parsed =
        url::Url::parse(url).map_err(|e| BrokerError(format!("invalid broker URL: {e}")))?;
    let mut prefix = "duplex".to_owned();
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter_map(|(k, v)| {
            if k == "prefix" {
                prefix = v.into_owned();
                None
            } else {
                Some((k.into_owned(), v.into_owned()))
            }
        })
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    if prefix.is_empty()
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(BrokerError(format!(
            "the broker prefix {prefix:?} must be letters, digits, _ and -"
        )));
    }
    Ok((parsed.to_string(), prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_parameter_is_ours() {
        let (url, prefix) =
            split_prefix("redis://127.0.0.1:6379/0?prefix=t1&protocol=resp3").expect("url");
        assert_eq!(prefix, "t1");
        assert_eq!(url, "redis://127.0.0.1:6379/0?protocol=resp3");
        let (url, prefix) = split_prefix("redis://127.0.0.1:6379").expect("url");
        assert_eq!(
            (url.as_str(), prefix.as_str()),
            ("redis://127.0.0.1:6379", "duplex")
        );
        assert!(split_prefix("nats://127.0.0.1:4222?prefix=a.b").is_err());
    }

    #[test]
    fn a_presence_message_carries_channel_client_and_frame() {
        let message = presence_message("chat:a", ConnectionId(0xff), b"{}");
        let (channel, rest) = split_channel(&message[1..]).expect("channel");
        assert_eq!(channel, "chat:a");
        assert_eq!(&rest[..8], &0xffu64.to_be_bytes());
        assert_eq!(&rest[8..], b"{}");
    }
}
