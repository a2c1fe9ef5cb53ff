//! TLS on both ports with a certificate made in the test.

use std::sync::Arc;

use duplex_testkit::{EVENT_TIMEOUT, TestServer};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

struct Tls {
    _certificate: duplex_testkit::TestCertificate,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    connector: TlsConnector,
}

fn certificate() -> Tls {
    let certificate = duplex_testkit::TestCertificate::localhost();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(certificate.der.clone()))
        .expect("trust the test certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        cert: certificate.cert.clone(),
        key: certificate.key.clone(),
        _certificate: certificate,
        connector: TlsConnector::from(Arc::new(config)),
    }
}

async fn connect(
    tls: &Tls,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(EVENT_TIMEOUT, tls.connector.connect(name, stream))
        .await
        .expect("handshake in time")
        .expect("TLS handshake")
}

/// `GET /healthz` over HTTPS; the whole response.
async fn https_health(tls: &Tls, addr: std::net::SocketAddr) -> String {
    let mut stream = connect(tls, addr).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test]
async fn https_wss_and_raw_tcp_work_over_tls() {
    let tls = certificate();
    let (cert, key) = (tls.cert.clone(), tls.key.clone());
    let server = TestServer::start_with(|c| c.tls = Some((cert, key))).await;

    // HTTPS.
    let response = https_health(&tls, server.http_addr).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // wss://
    let stream = connect(&tls, server.http_addr).await;
    let (mut socket, _) = tokio_tungstenite::client_async("wss://localhost/ws", stream)
        .await
        .expect("WebSocket over TLS");
    let connected = socket.next().await.expect("frame").expect("ok");
    assert!(connected.to_text().expect("text").contains("\"connected\""));
    socket
        .send(Message::text(
            json!({"type": "subscribe", "id": 1, "channel": "news:tls"}).to_string(),
        ))
        .await
        .expect("send");
    let reply: Value = serde_json::from_str(
        socket
            .next()
            .await
            .expect("frame")
            .expect("ok")
            .to_text()
            .expect("text"),
    )
    .expect("json");
    assert_eq!(reply["type"], "reply");

    // Raw TCP over TLS: the same lines.
    let stream = connect(&tls, server.tcp_addr).await;
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let connected: Value =
        serde_json::from_str(&lines.next_line().await.expect("read").expect("line")).expect("json");
    assert_eq!(connected["type"], "connected");
    write
        .write_all(
            b"{\"type\":\"publish\",\"id\":1,\"channel\":\"news:tls\",\"data\":\"secure\"}\n",
        )
        .await
        .expect("write");
    let published: Value =
        serde_json::from_str(&lines.next_line().await.expect("read").expect("line")).expect("json");
    assert_eq!(published["type"], "reply");
    let message: Value = serde_json::from_str(
        socket
            .next()
            .await
            .expect("frame")
            .expect("ok")
            .to_text()
            .expect("text"),
    )
    .expect("json");
    assert_eq!(message["data"], "secure");
}

#[tokio::test]
async fn plaintext_clients_on_a_tls_port_are_refused_and_the_server_carries_on() {
    let tls = certificate();
    let (cert, key) = (tls.cert.clone(), tls.key.clone());
    let server = TestServer::start_with(|c| c.tls = Some((cert, key))).await;
    for addr in [server.http_addr, server.tcp_addr] {
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n{\"type\":\"ping\"}\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(EVENT_TIMEOUT, plain.read_to_end(&mut answer))
            .await
            .expect("closed in time")
            .ok();
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
    }
    let response = https_health(&tls, server.http_addr).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn missing_or_broken_certificates_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing =
        duplex_server::tls::acceptor(&dir.path().join("nope.pem"), &dir.path().join("nope.key"));
    assert!(matches!(
        missing,
        Err(duplex_server::tls::TlsError::Certificate { .. })
    ));
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    assert!(duplex_server::tls::acceptor(&junk, &junk).is_err());
}
