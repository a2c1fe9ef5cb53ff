//! The application's backend for webhook tests: an HTTP server that takes `POST /events`,
//! checks each delivery's signature and `Duplex-Delivery` header, and keeps the events; it can
//! be taken down (answering 503) and brought back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde_json::Value;

#[derive(Debug, Default)]
struct Shared {
    events: Mutex<Vec<Value>>,
    down: AtomicBool,
    refused: AtomicU64,
    secret: Option<String>,
    problems: Mutex<Vec<String>>,
}

/// A webhook receiver on 127.0.0.1, port 0.
#[derive(Debug, Clone)]
pub struct WebhookReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl WebhookReceiver {
    /// Starts one; with `secret`, every delivery's `Duplex-Signature` must be the HMAC of its
    /// body (one without is refused with 400 and listed in [`problems`](Self::problems)).
    pub async fn start(secret: Option<&str>) -> WebhookReceiver {
        let shared = Arc::new(Shared {
            secret: secret.map(str::to_owned),
            ..Shared::default()
        });
        let app = axum::Router::new()
            .route("/events", axum::routing::post(take))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("receiver address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        WebhookReceiver { addr, shared }
    }

    /// `http://ADDR/events`.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Answers 503 (down) or takes deliveries (up).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Deliveries refused while down.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Deliveries refused for a wrong signature or header (none, when all is well).
    pub fn problems(&self) -> Vec<String> {
        self.shared.problems.lock().clone()
    }

    /// Every event taken so far, in the order taken.
    pub fn events(&self) -> Vec<Value> {
        self.shared.events.lock().clone()
    }

    /// The events of one kind (`"connected"`, `"record.created"`, …).
    pub fn of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// The events about one connection, in order.
    pub fn of_client(&self, client: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["client"] == client)
            .collect()
    }
}

async fn take(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if shared.down.load(Ordering::SeqCst) {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    match check(&shared, &headers, &body) {
        Ok(events) => {
            shared.events.lock().extend(events);
            StatusCode::NO_CONTENT
        }
        Err(problem) => {
            shared.problems.lock().push(problem);
            StatusCode::BAD_REQUEST
        }
    }
}

/// The events of a delivery whose signature and `Duplex-Delivery` header are right.
fn check(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Vec<Value>, String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(secret) = &shared.secret {
        let expected = duplex_server::hooks::signature(secret.as_bytes(), body);
        if header("duplex-signature") != Some(expected.as_str()) {
            return Err(format!(
                "signature {:?}, expected {expected}",
                header("duplex-signature")
            ));
        }
    }
    let delivery: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let events = delivery["events"]
        .as_array()
        .ok_or("no events array")?
        .clone();
    let ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    if ids.len() != events.len() {
        return Err("an event without an id".into());
    }
    if header("duplex-delivery") != Some(ids.join(",").as_str()) {
        return Err(format!(
            "Duplex-Delivery {:?} does not name the events {ids:?}",
            header("duplex-delivery")
        ));
    }
    Ok(events)
}
