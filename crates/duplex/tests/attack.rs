//! `duplex bench attack` as a process: each attack against its own default server, bounded,
//! with the server's memory and a healthy client measured throughout.

use std::process::Command;

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_bench_runs_every_scenario_against_a_default_server() {
    let output = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args([
                "bench", "attack", "--scale", "0.01", "--hold", "300ms", "--json",
            ])
            .env("DUPLEX_LOG", "warn")
            .output()
            .expect("run duplex bench attack")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let reports: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON reports");
    let scenarios: Vec<&str> = reports
        .iter()
        .map(|r| r["scenario"].as_str().expect("scenario"))
        .collect();
    assert_eq!(scenarios, ["slow-readers", "history", "channels"]);
    // scale 0.01: √0.01 of each count (3 × 110, 1 × 200, 1 × 200).
    let sent: Vec<u64> = reports
        .iter()
        .map(|r| r["sent"].as_u64().expect("sent"))
        .collect();
    assert_eq!(sent, [330, 200, 200]);
    for report in &reports {
        let before = report["rss_before"].as_u64().expect("rss_before");
        let max = report["rss_max"].as_u64().expect("rss_max");
        // A real process's memory: megabytes, and the most is at least the first.
        assert!(before > 1_000_000 && max >= before, "{report}");
        assert!(report["pings"].as_u64().expect("pings") >= 1, "{report}");
        assert_eq!(report["unanswered"], 0, "{report}");
        assert!(
            report["refused"].as_array().is_some_and(Vec::is_empty),
            "{report}"
        );
    }
}
