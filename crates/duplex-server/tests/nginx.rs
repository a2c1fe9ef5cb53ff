//! deploy/nginx.conf in front of a real server: records, a WebSocket and an event stream all
//! pass through it. nginx comes from `scripts/install-nginx.sh`; CI runs that and sets
//! `DUPLEX_TEST_NGINX=1`, which makes a missing nginx a failure instead of a skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use duplex_client::{Client, Event};
use duplex_testkit::{EVENT_TIMEOUT, TestServer, wait_for};
use futures_util::StreamExt as _;
use serde_json::json;

fn nginx_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into()));
    path.exists().then_some(path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The shipped config, pointed at `upstream` and listening on `listen`, with its files in `dir`.
fn config(dir: &Path, upstream: std::net::SocketAddr, listen: u16) -> PathBuf {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx.conf"),
    )
    .expect("deploy/nginx.conf");
    let text = shipped
        .replace("server 127.0.0.1:8080;", &format!("server {upstream};"))
        .replace(
            "listen 127.0.0.1:8000;",
            &format!("listen 127.0.0.1:{listen};"),
        )
        .replace(
            "pid /tmp/duplex-nginx.pid;",
            &format!("pid {};", dir.join("nginx.pid").display()),
        )
        .replace(
            "error_log stderr warn;",
            &format!("error_log {} warn;", dir.join("error.log").display()),
        );
    assert_ne!(text, shipped, "the test found the lines it replaces");
    let path = dir.join("nginx.conf");
    std::fs::write(&path, text).expect("write the config");
    path
}

/// The nginx master process, stopped with SIGTERM when the test ends (SIGKILL would leave its
/// workers running).
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Reads an event stream until `needle` shows up.
async fn read_until(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    seen: &mut String,
    needle: &str,
) {
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while !seen.contains(needle) {
            let chunk = stream
                .next()
                .await
                .expect("the stream stays open")
                .expect("bytes");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle:?} through nginx in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_websockets_and_event_streams_pass_through_nginx() {
    let Some(nginx) = nginx_binary() else {
        if std::env::var_os("DUPLEX_TEST_NGINX").is_some() {
            panic!("DUPLEX_TEST_NGINX is set but there is no nginx; run scripts/install-nginx.sh");
        }
        eprintln!("skipped: no nginx (run scripts/install-nginx.sh, then set DUPLEX_TEST_NGINX=1)");
        return;
    };
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let conf = config(dir.path(), server.http_addr, port);
    let _proxy = Nginx(
        std::process::Command::new(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_for("nginx to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;

    // Records and the WebSocket, both through nginx.
    let client = Client::new(&base).expect("client");
    let connection = client.connect().await.expect("a WebSocket through nginx");
    let mut events = connection
        .subscribe("records:notes")
        .await
        .expect("subscribe");
    let note = client
        .records("notes")
        .create(&json!({"via": "nginx"}))
        .await
        .expect("create through nginx");
    let event = tokio::time::timeout(EVENT_TIMEOUT, events.next())
        .await
        .expect("the record event in time")
        .expect("open");
    match event {
        Event::Message(message) => {
            assert!(format!("{:?}", message.data).contains(&note.id));
        }
        other => panic!("unexpected {other:?}"),
    }

    // An event stream is not buffered by the proxy: a publication arrives while it is open.
    let response = reqwest::get(format!("{base}/api/channels/chat:proxied/events"))
        .await
        .expect("an event stream through nginx");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "event: subscribed").await;
    connection
        .publish("chat:proxied", &json!({"text": "live through the proxy"}))
        .await
        .expect("publish");
    read_until(&mut stream, &mut seen, "live through the proxy").await;

    // nginx enforces the body limit as configured.
    let too_big = reqwest::Client::new()
        .post(format!("{base}/api/collections/notes/records"))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .expect("answered");
    assert_eq!(too_big.status(), 413);
}
