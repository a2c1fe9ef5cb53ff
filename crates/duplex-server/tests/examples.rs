//! The example applications in a real headless Chromium (tests/browser/examples.test.mjs drives
//! the pages, two people where there are two), with the Rust game master of the game example
//! running rounds against the same server and a proxy the script can cut under the chat.

mod web;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../../duplex-client/examples/game-master.rs"]
mod game_master;

use std::time::Duration;

use duplex_testkit::{TcpProxy, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_applications_work_for_two_people() {
    if !web::available() {
        return;
    }
    let server = TestServer::start().await;
    let proxy = TcpProxy::start(server.http_addr).await;
    // Short rounds, so the test sees one begin and end.
    let timing = game_master::Timing {
        lobby: Duration::from_millis(1500),
        round: Duration::from_secs(4),
        over: Duration::from_secs(2),
        answer: Duration::from_secs(2),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let master = {
        let (url, stop) = (server.url(""), stop.clone());
        tokio::spawn(async move {
            game_master::run(&url, timing, stop.cancelled_owned())
                .await
                .expect("the game master runs");
        })
    };
    let mut env = vec![
        ("DUPLEX_URL", server.url("")),
        ("DUPLEX_PROXY_URL", format!("http://{}", proxy.addr)),
    ];
    if let Ok(folder) = std::env::var("DUPLEX_SCREENSHOTS") {
        env.push(("DUPLEX_SCREENSHOTS", folder));
    }
    web::run_script(
        "examples.test.mjs",
        &env,
        Duration::from_secs(240),
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
    stop.cancel();
    master.await.expect("the game master stops");
}
