//! Presence: who is subscribed to a channel of a namespace with presence on, `join` and `leave`
//! frames to the other subscribers, and (with a broker) the entries of this node.

use std::sync::Arc;

use bytes::Bytes;
use duplex_proto::frames::{Join, to_json};

use super::connection::ConnectionHandle;
use super::namespace::Caller;
use super::{Hub, HubError, check_access};
use crate::model::{ConnectionId, Present};

impl Hub {
    /// With a broker: a presence frame from any node for this node's subscribers.
    pub fn presence_event(&self, channel_name: &str, except: ConnectionId, frame: Bytes) {
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return;
        };
        let state = channel.state.lock();
        for (id, subscriber) in &state.subscribers {
            // A subscription still reading history gets presence after its reply, by asking.
            if *id != except && subscriber.recovering.is_none() {
                subscriber.connection.queue.push_control(frame.clone());
            }
        }
    }

    /// Every (channel, client) this node holds presence for.
    pub fn local_presence(&self) -> Vec<(Arc<str>, Present)> {
        let mut all = Vec::new();
        for entry in &self.channels {
            let channel = entry.value();
            if !channel.namespace.presence {
                continue;
            }
            let state = channel.state.lock();
            for subscriber in state.subscribers.values() {
                all.push((
                    channel.name.clone(),
                    present(&subscriber.connection, &channel.name),
                ));
            }
        }
        all
    }

    /// Who is subscribed to a channel (namespaces with presence on), on every node.
    pub async fn presence(
        &self,
        channel_name: &str,
        caller: Caller<'_>,
    ) -> Result<Vec<Present>, HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        if !namespace.presence {
            return Err(HubError::PresenceDisabled);
        }
        check_access(
            namespace.read_presence,
            caller,
            channel_name,
            "read presence",
        )?;
        if let Some(broker) = &self.broker {
            return broker
                .presence(channel_name)
                .await
                .map_err(|e| HubError::Unavailable(e.to_string()));
        }
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return Ok(Vec::new());
        };
        let state = channel.state.lock();
        Ok(state
            .subscribers
            .values()
            .map(|s| present(&s.connection, channel_name))
            .collect())
    }
}

/// A connection's `join` frame.
pub(super) fn join_frame(channel_name: &str, connection: &ConnectionHandle) -> Bytes {
    let meta = connection.meta_in(channel_name);
    let user = connection.user();
    Bytes::from(to_json(&Join {
        channel: channel_name,
        client: &connection.id.to_string(),
        user: user.as_deref(),
        meta: meta.as_deref(),
    }))
}

/// A connection as presence lists it.
pub(super) fn present(connection: &ConnectionHandle, channel_name: &str) -> Present {
    Present {
        client: connection.id.to_string(),
        user: connection.user().map(|u| u.to_string()),
        meta: connection
            .meta_in(channel_name)
            .map(|m| m.as_ref().to_owned()),
    }
}
