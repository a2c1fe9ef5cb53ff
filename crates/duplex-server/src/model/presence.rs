//! A client as a channel's presence lists it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A client in a channel's presence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Present {
    /// Its connection id.
    pub client: String,
    /// The user its token named.
    pub user: Option<String>,
    /// Its metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Box<RawValue>>,
}
