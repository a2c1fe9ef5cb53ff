//! A record write that got a 2xx survives `kill -9` of the server process.

mod common;

use std::path::Path;

use tokio::process::Child;

async fn spawn_server(data: &Path) -> (Child, String) {
    common::spawn_serve(data, &[]).await
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let data = tempfile::tempdir().expect("tempdir");
    let (mut child, url) = spawn_server(data.path()).await;
    let client = reqwest::Client::new();

    // Writes from several tasks at once, then the process dies without any chance to flush.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let client = client.clone();
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..50 {
                let response = client
                    .post(format!("{url}/api/collections/journal/records"))
                    .json(&serde_json::json!({"writer": writer, "i": i}))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), reqwest::StatusCode::CREATED);
                let record: serde_json::Value = response.json().await.expect("json");
                ids.push(record["id"].as_str().expect("id").to_owned());
            }
            ids
        }));
    }
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    // An update acknowledged just before the kill must survive too.
    let updated = client
        .patch(format!(
            "{url}/api/collections/journal/records/{}",
            acknowledged[0]
        ))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"edited": true}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(updated.status(), reqwest::StatusCode::OK);

    child.kill().await.expect("SIGKILL");

    let (mut child, url) = spawn_server(data.path()).await;
    for id in &acknowledged {
        let response = client
            .get(format!("{url}/api/collections/journal/records/{id}"))
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.status(),
            reqwest::StatusCode::OK,
            "record {id} lost"
        );
    }
    let first: serde_json::Value = client
        .get(format!(
            "{url}/api/collections/journal/records/{}",
            acknowledged[0]
        ))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(first["edited"], true);
    assert_eq!(first["version"], 2);
    let collections: serde_json::Value = client
        .get(format!("{url}/api/collections"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(collections["items"][0]["records"], 200);
    child.kill().await.expect("SIGKILL");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let data = tempfile::tempdir().expect("tempdir");
    let (mut child, url) = spawn_server(data.path()).await;
    let health = reqwest::get(format!("{url}/healthz"))
        .await
        .expect("health");
    assert!(health.status().is_success());
    common::terminate(&mut child).await;
}

#[test]
fn a_bad_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("duplex.toml");
    std::fs::write(&file, "htpp = \"127.0.0.1:1\"\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown field"), "{stderr}");
}

#[test]
fn bench_against_a_server_that_is_not_there_says_so() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args([
            "bench",
            "fanout",
            "--subscribers",
            "1",
            "--duration",
            "1s",
            "--server",
            "http://127.0.0.1:1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the server at 127.0.0.1:1"),
        "{stderr}"
    );
}
