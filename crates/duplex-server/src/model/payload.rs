//! What a publication carries: JSON, kept as its text, or bytes.

use bytes::Bytes;
use serde_json::value::RawValue;

/// What a publication carries.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Any JSON value.
    Json(Box<RawValue>),
    /// Bytes, for namespaces that allow binary.
    Binary(Bytes),
}

impl Payload {
    /// The payload's size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(raw) => raw.get().len(),
            Payload::Binary(bytes) => bytes.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
