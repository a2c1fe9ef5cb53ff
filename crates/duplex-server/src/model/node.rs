//! A node of the cluster, as the registry lists it.

use serde::{Deserialize, Serialize};

/// A node as the registry lists it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Its id.
    pub id: String,
    /// Where it serves HTTP.
    pub http: String,
    /// Where it serves raw TCP.
    pub tcp: String,
    /// How many socket connections it holds.
    pub connections: u64,
    /// The server version.
    pub version: String,
    /// When it started, RFC 3339.
    pub started_at: String,
}
