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

/// The shipped config, pointed at the `upstream` nodes and listening on `listen`, with its files
/// in `dir`.
fn config(dir: &Path, upstream: &[std::net::SocketAddr], listen: u16) -> PathBuf {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx.conf"),
    )
    .expect("deploy/nginx.conf");
    let text = shipped
        .replace(
            "server 127.0.0.1:8080;",
            &upstream
                .iter()
                .map(|node| format!("server {node};"))
                .collect::<Vec<_>>()
                .join("\n        "),
        )
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

/// Starts nginx in front of `nodes`; returns it and its base URL.
async fn start_nginx(nginx: &Path, dir: &Path, nodes: &[std::net::SocketAddr]) -> (Nginx, String) {
    let port = free_port();
    let conf = config(dir, nodes, port);
    let proxy = Nginx(
        std::process::Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    wait_for("nginx to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    (proxy, format!("http://127.0.0.1:{port}"))
}

/// The nginx binary, or `None` (the test skips) unless CI asked for it.
fn nginx_or_skip() -> Option<PathBuf> {
    let nginx = nginx_binary();
    if nginx.is_none() {
        if std::env::var_os("DUPLEX_TEST_NGINX").is_some() {
            panic!("DUPLEX_TEST_NGINX is set but there is no nginx; run scripts/install-nginx.sh");
        }
        eprintln!("skipped: no nginx (run scripts/install-nginx.sh, then set DUPLEX_TEST_NGINX=1)");
    }
    nginx
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
    let Some(nginx) = nginx_or_skip() else {
        return;
    };
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_proxy, base) = start_nginx(&nginx, dir.path(), &[server.http_addr]).await;

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

/// Three nodes on one Redis broker behind the shipped config: sockets opened through nginx land
/// on different nodes, publications made through it (on whichever node) reach all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_nginx_serve_one_set_of_channels() {
    let Some(nginx) = nginx_or_skip() else {
        return;
    };
    let Some(broker) = duplex_testkit::redis_broker() else {
        eprintln!("skipped: set DUPLEX_TEST_REDIS (redis://127.0.0.1:6379) to run");
        return;
    };
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let broker = broker.clone();
        nodes.push(
            TestServer::start_with(move |config| {
                config.broker = Some(broker);
                config.node_id = Some(id.into());
            })
            .await,
        );
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.http_addr).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_proxy, base) = start_nginx(&nginx, dir.path(), &addrs).await;
    let client = Client::new(&base).expect("client");
    let mut subscriptions = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..3 {
        let connection = client.connect().await.expect("a WebSocket through nginx");
        subscriptions.push(connection.subscribe("news:lb").await.expect("subscribe"));
        connections.push(connection);
    }
    // Round robin spread the sockets: more than one node holds one.
    let mut holding = 0;
    for node in &nodes {
        let page: serde_json::Value = reqwest::get(node.url("/api/connections"))
            .await
            .expect("connections")
            .json()
            .await
            .expect("json");
        if page["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
        {
            holding += 1;
        }
    }
    assert!(holding >= 2, "sockets spread over {holding} node(s)");
    for i in 1..=9u64 {
        let published = client.publish("news:lb", &json!(i)).await.expect("publish");
        assert_eq!(published.offset, i);
    }
    for subscription in &mut subscriptions {
        for i in 1..=9u64 {
            match tokio::time::timeout(EVENT_TIMEOUT, subscription.next()).await {
                Ok(Some(Event::Message(message))) => assert_eq!(message.offset, i),
                other => panic!("expected publication {i}, got {other:?}"),
            }
        }
    }
}
