//! What the server sends on a connection's socket, as the driver reads it: publications into
//! their subscriptions (once each, in order, lagging instead of waiting on a slow reader),
//! answers to the client's requests, the server's own requests, and `disconnect`.

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::driver::{Driver, End, Pending, Session, SubState};
use super::{Event, Message, Payload, RequestError, Subscribed};
use crate::Error;
use crate::http::PresenceEntry;
use crate::transport::Frame;

/// The fields of any server frame this client reads.
#[derive(Deserialize)]
pub(super) struct Incoming {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) id: Option<u64>,
    #[serde(default)]
    pub(super) channel: Option<String>,
    #[serde(default)]
    pub(super) offset: Option<u64>,
    #[serde(default)]
    pub(super) data: Option<Value>,
    #[serde(default)]
    pub(super) result: Option<Value>,
    #[serde(default)]
    pub(super) code: Option<String>,
    #[serde(default)]
    pub(super) message: Option<String>,
    #[serde(default)]
    pub(super) reconnect: Option<bool>,
    #[serde(default)]
    pub(super) client: Option<String>,
    #[serde(default)]
    pub(super) user: Option<String>,
    #[serde(default)]
    pub(super) meta: Option<Value>,
    #[serde(default)]
    pub(super) limits: Option<Value>,
    #[serde(default)]
    pub(super) connect_required: bool,
}

impl Driver {
    /// Handles one frame; `Some` when the session ends.
    pub(super) async fn on_frame(&mut self, session: &mut Session, frame: Frame) -> Option<End> {
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
                // Where the stream goes on from: after `since` when recovered; otherwise the
                // channel's offset, less what follows the reply (a new epoch the server still
                // keeps whole is replayed from its first offset).
                let resumed_at = subscribed
                    .offset
                    .saturating_sub(subscribed.missed.unwrap_or(0));
                let gap = match (&since, subscribed.recovered) {
                    (Some((last_seen, _)), Some(false)) => Some(Event::Gap {
                        reason: subscribed.reason.clone().unwrap_or_default(),
                        last_seen: *last_seen,
                        resumed_at,
                        epoch: subscribed.epoch.clone(),
                    }),
                    _ => None,
                };
                if subscribed.recovered != Some(true) {
                    sub.offset = resumed_at;
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
