//! `/duplex.js` in a real headless Chromium against a real server: records, subscribe, publish,
//! reconnect after the socket is dropped (through a proxy the test cuts), a server request, a
//! refresh that narrows the token, and the SSE fallback. The browser side is
//! tests/browser/duplex.test.mjs (see tests/web/mod.rs for the harness); the hooks test drives
//! tests/browser/hooks.test.mjs against a server with a backend.

mod web;

use std::time::Duration;

use duplex_testkit::{TcpProxy, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_works_in_chromium() {
    if !web::available() {
        return;
    }
    let secret = "a-secret-for-the-browser-test";
    let server = TestServer::start_with(|c| c.jwt_secret = Some(secret.into())).await;
    let proxy = std::sync::Arc::new(TcpProxy::start(server.http_addr).await);
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let token = |channels: &[&str]| {
        duplex_testkit::hs256_token(
            secret,
            &json!({"sub": "page", "exp": exp, "channels": channels}),
        )
    };
    let env = [
        ("DUPLEX_URL", format!("http://{}", proxy.addr)),
        ("DUPLEX_DIRECT", server.url("")),
        (
            "DUPLEX_TOKEN_WIDE",
            token(&["private:kept", "private:lost"]),
        ),
        ("DUPLEX_TOKEN_NARROW", token(&["private:kept"])),
    ];
    let server = std::sync::Arc::new(tokio::sync::Mutex::new(Some(server)));
    web::run_script(
        "duplex.test.mjs",
        &env,
        Duration::from_secs(120),
        |name, _| {
            match name.as_str() {
                "down" => {
                    proxy.set_down(true);
                    proxy.cut();
                }
                "up" => proxy.set_down(false),
                "restart" => {
                    let (server, proxy) = (server.clone(), proxy.clone());
                    return Box::pin(async move {
                        let mut held = server.lock().await;
                        let restarted = held.take().expect("the server runs").restart().await;
                        proxy.retarget(restarted.http_addr);
                        let direct = restarted.url("");
                        *held = Some(restarted);
                        json!({ "direct": direct })
                    });
                }
                other => panic!("unknown command {other}"),
            }
            Box::pin(async { json!({}) })
        },
    )
    .await;
}

/// The application's backend of the hooks test: connect allowed with the `session=good`
/// cookie (as user `page`), `rpc` methods `add` and `fail`.
async fn hooks_backend() -> std::net::SocketAddr {
    async fn answer(
        axum::Json(call): axum::Json<serde_json::Value>,
    ) -> axum::Json<serde_json::Value> {
        axum::Json(match (call["hook"].as_str(), call["method"].as_str()) {
            (Some("connect"), _) if call["cookies"]["session"] == "good" => {
                json!({"allow": true, "user": "page"})
            }
            (Some("connect"), _) => json!({"allow": false, "code": "no_session"}),
            (Some("rpc"), Some("add")) => {
                let sum = call["data"]["a"].as_i64().unwrap_or(0)
                    + call["data"]["b"].as_i64().unwrap_or(0);
                json!({"result": {"sum": sum}})
            }
            (Some("rpc"), _) => {
                json!({"error": {"code": "no_such_item", "message": "nothing there"}})
            }
            _ => json!({"allow": false}),
        })
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the backend");
    let addr = listener.local_addr().expect("backend address");
    let app = axum::Router::new().route("/hooks", axum::routing::post(answer));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_calls_the_backend_through_the_hooks() {
    if !web::available() {
        return;
    }
    let backend = hooks_backend().await;
    let hooks = duplex_server::hooks::HooksConfig {
        url: format!("http://{backend}/hooks"),
        events: vec![
            duplex_server::hooks::Hook::Connect,
            duplex_server::hooks::Hook::Rpc,
        ],
        timeout: None,
        on_error: duplex_server::hooks::OnError::Deny,
        secret: None,
        headers: Vec::new(),
        cookies: vec!["session".into()],
    }
    .settings()
    .expect("valid hooks");
    let server = TestServer::start_with(|c| c.hooks = Some(hooks)).await;
    web::run_script(
        "hooks.test.mjs",
        &[("DUPLEX_URL", server.url(""))],
        Duration::from_secs(60),
        |name, _| panic!("unknown command {name}"),
    )
    .await;
}
