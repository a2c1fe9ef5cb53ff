//! The vocabulary the hub and the brokers share: connection ids, publication payloads, a
//! client's answers, presence entries and node records. It depends on neither, so the hub can
//! use a broker, and a broker can report to the hub (through
//! [`BrokerEvents`](crate::broker::BrokerEvents)), without either module importing the other's
//! internals.

mod answer;
mod ids;
mod node;
mod payload;
mod presence;

pub use answer::{ClientAnswer, RequestError, UserAnswer};
pub use ids::ConnectionId;
pub(crate) use ids::rand_u64;
pub use node::NodeInfo;
pub use payload::Payload;
pub use presence::Present;
