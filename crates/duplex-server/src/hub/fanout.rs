//! Publishing and fan-out: a publication gets the channel's next offset under the channel's
//! lock, is encoded once and pushed to every subscriber's queue before the lock is released.
//! With a broker, the broker allocates the offset and every node fans out what it broadcasts
//! ([`Hub::deliver`]), checking that nothing was missed on the way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_proto::DisconnectCode;

use super::channel::new_epoch;
use super::idempotency::{self, Claim, ClaimGuard, IdempotencyKey};
use super::namespace::{Caller, Namespace};
use super::publication::{Payload, Publication};
use super::queue::Pushed;
use super::{Channel, ChannelState, Hub, HubError, PublishOutcome, check_access, retention_of};
use crate::broker::{Once, Told};

/// What a keyed publication's answer from a broker or the store tells its publisher: the same
/// key with the same data is a retry (`replayed`), with other data a misuse of the key.
fn once_outcome(once: Once, digest: &str) -> Result<PublishOutcome, HubError> {
    match once {
        Once::Published { offset, epoch } => Ok(PublishOutcome {
            offset,
            epoch,
            replayed: false,
        }),
        Once::Earlier {
            offset,
            epoch,
            digest: earlier,
        } if earlier == digest => Ok(PublishOutcome {
            offset,
            epoch,
            replayed: true,
        }),
        Once::Earlier { .. } => Err(HubError::IdempotencyKeyReused),
    }
}

impl Hub {
    /// Publishes on a channel. In memory the publication is fanned out before this returns;
    /// with history in the store, once it committed (the fan-out follows in commit order);
    /// with a broker, once the broker has it (every node, this one included, fans out what the
    /// broker sends).
    pub async fn publish(
        &self,
        channel_name: &str,
        payload: Payload,
        caller: Caller<'_>,
    ) -> Result<PublishOutcome, HubError> {
        self.publish_told(channel_name, payload, caller, None, None)
            .await
    }

    /// [`publish`](Self::publish), calling `told` with the publication's offset as soon as it
    /// has one, in the channel's order: in memory under the channel's lock, in the store in
    /// commit order (so that what `told` records, the webhook's `published`, is in the
    /// channel's order); with a broker, once the broker answered.
    ///
    /// With an idempotency `key` (see [`super::idempotency`]): a retry within the key's window
    /// gets the first publication's outcome (`replayed`), publishes nothing and is not `told`.
    pub(crate) async fn publish_told(
        &self,
        channel_name: &str,
        payload: Payload,
        caller: Caller<'_>,
        told: Option<Told>,
        key: Option<&IdempotencyKey>,
    ) -> Result<PublishOutcome, HubError> {
        let namespace = self.check_publication(channel_name, &payload, caller)?;
        let Some(key) = key else {
            return self
                .publish_checked(channel_name, namespace, &payload, told)
                .await;
        };
        let digest = idempotency::digest(&payload);
        if let Some(broker) = &self.broker {
            let once = broker
                .publish_once(
                    channel_name,
                    &payload,
                    retention_of(namespace),
                    told,
                    key.as_str(),
                    &digest,
                )
                .await
                .map_err(|e| HubError::Unavailable(e.to_string()))?;
            return once_outcome(once, &digest);
        }
        let channel: Arc<str> = channel_name.into();
        match self.keys.claim(&channel, key, &digest, Instant::now())? {
            Claim::Earlier(earlier) => {
                return Ok(PublishOutcome {
                    replayed: true,
                    ..earlier
                });
            }
            Claim::New => {}
        }
        let claim = ClaimGuard {
            keys: &self.keys,
            channel,
            key,
            settled: false,
        };
        let published = match self.log_for(namespace) {
            // The store: it keeps the key with the publication, and knows it after a restart.
            Some(log) => log
                .publish_keyed(
                    channel_name,
                    &payload,
                    retention_of(namespace),
                    told,
                    key.as_str(),
                    &digest,
                )
                .await
                .map_err(|e| HubError::Unavailable(e.to_string()))
                .and_then(|once| once_outcome(once, &digest)),
            None => {
                self.publish_checked(channel_name, namespace, &payload, told)
                    .await
            }
        };
        claim.settle(published.as_ref().ok());
        published
    }

    /// Publishes what [`check_publication`](Self::check_publication) allowed.
    async fn publish_checked(
        &self,
        channel_name: &str,
        namespace: &Namespace,
        payload: &Payload,
        told: Option<Told>,
    ) -> Result<PublishOutcome, HubError> {
        match self.log_for(namespace) {
            None => self.publish_here(channel_name, payload, told),
            Some(log) => {
                let (offset, epoch) = log
                    .publish(channel_name, payload, retention_of(namespace), told)
                    .await
                    .map_err(|e| HubError::Unavailable(e.to_string()))?;
                Ok(PublishOutcome {
                    offset,
                    epoch,
                    replayed: false,
                })
            }
        }
    }

    /// Whether `caller` may publish `payload` in `channel_name`: the name, the namespace's
    /// rule, its binary and size limits. Returns the namespace.
    pub fn check_publication(
        &self,
        channel_name: &str,
        payload: &Payload,
        caller: Caller<'_>,
    ) -> Result<&Arc<Namespace>, HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        check_access(namespace.publish, caller, channel_name, "publish")?;
        if matches!(payload, Payload::Binary(_)) && !namespace.binary {
            return Err(HubError::BinaryNotAllowed);
        }
        if matches!(payload, Payload::Json(data) if data.get().trim() == "null") {
            return Err(HubError::NullData);
        }
        if payload.len() > namespace.max_message_size {
            return Err(HubError::MessageTooLarge {
                limit: namespace.max_message_size,
            });
        }
        Ok(namespace)
    }

    /// The in-process broker: offset, fan-out and history under the channel's lock.
    fn publish_here(
        &self,
        channel_name: &str,
        payload: &Payload,
        mut told: Option<Told>,
    ) -> Result<PublishOutcome, HubError> {
        if !self.channels.contains_key(channel_name)
            && self.namespaces.for_channel(channel_name).history_size == 0
        {
            // Nobody follows it and nothing would be kept: the channel would be made and
            // removed at once. Its first offset in a fresh epoch, without making it (so a
            // publisher to nobody is not held to `max_channels`).
            self.metrics.publications.inc();
            if let Some(told) = told {
                told(1);
            }
            return Ok(PublishOutcome {
                offset: 1,
                epoch: new_epoch(),
                replayed: false,
            });
        }
        loop {
            let channel = self.channel(channel_name)?;
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            state.last_offset += 1;
            let offset = state.last_offset;
            if let Some(told) = told.take() {
                told(offset);
            }
            let publication = Arc::new(Publication::counted(
                channel.name.clone(),
                offset,
                payload,
                &self.queue_budget,
            ));
            let namespace = &channel.namespace;
            let far_over = self.history_budget.is_far_over();
            let fan_out = self.holding(&mut state, |state| {
                let now = Instant::now();
                let fan_out = fan_out(&channel, state, &publication, now);
                if namespace.history_size > 0 {
                    state.remember(now, publication);
                    state.trim_history(namespace, now);
                    // The enforcer is behind: this channel gives up its oldest at once.
                    if far_over && state.history.len() > 1 {
                        state.drop_oldest_held();
                    }
                }
                fan_out
            });
            let outcome = PublishOutcome {
                offset,
                epoch: state.epoch.clone(),
                replayed: false,
            };
            let unused = state.unused();
            let watched = state.watchers > 0;
            drop(state);
            self.published(&channel, watched, &fan_out);
            if unused {
                self.remove_if_unused(channel_name);
            }
            return Ok(outcome);
        }
    }

    /// After a fan-out: wakes long polls and counts.
    fn published(&self, channel: &Channel, watched: bool, fan_out: &FanOut) {
        if watched {
            channel.published.notify_waiters();
        }
        let metrics = &self.metrics;
        metrics.publications.inc();
        metrics.deliveries_queued.inc_by(fan_out.delivered);
        if fan_out.dropped > 0 {
            metrics.dropped.inc_by(fan_out.dropped);
        }
        if fan_out.conflated > 0 {
            metrics.conflated.inc_by(fan_out.conflated);
        }
        if fan_out.disconnected > 0 {
            metrics
                .slow_consumer_disconnects
                .inc_by(fan_out.disconnected);
        }
    }

    /// Fans out what the store's channel history committed, in commit order, telling whoever
    /// waits (a record write) once it is out; ends when the store stops handing any.
    pub async fn deliver_stored(self: Arc<Self>, mut deliveries: crate::store::Deliveries) {
        while let Some(delivery) = deliveries.recv().await {
            if let Some(told) = delivery.told {
                told(delivery.offset);
            }
            self.deliver(
                &delivery.channel,
                delivery.offset,
                &delivery.epoch,
                &delivery.payload,
            );
            // Out: its place frees for the next publisher waiting.
            drop(delivery.place);
            if let Some(delivered) = delivery.delivered {
                let _ = delivered.send(());
            }
        }
    }

    /// With a broker (or history in the store): a publication the log sent, in offset order.
    /// Channels nobody here follows are skipped. A gap in offsets or a new epoch means this node missed
    /// publications; its subscribers are disconnected with `insufficient_state` so that they
    /// resubscribe `since` their last offset and recover from the broker's history.
    pub fn deliver(&self, channel_name: &str, offset: u64, epoch: &str, payload: &Payload) {
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return;
        };
        let mut state = channel.state.lock();
        if state.closed {
            return;
        }
        let same_epoch = *state.epoch == *epoch;
        if state.synced {
            if same_epoch && offset <= state.last_offset {
                return;
            }
            if !same_epoch || offset != state.last_offset + 1 {
                tracing::warn!(
                    channel = channel_name,
                    expected = state.last_offset + 1,
                    got = offset,
                    "missed publications from the broker; subscribers will recover"
                );
                self.lost_track(&mut state);
            }
        }
        state.synced = true;
        state.last_offset = offset;
        if !same_epoch {
            state.epoch = epoch.into();
        }
        let publication = Arc::new(Publication::counted(
            channel.name.clone(),
            offset,
            payload,
            &self.queue_budget,
        ));
        let fan_out = self.holding(&mut state, |state| {
            fan_out(&channel, state, &publication, Instant::now())
        });
        let watched = state.watchers > 0;
        drop(state);
        self.published(&channel, watched, &fan_out);
    }

    /// Disconnects every subscriber of a channel this node lost track of.
    fn lost_track(&self, state: &mut ChannelState) {
        for subscriber in state.subscribers.values() {
            subscriber
                .connection
                .queue
                .close(DisconnectCode::InsufficientState);
        }
        self.metrics
            .insufficient_state_disconnects
            .inc_by(state.subscribers.len() as u64);
    }

    /// With a broker: after the link to it broke, compares every followed channel with the
    /// broker's position and disconnects the subscribers of those that moved on meanwhile (or
    /// that the broker lost), so that they recover.
    pub async fn resync(&self) {
        let Some(broker) = &self.broker else {
            return;
        };
        let names: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|c| c.state.lock().synced)
            .map(|c| c.name.clone())
            .collect();
        // The command connection may only now find its old socket broken: retry a little, and
        // if the broker still cannot say, have every subscriber recover (from a broker that
        // answers by then, recovery tells them nothing was lost if nothing was).
        let mut positions = vec![None; names.len()];
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=4 {
            match broker.positions(&names).await {
                Ok(found) => {
                    positions = found;
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "cannot compare channels with the broker");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        for (name, position) in names.iter().zip(positions) {
            let Some(channel) = self.channels.get(name).map(|c| c.clone()) else {
                continue;
            };
            let mut state = channel.state.lock();
            let current = match &position {
                Some((top, epoch)) => *top == state.last_offset && **epoch == *state.epoch,
                None => false,
            };
            if !current {
                self.lost_track(&mut state);
                state.synced = false;
            }
        }
    }
}

/// Fan-out counts of one publication.
#[derive(Default)]
struct FanOut {
    delivered: u64,
    dropped: u64,
    conflated: u64,
    disconnected: u64,
}

/// Pushes a publication to every subscriber of a channel (buffering it for those still reading
/// the broker's history) and records it as the channel's latest.
fn fan_out(
    channel: &Channel,
    state: &mut ChannelState,
    publication: &Arc<Publication>,
    now: Instant,
) -> FanOut {
    let policy = channel.namespace.slow_consumer;
    let mut counts = FanOut::default();
    for subscriber in state.subscribers.values_mut() {
        if let Some(buffer) = &mut subscriber.recovering {
            buffer.push(publication.clone());
            continue;
        }
        if publication.offset() <= subscriber.after {
            continue;
        }
        match subscriber.connection.queue.push_publication(
            publication,
            policy,
            subscriber.latest.as_ref(),
        ) {
            Pushed::Queued | Pushed::Closed => {}
            Pushed::Dropped(dropped) => counts.dropped += dropped as u64,
            Pushed::Conflated => counts.conflated += 1,
            Pushed::Disconnecting => counts.disconnected += 1,
        }
    }
    counts.delivered = state.subscribers.len() as u64;
    state.count_publication(now);
    state.latest = Some((now, publication.clone()));
    counts
}
