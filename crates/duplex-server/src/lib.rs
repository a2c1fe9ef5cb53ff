//! duplex as a library: one server for records over HTTP and channels over sockets.
//!
//! Start one in-process with [`Server::bind`] and [`Server::run`]; the `duplex` binary does
//! exactly that with a [`Config`] resolved from flags, environment and `duplex.toml`.
//!
//! ```no_run
//! # async fn example() -> Result<(), duplex_server::ServerError> {
//! let config = duplex_server::Config {
//!     http: "127.0.0.1:0".parse().expect("literal address"),
//!     ..Default::default()
//! };
//! let server = duplex_server::Server::bind(config).await?;
//! println!("serving on {}", server.http_addr());
//! server.run(tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```

pub mod api_keys;
pub mod auth;
pub mod broker;
pub mod config;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hooks;
pub mod http;
mod latency;
pub mod metrics;
pub mod model;
mod record_events;
mod server;
mod socket;
mod stats;
pub mod store;
pub mod tls;
pub mod units;
pub mod webhooks;
mod write_deadline;

pub use config::{Config, ConfigError, ConfigLayer};
pub use server::{Server, ServerError};
pub use socket::SocketLimits;
pub mod hub;
