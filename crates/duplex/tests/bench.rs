//! `duplex bench` as a process (fan-out, idle connections, attacks, the comparison with its
//! peers), each run against the server
//! it starts as a child (a real process of its own, so its CPU and memory are the server's
//! alone): the figures it prints are checked against the load it was given.

use std::process::Command;

use serde_json::Value;

/// Runs `duplex bench ARGS --json` and returns what it printed.
async fn bench_json(args: &[&str]) -> Value {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
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
    // An idle connection holds about 2 KiB here (docs/benchmarks.md): at least a few hundred
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_bench_runs_every_scenario_against_a_default_server() {
    // Each attack against its own default server, bounded, with the server's memory and a
    // healthy client measured throughout.
    let reports = bench_json(&["attack", "--scale", "0.01", "--hold", "300ms"]).await;
    let reports = reports.as_array().expect("one report per attack");
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
    for report in reports {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_measures_duplex_and_its_peers_with_the_same_client() {
    // The short version of `duplex bench compare`, as CI runs it, so that the peer servers and
    // their protocol adapters keep working.
    let peers = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/peers");
    if !peers.join("node_modules/socket.io").is_dir() {
        assert!(
            std::env::var_os("DUPLEX_TEST_PEERS").is_none(),
            "DUPLEX_TEST_PEERS is set but the peers are not installed: run scripts/install-peers.sh"
        );
        eprintln!("skipped: run scripts/install-peers.sh (and set DUPLEX_TEST_PEERS) to run");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let html = dir.path().join("compare.html");
    let report = bench_json(&[
        "compare",
        "--subscribers",
        "40",
        "--rates",
        "50,100",
        "--size",
        "64",
        "--duration",
        "1s",
        "--warmup",
        "300ms",
        "--p99-under",
        "2s",
        "--connections",
        "100",
        "--report",
        html.to_str().expect("a UTF-8 path"),
    ])
    .await;
    let contenders = report["contenders"].as_array().expect("contenders");
    let names: Vec<&str> = contenders
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        ["duplex WebSocket", "duplex raw TCP", "Node ws", "Socket.IO"]
    );
    for contender in contenders {
        // Both rates are light: each server keeps up with both, and every delivery counts.
        let runs = contender["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "{contender}");
        for run in runs {
            let publications = run["publications"].as_u64().expect("publications");
            assert_eq!(run["deliveries"], publications * 40, "{run}");
            assert_eq!((&run["missed"], &run["duplicated"]), (&0.into(), &0.into()));
            assert!(run["server_cpu_seconds"].as_f64().expect("server CPU") > 0.0);
        }
        let sustained = &contender["sustained"];
        assert_eq!(sustained["rate"], 100, "{contender}");
        let counted = sustained["deliveries_per_second"].as_f64().expect("rate");
        assert!((2_000.0..=4_005.0).contains(&counted), "{contender}");
        assert_eq!(contender["stopped"], "the highest rate asked for");
        // Idle memory over WebSocket for every server (raw TCP has no WebSocket to hold).
        let idle = &contender["idle"];
        if contender["contender"] == "duplex_tcp" {
            assert!(idle.is_null(), "{contender}");
        } else {
            assert_eq!(idle["connections"], 100, "{contender}");
            assert!(idle["rss_after"].as_u64().expect("rss") > 1_000_000);
        }
    }
    let html = std::fs::read_to_string(&html).expect("the HTML report");
    for expected in [
        "Node ws",
        "Socket.IO",
        "duplex raw TCP",
        "<svg",
        "p99 latency against",
        "p50 latency against",
        "Every run",
    ] {
        assert!(
            html.contains(expected),
            "{expected} missing from the report"
        );
    }
}

/// A short soak: clients on every transport come and go (dropping without closing, resuming
/// `since`), each checking every offset, and the server lets go of everything once they left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_checks_every_transport_and_finds_nothing_left_behind() {
    let report = bench_json(&[
        "soak",
        "--duration",
        "8s",
        "--clients",
        "120",
        "--channels",
        "6",
        "--rate",
        "60",
        "--sample-every",
        "1s",
        "--warmup",
        "3s",
        "--max-session",
        "2s",
    ])
    .await;
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    let counts = &report["counts"];
    assert_eq!(counts["violations"], 0, "{report}");
    for (transport, sessions) in ["WebSocket", "raw TCP", "SSE", "long poll"]
        .iter()
        .zip(counts["sessions"].as_array().expect("sessions"))
    {
        assert!(sessions.as_u64() > Some(20), "{transport}: {report}");
    }
    for counted in ["resumed", "recovered", "dropped"] {
        assert!(counts[counted].as_u64() > Some(20), "{counted}: {report}");
    }
    // 60 a second for 8 s, all acknowledged; each reaches the 20 clients of its channel that
    // are connected at the time.
    let published = counts["published"].as_u64().expect("published");
    assert!((400..=490).contains(&published), "{report}");
    assert!(
        counts["delivered"].as_u64() > Some(published * 5),
        "{report}"
    );
    let samples = report["samples"].as_array().expect("samples");
    assert!(samples.len() >= 8, "{report}");
    let last = samples.last().expect("a last sample");
    assert_eq!(
        (&last["connections"], &last["long_polls"]),
        (&0.into(), &0.into()),
        "{last}"
    );
}

/// Chaos across three nodes, briefly, on each broker: nodes killed and cut off, the broker
/// killed and paused, and not one client sees a silent gap or a repeat; with
/// `DUPLEX_TEST_POSTGRES`, racing `If-Match` writes through every node keep each record's
/// versions whole. Needs `redis-server` and `nats-server` (where `DUPLEX_TEST_REDIS` /
/// `DUPLEX_TEST_NATS` are set, they are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chaos_run_on_each_broker_finds_no_gap_and_no_repeat() {
    for (broker, variable) in [("redis", "DUPLEX_TEST_REDIS"), ("nats", "DUPLEX_TEST_NATS")] {
        if std::env::var_os(variable).is_none() {
            eprintln!("skipped chaos on {broker}: set {variable} to run");
            continue;
        }
        // With PostgreSQL, the nodes share it and record writes are checked too.
        let store = std::env::var("DUPLEX_TEST_POSTGRES").ok();
        let mut args = vec![
            "chaos",
            "--broker",
            broker,
            "--duration",
            "12s",
            "--clients",
            "90",
            "--channels",
            "6",
            "--rate",
            "40",
            "--max-session",
            "3s",
            "--max-calm",
            "2s",
            "--seed",
            "7",
        ];
        if let Some(store) = &store {
            args.extend(["--store", store.as_str()]);
        }
        let report = bench_json(&args).await;
        assert_eq!(
            report["failures"],
            serde_json::json!([]),
            "{broker}: {report}"
        );
        if store.is_some() {
            let records = &report["records"];
            assert!(
                records["succeeded"].as_u64() > Some(20),
                "{broker}: {records}"
            );
        }
        let counts = &report["counts"];
        assert_eq!(counts["violations"], 0, "{broker}: {report}");
        let events = report["events"].as_array().expect("events");
        assert!(events.len() >= 3, "{broker}: {report}");
        assert!(
            counts["delivered"].as_u64() > Some(100),
            "{broker}: {report}"
        );
        assert!(counts["resumed"].as_u64() > Some(20), "{broker}: {report}");
    }
}
