//! `/duplex.js` in a real headless Chromium against a real server: records, subscribe, publish,
//! reconnect after the socket is dropped (through a proxy the test cuts), a server request, a
//! refresh that narrows the token, and the SSE fallback. The browser side is
//! tests/browser/duplex.test.mjs (see tests/web/mod.rs for the harness).

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
    let proxy = TcpProxy::start(server.http_addr).await;
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
                other => panic!("unknown command {other}"),
            }
            Box::pin(async { json!({}) })
        },
    )
    .await;
}
