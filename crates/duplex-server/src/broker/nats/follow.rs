//! How a node follows NATS: an ordered push consumer on the channels stream (resuming after the
//! last sequence delivered) and a subscription to the bus subject, each kept running across
//! breaks with backoff.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{NatsBroker, RECONNECT_MAX, RECONNECT_MIN, nats_error, position, unhex};
use crate::broker::bus::{BusLink, jitter_ms};
use crate::broker::{BrokerError, BrokerEvents, decode_payload};

impl NatsBroker {
    /// Follows the channels stream until it breaks or shutdown; true on shutdown.
    pub(super) async fn follow(
        self: &Arc<Self>,
        events: &Arc<dyn BrokerEvents>,
        shutdown: &CancellationToken,
    ) -> Result<bool, BrokerError> {
        let deliver_policy = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: self.delivered.load(Ordering::Acquire) + 1,
        };
        let consumer = self
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: format!("{}.ch.>", self.prefix),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(nats_error)?;
        let mut messages = consumer.messages().await.map_err(nats_error)?;
        let prefix = format!("{}.ch.", self.prefix);
        let mut connected = self.connected.clone();
        connected.mark_unchanged();
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return Ok(true),
                _ = connected.changed() => {
                    tracing::info!("reconnected to NATS; following the channels from where this node stopped");
                    return Ok(false);
                }
                message = messages.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    tracing::warn!(%error, "the NATS channel consumer failed");
                    continue;
                }
                None => return Err(BrokerError("the NATS channel consumer ended".into())),
            };
            if let Ok(info) = message.info() {
                self.delivered
                    .store(info.stream_sequence, Ordering::Release);
            }
            let channel = message
                .subject
                .as_str()
                .strip_prefix(&prefix)
                .and_then(unhex);
            let position = message.headers.as_ref().and_then(position);
            let payload = decode_payload(&message.payload);
            match (channel, position, payload) {
                (Some(channel), Some((offset, epoch)), Some(payload)) => {
                    events.deliver(&channel, offset, &epoch, payload);
                }
                _ => tracing::warn!(subject = %message.subject, "unreadable publication"),
            }
        }
    }

    pub(super) async fn follow_bus(
        self: &Arc<Self>,
        events: &Arc<dyn BrokerEvents>,
        shutdown: &CancellationToken,
    ) -> Result<bool, BrokerError> {
        let mut subscriber = self
            .client
            .subscribe(self.bus_subject.clone())
            .await
            .map_err(nats_error)?;
        let link: Arc<dyn BusLink> = self.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(true),
                message = subscriber.next() => match message {
                    Some(message) => {
                        if !self.bus.on_message(&link, events, &message.payload) {
                            tracing::warn!("unknown message on the broker bus");
                        }
                    }
                    None => return Err(BrokerError("the NATS bus subscription ended".into())),
                },
            }
        }
    }
}

/// Runs `attempt` until shutdown, again after each failure, with backoff.
pub(super) async fn keep_running<F, Fut>(what: &str, shutdown: &CancellationToken, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, BrokerError>>,
{
    let mut delay = RECONNECT_MIN;
    loop {
        match attempt().await {
            Ok(true) => return,
            Ok(false) => delay = RECONNECT_MIN,
            Err(error) => tracing::warn!(%error, "{what}; retrying"),
        }
        let jitter = Duration::from_millis(jitter_ms(delay));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay + jitter) => {}
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}
