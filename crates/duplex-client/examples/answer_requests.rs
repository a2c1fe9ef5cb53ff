//! Answers the server's requests: run it, then ask it from a backend with
//! `curl -X POST 'localhost:8080/api/connections/ID/request' -H 'content-type: application/json' -d '{"question":"ready?"}'`
//! using the ID it prints.

use duplex_client::{ConnectOptions, Connection, RequestError};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), duplex_client::Error> {
    let url = std::env::var("DUPLEX_WS").unwrap_or_else(|_| "ws://127.0.0.1:8080/ws".into());
    let options = ConnectOptions::new(&url).on_request(|data: Value| async move {
        match data["question"].as_str() {
            Some("ready?") => Ok(json!({"ready": true})),
            _ => Err(RequestError {
                code: "unknown_question".into(),
                message: "ask me whether I am ready".into(),
            }),
        }
    });
    let connection = Connection::connect(options).await?;
    println!(
        "connection id: {}",
        connection.client_id().unwrap_or_default()
    );
    let mut status = connection.status();
    // Serve until the connection closes for good (Ctrl-C to stop).
    while status.changed().await.is_ok() {
        println!("{:?}", *status.borrow());
    }
    Ok(())
}
