//! The bare-HTTP-stack baseline of `duplex bench http`: axum serving one route, `GET /record`,
//! whose handler builds a typed struct and returns it as `Json` — a body of the benchmark
//! record's size with the same fields. It runs as `duplex bench baseline-server`, a child
//! process started like the server under test, on the same kind of runtime. `POST /hook`
//! answers `{"allow":true}`: the fastest backend a server's hooks can have, to measure what a
//! hook costs the server (docs/benchmarks.md, "Hooks").

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

/// The record as a handler of an ordinary axum service would build it.
#[derive(Debug, Clone, Serialize)]
struct Body {
    id: String,
    created: String,
    updated: String,
    version: u64,
    title: String,
    author: String,
    stars: u32,
}

impl Body {
    /// A body whose JSON is `size` bytes (or as near as the fields allow).
    fn of_size(size: usize) -> Body {
        let mut body = Body {
            id: "0192f4a1b2c37d8e9f0a1b2c3d4e5f60".into(),
            created: "2026-11-29T18:00:00.123456Z".into(),
            updated: "2026-11-29T18:00:00.123456Z".into(),
            version: 1,
            title: String::new(),
            author: "ana".into(),
            stars: 5,
        };
        let bare = serde_json::to_vec(&body).map_or(0, |json| json.len());
        body.title = "a benchmark record"
            .chars()
            .cycle()
            .take(size.saturating_sub(bare))
            .collect();
        body
    }
}

async fn record(State(body): State<Arc<Body>>) -> Json<Body> {
    Json(Body::clone(&body))
}

/// A backend that allows every hook.
async fn hook(
    _call: axum::body::Bytes,
) -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        "{\"allow\":true}",
    )
}

/// Serves the baseline on 127.0.0.1 (an ephemeral port), printing `http://ADDR` on stdout, until
/// the process is stopped.
pub async fn serve_baseline(size: usize) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "duplex bench baseline serving HTTP on http://{}",
        listener.local_addr()?
    );
    serve_baseline_on(listener, size).await
}

/// Serves the baseline on `listener` until the process is stopped.
pub async fn serve_baseline_on(
    listener: tokio::net::TcpListener,
    size: usize,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/record", get(record))
        .route("/hook", post(hook))
        .with_state(Arc::new(Body::of_size(size)));
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_the_size_asked_for() {
        for size in [170, 204, 400] {
            let json = serde_json::to_vec(&Body::of_size(size)).expect("json");
            assert_eq!(json.len(), size);
        }
    }
}
