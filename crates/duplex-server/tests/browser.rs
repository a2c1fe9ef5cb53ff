//! `/duplex.js` in a real headless Chromium against a real server: records, subscribe, publish,
//! reconnect after the socket is dropped (through a proxy the test cuts), a server request, and
//! the SSE fallback. The browser side is tests/browser/duplex.test.mjs, driven by Node with
//! playwright-core; `scripts/install-browser.sh` installs Chromium and it (CI runs it and sets
//! `DUPLEX_TEST_BROWSER=1`, which makes a missing piece a failure instead of a skip).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use duplex_testkit::{TcpProxy, TestServer};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser")
}

/// Why the browser test cannot run here, if it cannot.
fn missing() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        return Some(format!("no Chromium at {chromium}"));
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("no node".into());
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("tests/browser/node_modules has no playwright-core".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_works_in_chromium() {
    if let Some(why) = missing() {
        if std::env::var_os("DUPLEX_TEST_BROWSER").is_some() {
            panic!("DUPLEX_TEST_BROWSER is set but {why}; run scripts/install-browser.sh");
        }
        eprintln!(
            "skipped: {why} (run scripts/install-browser.sh, then set DUPLEX_TEST_BROWSER=1)"
        );
        return;
    }
    let secret = "a-secret-for-the-browser-test";
    let server = TestServer::start_with(|c| c.jwt_secret = Some(secret.into())).await;
    let proxy = TcpProxy::start(server.http_addr).await;
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let token = |channels: &[&str]| {
        duplex_testkit::hs256_token(
            secret,
            &serde_json::json!({"sub": "page", "exp": exp, "channels": channels}),
        )
    };
    let mut node = tokio::process::Command::new("node")
        .arg("duplex.test.mjs")
        .current_dir(browser_dir())
        .env("DUPLEX_URL", format!("http://{}", proxy.addr))
        .env("DUPLEX_DIRECT", server.url(""))
        .env(
            "DUPLEX_TOKEN_WIDE",
            token(&["private:kept", "private:lost"]),
        )
        .env("DUPLEX_TOKEN_NARROW", token(&["private:kept"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node");
    let mut stdin = node.stdin.take().expect("stdin");
    let mut lines = BufReader::new(node.stdout.take().expect("stdout")).lines();
    let mut passed = false;
    let run = async {
        while let Some(line) = lines.next_line().await.expect("read node's output") {
            match line.as_str() {
                "DOWN" => {
                    proxy.set_down(true);
                    proxy.cut();
                }
                "UP" => proxy.set_down(false),
                "PASS" => {
                    passed = true;
                    continue;
                }
                other => {
                    eprintln!("node: {other}");
                    continue;
                }
            }
            stdin.write_all(b"OK\n").await.expect("answer node");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser test finishes in time");
    let status = node.wait().await.expect("node exits");
    assert!(
        status.success() && passed,
        "the browser test failed: {status}"
    );
}
