//! Records over HTTP: create, read, update with If-Match, list every page, delete.
//!
//! `cargo run -p duplex-client --example records` against `duplex serve` on 127.0.0.1:8080
//! (or pass another server URL as the first argument).

use duplex_client::{Client, ListOptions};
use futures_util::StreamExt as _;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), duplex_client::Error> {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let client = Client::new(&server)?;
    let posts = client.records("posts");

    let post = posts
        .create(&json!({"title": "Hello", "draft": true}))
        .await?;
    println!("created {} at version {}", post.id, post.version);

    // Only if nobody changed it since we read it.
    let post = posts
        .patch(&post.id, &json!({"draft": false}), Some(post.version))
        .await?;
    println!("published {} at version {}", post.id, post.version);

    let mut all = posts.stream(ListOptions {
        limit: Some(100),
        ..ListOptions::default()
    });
    while let Some(record) = all.next().await {
        let record = record?;
        println!("{} {}", record.id, serde_json::Value::Object(record.fields));
    }

    posts.delete(&post.id, Some(post.version)).await?;
    Ok(())
}
