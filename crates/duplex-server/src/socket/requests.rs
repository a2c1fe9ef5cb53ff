//! The requests a client sends on a socket, one method each: `connect`, `refresh`, `framing`,
//! `subscribe`, `unsubscribe`, `history`, `presence`, `publish`, and the answers to the server's
//! own requests.

use std::sync::Arc;

use bytes::Bytes;
use duplex_proto::frames::{ClientFrame, ConnectResult, Published, to_json};
use duplex_proto::{ErrorCode, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};
use serde::Serialize;
use serde_json::value::RawValue;

use super::session::{After, Session, hub_error, push_reply};
use super::{HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT, Transport};
use crate::broker::Present;
use crate::hub::HubError;
use crate::hub::connection::ClientAnswer;
use crate::hub::namespace::Caller;
use crate::hub::publication::Payload;
use crate::hub::queue::Outgoing;

impl Session {
    /// `connect`: once per connection. A refused `connect` changes nothing (the client may try
    /// again); one that succeeded fixes who the connection is, so a second is `already_connected`.
    pub(super) fn connect(&mut self, id: u64, frame: &ClientFrame<'_>) {
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
    pub(super) fn accept_token(&mut self, id: u64, token: &str) -> bool {
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
    pub(super) fn refresh(&mut self, id: u64, token: Option<&str>) {
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
    pub(super) fn answer(&mut self, frame: &ClientFrame<'_>) {
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

    pub(super) fn framing(&mut self, id: u64, mode: Option<&str>) -> After {
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

    pub(super) fn subscribe(
        &mut self,
        id: u64,
        channel: &str,
        since: Option<&duplex_proto::frames::Since>,
    ) {
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

    pub(super) fn unsubscribe(&mut self, id: u64, channel: &str) {
        match self.context.hub.unsubscribe(channel, &self.connection) {
            Ok(()) => self.reply(id, serde_json::json!({})),
            Err(error) => self.hub_error(id, &error),
        }
    }

    pub(super) fn history(
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

    pub(super) fn presence(&mut self, id: u64, channel: &str) {
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

    pub(super) fn publish(&mut self, id: u64, channel: &str, payload: Payload) {
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
