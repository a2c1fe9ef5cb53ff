//! The task that owns a connection's socket: it opens it, says `connect`, resubscribes after a
//! break, reconnects with backoff, and turns the handles' [`Command`]s into requests. The frames
//! the server sends are read in [`super::incoming`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use url::Url;

use super::incoming::Incoming;
use super::{
    COMMAND_QUEUE, Command, ConnectOptions, Event, SUBSCRIPTION_BUFFER, Status, Subscribed,
};
use crate::Error;
use crate::transport::{Frame, Transport};

/// A subscription as the driver keeps it across reconnects.
pub(super) struct Sub {
    pub(super) events: mpsc::Sender<Event>,
    /// The last offset delivered (or the channel's offset when the subscription started).
    pub(super) offset: u64,
    pub(super) epoch: Option<String>,
    pub(super) state: SubState,
}

/// Where a subscription's stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SubState {
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

pub(super) enum Pending {
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
pub(super) struct Session {
    pub(super) transport: Transport,
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) answers: mpsc::UnboundedReceiver<String>,
    pub(super) answers_tx: mpsc::UnboundedSender<String>,
    /// How long the server may stay silent before the socket counts as dead.
    pub(super) silence: Duration,
}

/// Why a session ended.
pub(super) enum End {
    /// Closed by the client, or every handle dropped.
    Closed,
    /// The server said not to reconnect.
    Refused(String),
    /// The socket broke (or the server said to reconnect).
    Lost,
}

pub(super) struct Driver {
    pub(super) url: Url,
    pub(super) tls: Arc<rustls::ClientConfig>,
    pub(super) options: ConnectOptions,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) subs: HashMap<String, Sub>,
    /// Commands taken while reconnecting, for the next session.
    pub(super) deferred: VecDeque<Command>,
    pub(super) next_id: u64,
    pub(super) status: watch::Sender<Status>,
}

impl Driver {
    pub(super) fn new(
        url: Url,
        tls: Arc<rustls::ClientConfig>,
        options: ConnectOptions,
        commands: mpsc::Receiver<Command>,
    ) -> Driver {
        Driver {
            url,
            tls,
            options,
            commands,
            subs: HashMap::new(),
            deferred: VecDeque::new(),
            next_id: 1,
            status: watch::channel(Status::Reconnecting(0)).0,
        }
    }

    pub(super) fn id(&mut self) -> u64 {
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
    pub(super) async fn open(&mut self) -> Result<Session, Error> {
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
        if self.options.token.is_some() || self.options.meta.is_some() || connected.connect_required
        {
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
    pub(super) async fn run(mut self, mut session: Session) {
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
}
