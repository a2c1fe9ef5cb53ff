//! The requests a client sends on a socket, one method each: `connect`, `refresh`, `framing`,
//! `subscribe`, `unsubscribe`, `history`, `presence`, `publish`, and the answers to the server's
//! own requests.

use std::sync::Arc;

use bytes::Bytes;
use duplex_proto::frames::{ClientFrame, ConnectResult, Published, to_json};
use duplex_proto::{DisconnectCode, ErrorCode, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};
use serde::Serialize;
use serde_json::value::RawValue;

use super::session::{After, Session, Then, hub_error, push_denial, push_reply};
use super::{HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT, Transport};
use crate::broker::Present;
use crate::hooks::{Denial, Hook, HookRequest, Hooks, Verdict, boxed};
use crate::hub::HubError;
use crate::hub::connection::ClientAnswer;
use crate::hub::idempotency::IdempotencyKey;
use crate::hub::namespace::Caller;
use crate::hub::namespace::ClientAuth;
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
        let hooks = self.hook(Hook::Connect, None);
        // With a connect hook and no key of its own, duplex hands the token to the backend.
        let verify_here = self.context.tokens.is_some() || hooks.is_none();
        if let Some(token) = &frame.token
            && verify_here
            && !self.accept_token(id, token)
        {
            return;
        }
        let client_meta = frame.meta.map(|meta| Arc::from(meta.to_owned()));
        if let Some(hooks) = hooks {
            let token = frame.token.clone().filter(|_| !verify_here);
            self.ask_connect(hooks, Some(id), token, client_meta);
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
        self.reply_connected(id);
    }

    /// The reply to a `connect` that succeeded: the connection's id and user.
    fn reply_connected(&mut self, id: u64) {
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

    /// Asks the `connect` hook; `id` is the `connect` request's, none for a WebSocket opened with
    /// a token (refused, it is closed with `connect_refused`).
    pub(super) fn ask_connect(
        &mut self,
        hooks: Arc<Hooks>,
        id: Option<u64>,
        token: Option<String>,
        client_meta: Option<Arc<RawValue>>,
    ) {
        let mut request = HookRequest::new(Hook::Connect, &self.connection);
        request.meta = self
            .auth
            .meta
            .as_deref()
            .or(client_meta.as_deref())
            .map(boxed);
        request.token = token;
        if let Some(upgrade) = self.upgrade.as_deref() {
            request.headers = Some(upgrade.headers.clone());
            request.cookies = Some(upgrade.cookies.clone());
        }
        let base = (*self.auth).clone();
        self.run_then(async move {
            let verdict = hooks.ask(&request).await;
            Some(Box::new(move |session: &mut Session| {
                session.connect_answered(id, verdict, base, client_meta);
            }) as Then)
        });
    }

    /// Applies the `connect` hook's answer.
    fn connect_answered(
        &mut self,
        id: Option<u64>,
        verdict: Verdict,
        base: ClientAuth,
        client_meta: Option<Arc<RawValue>>,
    ) {
        let answer = match verdict {
            Verdict::Allow(answer) => answer,
            Verdict::Deny(denial) => {
                push_denial(&self.queue, &self.context.metrics, id, &denial);
                if id.is_none() {
                    self.queue.close(DisconnectCode::ConnectRefused);
                }
                return;
            }
        };
        let auth = ClientAuth {
            user: answer.user.map(Arc::from).or(base.user),
            channels: answer.channels.unwrap_or(base.channels),
            expires_at: answer.expires_at.or(base.expires_at),
            meta: answer.meta.map(Arc::from).or(base.meta),
        };
        if auth.expires_at.is_some_and(|at| at <= unix_now()) {
            let denial = Denial {
                code: ErrorCode::TokenExpired.as_str().into(),
                message: "the backend's expires_at has already passed".into(),
            };
            push_denial(&self.queue, &self.context.metrics, id, &denial);
            if id.is_none() {
                self.queue.close(DisconnectCode::ConnectRefused);
            }
            return;
        }
        let meta = auth.meta.clone().or(client_meta);
        self.authenticate(auth);
        self.connection.set_meta(meta);
        self.connected = true;
        self.upgrade = None;
        if let Some(id) = id {
            self.reply_connected(id);
        }
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
        if let Some(hooks) = self.hook(Hook::Refresh, None) {
            self.refresh_through(hooks, id, token);
            return;
        }
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
                self.end_disallowed_subscriptions();
            }
            Err(error) => self.error(Some(id), error.code(), error.to_string()),
        }
    }

    /// `refresh` with the hook on: the backend renews the connection (its `expires_at`,
    /// `channels`, `meta`), with or without a token; a token is verified first when duplex has
    /// a key, and handed to the backend otherwise.
    fn refresh_through(&mut self, hooks: Arc<Hooks>, id: u64, token: Option<&str>) {
        let mut base = (*self.auth).clone();
        let mut request = HookRequest::new(Hook::Refresh, &self.connection);
        if let Some(token) = token {
            match &self.context.tokens {
                Some(verifier) => match verifier.verify(token) {
                    Ok(auth) if auth.user != base.user => {
                        self.error(
                            Some(id),
                            ErrorCode::InvalidToken,
                            "a refresh token must name the same user",
                        );
                        return;
                    }
                    Ok(auth) => base = auth,
                    Err(error) => {
                        self.error(Some(id), error.code(), error.to_string());
                        return;
                    }
                },
                None => request.token = Some(token.to_owned()),
            }
        }
        self.run_then(async move {
            let verdict = hooks.ask(&request).await;
            Some(Box::new(move |session: &mut Session| {
                session.refresh_answered(id, verdict, base);
            }) as Then)
        });
    }

    fn refresh_answered(&mut self, id: u64, verdict: Verdict, base: ClientAuth) {
        let answer = match verdict {
            Verdict::Allow(answer) => answer,
            Verdict::Deny(denial) => {
                push_denial(&self.queue, &self.context.metrics, Some(id), &denial);
                return;
            }
        };
        if answer
            .user
            .as_deref()
            .is_some_and(|user| Some(user) != base.user.as_deref())
        {
            self.error(
                Some(id),
                ErrorCode::InvalidToken,
                "a refresh keeps the connection's user; the backend named another",
            );
            return;
        }
        let auth = ClientAuth {
            user: base.user,
            channels: answer.channels.unwrap_or(base.channels),
            expires_at: answer.expires_at.or(base.expires_at),
            meta: answer.meta.map(Arc::from).or(base.meta),
        };
        let expires_at = auth.expires_at;
        self.authenticate(auth);
        self.reply(id, serde_json::json!({ "expires_at": expires_at }));
        self.end_disallowed_subscriptions();
    }

    /// Ends the subscriptions the connection's new grants no longer allow, and tells the
    /// webhooks.
    fn end_disallowed_subscriptions(&self) {
        let ended = self
            .context
            .hub
            .end_disallowed_subscriptions(&self.connection, &self.auth);
        if let Some(webhooks) = &self.context.webhooks {
            for channel in ended {
                webhooks.unsubscribed(&self.connection, &channel, "permission_denied");
            }
        }
    }

    /// `rpc`: the backend answers a client's call, through the `rpc` hook.
    pub(super) fn rpc(&mut self, id: u64, method: Option<&str>, data: Option<&RawValue>) {
        let Some(method) = method.filter(|m| !m.is_empty() && m.len() <= 256) else {
            self.bad_frame(
                Some(id),
                ErrorCode::BadRequest,
                "an rpc request needs a \"method\" (1 to 256 bytes)",
            );
            return;
        };
        let Some(hooks) = self.hook(Hook::Rpc, None) else {
            self.error(
                Some(id),
                ErrorCode::Unsupported,
                "no application backend answers rpc on this server (the [hooks] events do not name rpc)",
            );
            return;
        };
        if self.publish_limiter.check().is_err() {
            self.context.metrics.rate_limited.inc();
            self.error(
                Some(id),
                ErrorCode::RateLimited,
                format!(
                    "at most {} publications and calls a second",
                    self.context.limits.publish_rate
                ),
            );
            return;
        }
        self.bad_frames_in_a_row = 0;
        let mut request = HookRequest::new(Hook::Rpc, &self.connection);
        request.method = Some(method.to_owned());
        request.data = data.map(boxed);
        let metrics = self.context.metrics.clone();
        let queue = self.queue.clone();
        self.run(async move {
            match hooks.ask(&request).await {
                Verdict::Deny(denial) => push_denial(&queue, &metrics, Some(id), &denial),
                Verdict::Allow(answer) => match answer.error {
                    Some(error) => {
                        let denial = Denial::from_backend(error.code, error.message, "rpc_failed");
                        push_denial(&queue, &metrics, Some(id), &denial);
                    }
                    None => push_reply(&queue, id, answer.result),
                },
            }
        });
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
        let hooks = self.hook(Hook::Subscribe, Some(channel));
        let mut request = None;
        if hooks.is_some() {
            // The namespace's rule first: the backend is asked only about what it allows.
            if let Err(error) = self
                .context
                .hub
                .check_readable(channel, Caller::Client(&self.auth))
            {
                self.hub_error(id, &error);
                return;
            }
            let mut asked = HookRequest::new(Hook::Subscribe, &self.connection);
            asked.channel = Some(channel.to_owned());
            request = Some(asked);
        }
        let hub = self.context.hub.clone();
        let metrics = self.context.metrics.clone();
        let connection = self.connection.clone();
        let channel = channel.to_owned();
        let since = since.cloned();
        let webhooks = self.context.webhooks.clone();
        self.run(async move {
            if let (Some(hooks), Some(request)) = (hooks, request) {
                match hooks.ask(&request).await {
                    Verdict::Deny(denial) => {
                        push_denial(&connection.queue, &metrics, Some(id), &denial);
                        return;
                    }
                    Verdict::Allow(answer) => {
                        connection.set_channel_meta(&channel, answer.meta.map(Arc::from));
                    }
                }
            }
            match hub
                .subscribe(&channel, &connection, id, since.as_ref())
                .await
            {
                Ok(()) => {
                    if let Some(webhooks) = &webhooks {
                        webhooks.subscribed(&connection, &channel);
                    }
                }
                Err(error) => hub_error(&connection.queue, &metrics, id, &error),
            }
        });
    }

    pub(super) fn unsubscribe(&mut self, id: u64, channel: &str) {
        match self.context.hub.unsubscribe(channel, &self.connection) {
            Ok(()) => {
                if let Some(webhooks) = &self.context.webhooks {
                    webhooks.unsubscribed(&self.connection, channel, "client");
                }
                self.reply(id, serde_json::json!({}));
            }
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

    pub(super) fn publish(
        &mut self,
        id: u64,
        channel: &str,
        payload: Payload,
        key: Option<IdempotencyKey>,
    ) {
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
        let hooks = self.hook(Hook::Publish, Some(channel));
        let mut request = None;
        if hooks.is_some() {
            // The namespace's rules first: the backend sees only what could be published.
            if let Err(error) = hub.check_publication(channel, &payload, Caller::Client(&auth)) {
                self.hub_error(id, &error);
                return;
            }
            let mut asked = HookRequest::new(Hook::Publish, &self.connection);
            asked.channel = Some(channel.to_owned());
            match &payload {
                Payload::Json(data) => asked.data = Some(data.clone()),
                Payload::Binary(bytes) => {
                    use base64::Engine as _;
                    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
                    asked.data =
                        Some(serde_json::value::to_raw_value(&text).expect("a string is JSON"));
                    asked.encoding = Some("base64");
                }
            }
            request = Some(asked);
        }
        let channel = channel.to_owned();
        // Only when the webhooks want `published`: the publisher, to name it in the event.
        let told_to = self
            .context
            .webhooks
            .clone()
            .filter(|w| w.wants(crate::webhooks::EventKind::Published))
            .map(|webhooks| (webhooks, self.connection.clone()));
        self.run(async move {
            let mut payload = payload;
            if let (Some(hooks), Some(request)) = (hooks, request) {
                match hooks.ask(&request).await {
                    Verdict::Deny(denial) => {
                        push_denial(&queue, &metrics, Some(id), &denial);
                        return;
                    }
                    Verdict::Allow(answer) => match replaced(payload, answer.data) {
                        Ok(replacement) => payload = replacement,
                        Err(denial) => {
                            push_denial(&queue, &metrics, Some(id), &denial);
                            return;
                        }
                    },
                }
            }
            let (event, written) = tokio::sync::oneshot::channel();
            let told = told_to.map(|(webhooks, connection)| -> crate::broker::Told {
                let (channel, copy) = (channel.clone(), payload.clone());
                Box::new(move |offset| {
                    let _ =
                        event.send(webhooks.published(Some(&connection), &channel, offset, &copy));
                })
            });
            let published = hub
                .publish_told(&channel, payload, Caller::Client(&auth), told, key.as_ref())
                .await;
            match published {
                Ok(outcome) => {
                    // In the backend's outbox before the publisher hears it is out.
                    crate::webhooks::Webhooks::written(written.await.ok().flatten()).await;
                    push_reply(
                        &queue,
                        id,
                        Published {
                            offset: outcome.offset,
                            epoch: (*outcome.epoch).into(),
                            replayed: outcome.replayed,
                        },
                    );
                }
                Err(error) => hub_error(&queue, &metrics, id, &error),
            }
        });
    }
}

/// The payload to publish after the `publish` hook: the backend's `data` when it gave one (a
/// base64 string for a binary publication), else the client's.
fn replaced(payload: Payload, data: Option<Box<RawValue>>) -> Result<Payload, Denial> {
    let Some(data) = data else {
        return Ok(payload);
    };
    match payload {
        Payload::Json(_) => Ok(Payload::Json(data)),
        Payload::Binary(_) => {
            use base64::Engine as _;
            serde_json::from_str::<String>(data.get())
                .ok()
                .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
                .map(|bytes| Payload::Binary(Bytes::from(bytes)))
                .ok_or_else(|| Denial {
                    code: ErrorCode::Unavailable.as_str().into(),
                    message: "the application's backend replaced a binary publication with data that is not a base64 string".into(),
                })
        }
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
