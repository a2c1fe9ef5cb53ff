//! Follows a channel over WebSocket and prints every event; the stream survives server restarts
//! (it reconnects and resumes where it left off, or prints the gap).
//!
//! `cargo run -p duplex-client --example subscribe -- chat:lobby` against `duplex serve`.

use duplex_client::{ConnectOptions, Connection, Event};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), duplex_client::Error> {
    let channel = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "chat:lobby".into());
    let url = std::env::var("DUPLEX_WS").unwrap_or_else(|_| "ws://127.0.0.1:8080/ws".into());
    let connection =
        Connection::connect(ConnectOptions::new(&url).meta(json!({"name": "example"}))).await?;
    let mut events = connection.subscribe(&channel).await?;
    connection
        .publish(&channel, &json!({"text": "hello from the example"}))
        .await?;
    while let Some(event) = events.next().await {
        match event {
            Event::Message(message) => println!("#{} {:?}", message.offset, message.data),
            Event::Join(who) => println!("+ {}", who.client),
            Event::Leave(who) => println!("- {}", who.client),
            Event::Gap {
                reason,
                last_seen,
                resumed_at,
                ..
            } => {
                println!("missed {last_seen}..{resumed_at} ({reason})");
            }
            Event::Ended { code } => println!("ended: {code}"),
        }
    }
    Ok(())
}
