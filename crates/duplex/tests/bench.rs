//! `duplex bench fanout` and `duplex bench connections` as processes, each against the server it
//! starts as a child (a real process of its own, so its CPU and memory are the server's alone):
//! the figures they print are checked against the load they were given.

use std::process::Command;

use serde_json::Value;

/// Runs `duplex bench ARGS --json` and returns what it printed.
async fn bench_json(args: &'static [&'static str]) -> Value {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_duplex"))
            .arg("bench")
            .args(args)
            .arg("--json")
            .env("DUPLEX_LOG", "warn")
            .output()
            .expect("run duplex bench")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_figures_are_counted_from_the_run_not_from_the_load_offered() {
    // 100 publications/s to 50 subscribers for 2 s: 200 publications, 10,000 deliveries,
    // 5,000 deliveries/s offered.
    let report = bench_json(&[
        "fanout",
        "--subscribers",
        "50",
        "--rate",
        "100",
        "--size",
        "64",
        "--duration",
        "2s",
        "--p99-under",
        "1s",
    ])
    .await;
    let run = &report["runs"][0];
    assert_eq!(run["publications"], 200, "{run}");
    assert_eq!(run["deliveries"], 10_000, "{run}");
    assert_eq!((&run["missed"], &run["duplicated"]), (&0.into(), &0.into()));
    let counted = run["deliveries_per_second"].as_f64().expect("deliveries/s");
    assert!(
        (2_500.0..=5_005.0).contains(&counted),
        "{counted} deliveries/s counted for 5,000 offered"
    );
    let drain = run["drain_ms"].as_f64().expect("drain");
    assert!((0.0..5_000.0).contains(&drain), "{run}");
    // The child server's own CPU over about 2 s of publishing and its tail, on two cores: some,
    // and less than all of both cores.
    let cpu = run["server_cpu_seconds"]
        .as_f64()
        .expect("the server's CPU");
    assert!(cpu > 0.0 && cpu < 2.0 * 7.0, "{run}");
    // The line under the bound names the figure the run counted, not rate × subscribers.
    let best = &report["highest_rates"][0];
    assert_eq!(best["highest_rate"], 100, "{best}");
    assert_eq!(
        best["deliveries_per_second"].as_f64(),
        Some(counted),
        "{best}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cost_the_child_server_kilobytes_each() {
    let report = bench_json(&["connections", "--connections", "400", "--sources", "1"]).await;
    assert_eq!(report["connections"], 400, "{report}");
    let before = report["rss_before"].as_u64().expect("rss_before");
    let after = report["rss_after"].as_u64().expect("rss_after");
    // A real server process: megabytes before, more after 400 WebSocket connections.
    assert!(before > 1_000_000 && after > before, "{report}");
    // An idle connection holds about 4 KiB here (docs/benchmarks.md): at least a few hundred
    // bytes, and far from the tens of kilobytes of buffers that would mean a regression.
    let each = report["rss_per_connection"]
        .as_f64()
        .expect("per connection");
    assert!(
        (512.0..32_768.0).contains(&each),
        "{each} bytes per connection"
    );
    assert!(report["connect_rate"].as_f64().expect("rate") > 0.0);
}
