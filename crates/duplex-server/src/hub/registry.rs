//! The connections of this node: registered when they start, found by id or user, listed a
//! page at a time, and unsubscribed everywhere when they end.

use std::sync::Arc;

use super::Hub;
use super::connection::ConnectionHandle;
use crate::model::ConnectionId;

impl Hub {
    /// Makes a connection reachable by id.
    pub fn register(&self, connection: Arc<ConnectionHandle>) {
        self.connections.insert(connection.id, connection);
    }

    /// Ends a connection: unsubscribes it everywhere and fails its pending requests.
    pub fn deregister(&self, connection: &ConnectionHandle) {
        self.connections.remove(&connection.id);
        for channel in connection.take_subscriptions() {
            // The channel may already be gone; either way the subscription is.
            let _ = self.remove_subscriber(&channel, connection.id);
        }
        connection.abandon_requests();
    }

    /// A connection of this node.
    pub fn connection(&self, id: ConnectionId) -> Option<Arc<ConnectionHandle>> {
        self.connections.get(&id).map(|c| c.clone())
    }

    /// Calls `f` with every connection of this node.
    pub fn each_connection(&self, mut f: impl FnMut(&Arc<ConnectionHandle>)) {
        for connection in &self.connections {
            f(connection.value());
        }
    }

    /// How many connections this node holds.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Connections in id order, after `after`, at most `limit`.
    pub fn connections_page(
        &self,
        after: Option<ConnectionId>,
        limit: usize,
    ) -> Vec<Arc<ConnectionHandle>> {
        let mut all: Vec<Arc<ConnectionHandle>> = self
            .connections
            .iter()
            .filter(|c| after.is_none_or(|after| c.id > after))
            .map(|c| c.clone())
            .collect();
        all.sort_by_key(|c| c.id);
        all.truncate(limit);
        all
    }

    /// Every connection whose token named `user`.
    pub fn connections_of_user(&self, user: &str) -> Vec<Arc<ConnectionHandle>> {
        self.connections
            .iter()
            .filter(|c| c.user().as_deref() == Some(user))
            .map(|c| c.clone())
            .collect()
    }
}
