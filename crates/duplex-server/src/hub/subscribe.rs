//! Subscribing and recovery: the reply (with where the channel stands) is queued before any
//! publication of the subscription, and with `since` the publications missed come right after
//! it — from this node's history, or from the broker's while live ones are held back — none
//! twice, none lost. Unsubscribing, and ending what a narrower token no longer allows.

use std::sync::Arc;

use bytes::Bytes;
use duplex_proto::frames::{Leave, Reply, Since, Subscribed, Unsubscribed, to_json};
use duplex_proto::{DisconnectCode, ErrorCode};

use super::channel::{Subscriber, recoverable, replay_after};
use super::connection::ConnectionHandle;
use super::namespace::{Caller, ClientAuth, SlowConsumerPolicy};
use super::presence::{join_frame, present};
use super::publication::Publication;
use super::queue::LatestSlot;
use super::shared_read::SharedHistory;
use super::{Channel, Hub, HubError, NotRecovered, retention_of};
use crate::broker::{ChannelLog, HistoryRange};
use crate::model::ConnectionId;

impl Hub {
    /// Subscribes a connection, queueing the `reply` (with the channel's current offset and
    /// epoch) before any publication the subscription will receive. With `since`, the reply
    /// says whether every publication after it can be replayed, and those publications follow
    /// the reply, before any live one, and none is sent twice.
    pub async fn subscribe(
        &self,
        channel_name: &str,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
    ) -> Result<(), HubError> {
        self.check_readable(channel_name, Caller::Client(&connection.auth()))?;
        match self.log_for(self.namespaces.for_channel(channel_name)) {
            None => self.subscribe_here(channel_name, connection, reply_id, since),
            Some(log) => {
                self.subscribe_through(log, channel_name, connection, reply_id, since)
                    .await
            }
        }
    }

    fn new_subscriber(&self, channel_name: &str, connection: &Arc<ConnectionHandle>) -> Subscriber {
        let namespace = self.namespaces.for_channel(channel_name);
        Subscriber {
            connection: connection.clone(),
            latest: (namespace.slow_consumer == SlowConsumerPolicy::Latest)
                .then(|| Arc::new(LatestSlot::default())),
            recovering: None,
            after: 0,
        }
    }

    /// The in-process broker: reply and replay queued under the channel's lock, so no live
    /// publication can slip in between.
    fn subscribe_here(
        &self,
        channel_name: &str,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
    ) -> Result<(), HubError> {
        let subscriber = self.new_subscriber(channel_name, connection);
        loop {
            let channel = self.channel(channel_name)?;
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            if state.subscribers.contains_key(&connection.id) {
                return Err(HubError::AlreadySubscribed);
            }
            let recovery = since.map(|since| state.recoverable(since));
            let replay = since.zip(recovery).and_then(|(since, recovery)| {
                replay_after(since, recovery, state.last_offset, state.oldest_available())
            });
            queue_reply(
                connection,
                reply_id,
                channel_name,
                state.last_offset,
                &state.epoch,
                recovery,
                replay,
            );
            if let Some(after) = replay {
                for publication in state.publications_after(after) {
                    connection.queue.push_recovered(publication);
                }
            }
            if channel.namespace.presence {
                let join = join_frame(channel_name, connection);
                for other in state.subscribers.values() {
                    other.connection.queue.push_control(join.clone());
                }
            }
            state.subscribers.insert(connection.id, subscriber);
            connection.add_subscription(channel_name);
            self.metrics.subscriptions.inc();
            return Ok(());
        }
    }

    /// With a broker (or history in the store): the subscriber is added first and buffers
    /// what the log delivers while the log's history is read; the reply, the missed
    /// publications and then the buffered ones after them are queued together.
    async fn subscribe_through(
        &self,
        log: &dyn ChannelLog,
        channel_name: &str,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
    ) -> Result<(), HubError> {
        let mut subscriber = self.new_subscriber(channel_name, connection);
        subscriber.recovering = Some(Vec::new());
        let channel = loop {
            let channel = self.channel(channel_name)?;
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            if state.subscribers.contains_key(&connection.id) {
                return Err(HubError::AlreadySubscribed);
            }
            state.subscribers.insert(connection.id, subscriber);
            connection.add_subscription(channel_name);
            self.metrics.subscriptions.inc();
            drop(state);
            break channel;
        };
        let retention = retention_of(&channel.namespace);
        let read = match since {
            // The whole history kept, read once for every subscriber of the channel that comes
            // back meanwhile (`shared_read.rs`); each takes what follows its own `since`, or,
            // in a new epoch kept whole, all of it.
            Some(_) => {
                let whole = HistoryRange::After {
                    offset: 0,
                    limit: retention.size,
                };
                channel
                    .history_reads
                    .read(|| {
                        self.metrics.history_reads.inc();
                        log.history(channel_name, whole, retention)
                    })
                    .await
            }
            None => {
                self.metrics.history_reads.inc();
                log.history(channel_name, HistoryRange::None, retention)
                    .await
                    .map(Arc::new)
            }
        };
        if !self.finish_subscription(&channel, connection, reply_id, since, read)? {
            return Ok(());
        }
        if !channel.namespace.presence {
            return Ok(());
        }
        match &self.broker {
            Some(broker) => {
                if let Err(error) = broker
                    .join(channel_name, &present(connection, channel_name))
                    .await
                {
                    tracing::warn!(%error, channel = channel_name, "cannot add presence to the broker");
                }
            }
            None => {
                // History in the store, presence here: the others hear of the new subscriber.
                let join = join_frame(channel_name, connection);
                let state = channel.state.lock();
                if !state.subscribers.contains_key(&connection.id) {
                    // Gone already: its leave was told, or nobody heard of it.
                    return Ok(());
                }
                for (id, other) in &state.subscribers {
                    if *id != connection.id {
                        other.connection.queue.push_control(join.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues a subscription's reply, what it missed and what arrived meanwhile, once the
    /// broker's history is read; false when the connection closed meanwhile.
    fn finish_subscription(
        &self,
        channel: &Arc<Channel>,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
        read: SharedHistory,
    ) -> Result<bool, HubError> {
        let mut state = channel.state.lock();
        let Some(subscriber) = state.subscribers.get_mut(&connection.id) else {
            // The connection closed meanwhile.
            return Ok(false);
        };
        let buffered = subscriber.recovering.take().unwrap_or_default();
        if let Ok(history) = &read {
            subscriber.after = history.top.max(buffered.last().map_or(0, |p| p.offset()));
        }
        let history = match read {
            Ok(history) => history,
            Err(error) => {
                state.subscribers.swap_remove(&connection.id);
                connection.remove_subscription(&channel.name);
                self.metrics.subscriptions.dec();
                let unused = state.unused();
                drop(state);
                if unused {
                    self.remove_if_unused(&channel.name);
                }
                return Err(HubError::Unavailable(error.to_string()));
            }
        };
        let (top, oldest, epoch) = (history.top, history.oldest, history.epoch.clone());
        let recovery = since.map(|since| recoverable(since, top, &epoch, oldest));
        let replay = since
            .zip(recovery)
            .and_then(|(since, recovery)| replay_after(since, recovery, top, oldest));
        queue_reply(
            connection,
            reply_id,
            &channel.name,
            top,
            &epoch,
            recovery,
            replay,
        );
        if let Some(after) = replay {
            for stored in history.publications.iter().filter(|p| p.offset > after) {
                let publication = Publication::counted(
                    channel.name.clone(),
                    stored.offset,
                    &stored.payload,
                    &self.queue_budget,
                );
                connection.queue.push_recovered(&Arc::new(publication));
            }
        }
        let policy = channel.namespace.slow_consumer;
        let latest = state
            .subscribers
            .get(&connection.id)
            .and_then(|s| s.latest.clone());
        let fresh = buffered.iter().filter(|p| p.offset() > top);
        for (expected, publication) in (top + 1..).zip(fresh) {
            if publication.offset() != expected {
                // This node missed publications between the history read and what it buffered.
                connection.queue.close(DisconnectCode::InsufficientState);
                break;
            }
            connection
                .queue
                .push_publication(publication, policy, latest.as_ref());
        }
        if !state.synced {
            state.synced = true;
            state.last_offset = top;
            state.epoch = epoch;
        }
        Ok(true)
    }

    /// Ends a subscription.
    pub fn unsubscribe(
        &self,
        channel_name: &str,
        connection: &ConnectionHandle,
    ) -> Result<(), HubError> {
        if !connection.remove_subscription(channel_name) {
            return Err(HubError::NotSubscribed);
        }
        self.remove_subscriber(channel_name, connection.id)
    }

    /// Ends every subscription of `connection` that `auth` (its new token) no longer allows,
    /// telling the client with an `unsubscribed` push for each.
    pub fn end_disallowed_subscriptions(
        &self,
        connection: &ConnectionHandle,
        auth: &ClientAuth,
    ) -> Vec<String> {
        let mut ended = Vec::new();
        for channel in connection.subscriptions() {
            if self.check_readable(&channel, Caller::Client(auth)).is_ok() {
                continue;
            }
            if self.unsubscribe(&channel, connection).is_ok() {
                connection
                    .queue
                    .push_control(Bytes::from(to_json(&Unsubscribed {
                        channel: channel.as_str().into(),
                        code: ErrorCode::PermissionDenied,
                    })));
                ended.push(channel);
            }
        }
        ended
    }

    pub(super) fn remove_subscriber(
        &self,
        channel_name: &str,
        connection: ConnectionId,
    ) -> Result<(), HubError> {
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return Err(HubError::NotSubscribed);
        };
        let mut state = channel.state.lock();
        let Some(removed) = state.subscribers.swap_remove(&connection) else {
            return Err(HubError::NotSubscribed);
        };
        self.metrics.subscriptions.dec();
        if channel.namespace.presence {
            match &self.broker {
                Some(broker) => {
                    let broker = broker.clone();
                    let channel_name = channel_name.to_owned();
                    tokio::spawn(async move {
                        if let Err(error) = broker.leave(&channel_name, connection).await {
                            tracing::warn!(%error, channel = channel_name, "cannot remove presence from the broker");
                        }
                    });
                }
                None if !state.subscribers.is_empty() => {
                    let user = removed.connection.user();
                    let leave = Bytes::from(to_json(&Leave {
                        channel: channel_name,
                        client: &connection.to_string(),
                        user: user.as_deref(),
                    }));
                    for other in state.subscribers.values() {
                        other.connection.queue.push_control(leave.clone());
                    }
                }
                None => {}
            }
        }
        let unused = state.unused();
        drop(state);
        if unused {
            self.remove_if_unused(channel_name);
        }
        Ok(())
    }
}

/// Queues a subscription's `reply`; `replay` is where the publications that follow it start.
fn queue_reply(
    connection: &ConnectionHandle,
    reply_id: u64,
    channel_name: &str,
    offset: u64,
    epoch: &str,
    recovery: Option<Result<(), NotRecovered>>,
    replay: Option<u64>,
) {
    let reply = to_json(&Reply {
        id: reply_id,
        result: Subscribed {
            channel: channel_name.into(),
            offset,
            epoch: epoch.into(),
            recovered: recovery.map(|r| r.is_ok()),
            missed: replay.map(|after| offset.saturating_sub(after)),
            reason: recovery.and_then(|r| r.err()).map(|e| e.as_str().into()),
        },
    });
    connection.queue.push_control(Bytes::from(reply));
}
