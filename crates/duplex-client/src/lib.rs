//! The Rust client of duplex.
//!
//! - [`Client`]: the HTTP side. Records (create, get, list page by page or as a stream,
//!   replace or patch with `If-Match`, delete), channel publish, history and presence, and asking
//!   connected clients. Errors the server answers with are [`Error::Api`] with the problem's
//!   stable `code`.
//! - [`Connection`]: the socket side, over WebSocket (`ws://`, `wss://`) or raw TCP (`tcp://`,
//!   `tcps://`). [`Connection::subscribe`] gives a [`Subscription`], a `Stream` of [`Event`]s
//!   that stays gapless across reconnects: after a break the connection reconnects with
//!   exponential backoff and jitter and resubscribes `since` the last offset it delivered; when
//!   the server cannot replay what was missed, the stream says so with [`Event::Gap`], never a
//!   silent hole. A server `disconnect` that says not to reconnect is honoured.
//!   [`ConnectOptions::on_request`] answers the server's requests.
//!
//! ```no_run
//! # async fn example() -> Result<(), duplex_client::Error> {
//! use duplex_client::{Client, Event};
//! let client = Client::new("http://127.0.0.1:8080")?;
//! let post = client.records("posts").create(&serde_json::json!({"title": "hi"})).await?;
//! let connection = client.connect().await?;
//! let mut lobby = connection.subscribe("chat:lobby").await?;
//! connection.publish("chat:lobby", &serde_json::json!({"text": post.id})).await?;
//! while let Some(event) = lobby.next().await {
//!     if let Event::Message(message) = event {
//!         println!("{}: {:?}", message.offset, message.data);
//!     }
//! }
//! # Ok(()) }
//! ```

mod error;
mod http;
mod socket;
mod tls;
mod transport;

pub use error::{Error, Problem};
pub use http::{
    Client, ClientBuilder, History, ListOptions, Page, PresenceEntry, Published, Record, Records,
};
pub use socket::{
    ConnectOptions, Connection, Event, Message, Payload, RequestError, Status, Subscribed,
    Subscription,
};
