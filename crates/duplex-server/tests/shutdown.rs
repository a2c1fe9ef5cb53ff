//! Graceful shutdown: stop accepting, finish what is in flight, then stop.

use std::time::Duration;

use duplex_testkit::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn shutdown_finishes_an_in_flight_request_and_then_stops() {
    let server = TestServer::start().await;
    let addr = server.http_addr;

    // Send the head and half of a body, so the request is in flight inside the server.
    let body = br#"{"title": "written during shutdown"}"#;
    let (first, rest) = body.split_at(10);
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/collections/posts/records HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(first).await.expect("write first part");
    stream.flush().await.expect("flush");

    // Wait until the server holds the request: it is in flight beside the metrics request.
    timeout(LIMIT, async {
        loop {
            let metrics = reqwest::get(format!("http://{addr}/metrics"))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            if metrics.contains("duplex_http_requests_in_flight 2") {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the request reaches the server");

    let token = server.shutdown_token();
    token.cancel();

    // New connections are refused or closed without an answer once shutdown began.
    let refused = timeout(LIMIT, async {
        loop {
            match reqwest::get(format!("http://{addr}/healthz")).await {
                Err(_) => break,
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert!(refused.is_ok(), "the server kept accepting after shutdown");

    // The request that was in flight completes.
    stream.write_all(rest).await.expect("write rest");
    let mut response = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut response))
        .await
        .expect("the in-flight request is answered before the deadline")
        .expect("read");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert!(response.contains("written during shutdown"));

    timeout(LIMIT, server.stop())
        .await
        .expect("the server stops")
        .expect("cleanly");
}

#[tokio::test]
async fn records_written_before_a_graceful_stop_are_there_after_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let dir = data.path().to_owned();
    let server = TestServer::start_with(|c| c.data_dir = dir.clone()).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        let record: serde_json::Value = client
            .post(server.url("/api/collections/notes/records"))
            .json(&serde_json::json!({"i": i}))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        ids.push(record["id"].as_str().expect("id").to_owned());
    }
    server.stop().await.expect("stop");

    let server = TestServer::start_with(|c| c.data_dir = dir.clone()).await;
    for id in &ids {
        let response = client
            .get(server.url(&format!("/api/collections/notes/records/{id}")))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
    }
}

#[tokio::test]
async fn a_client_trickling_its_request_head_is_cut_off_while_others_are_served() {
    let server = TestServer::start_with(|c| {
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let stream = TcpStream::connect(server.http_addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    // One byte of a never-ending header every 50 ms: 200 bytes would take 10 s.
    let trickle = tokio::spawn(async move {
        write
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await?;
        for _ in 0..200 {
            write.write_all(b"a").await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::io::Result::Ok(())
    });
    let mut cut_off = Vec::new();
    tokio::select! {
        read = read.read_to_end(&mut cut_off) => {
            // Closed by the server (maybe after a 408), long before the head could finish.
            let _ = read;
        }
        done = trickle => panic!("the slow client was never cut off: {done:?}"),
    }
    // Meanwhile, and after, everyone else is served.
    let health = reqwest::get(server.url("/healthz")).await.expect("request");
    assert!(health.status().is_success());
}
