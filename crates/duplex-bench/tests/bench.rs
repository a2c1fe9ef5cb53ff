//! The load generators against a real server: short runs that check the reports, not timings.

use std::time::Duration;

use duplex_bench::{
    ConnectionsOptions, FanoutOptions, Protocol, ServerProcess, Transport, run_connections,
    run_fanout,
};
use duplex_testkit::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reports_every_delivery_on_both_transports_and_the_floor() {
    // The same open `bench` namespace as the config `duplex bench` gives its own server.
    let server = TestServer::start_with(|c| {
        c.namespaces = duplex_testkit::namespaces("[bench]\npublish = \"anyone\"\n");
    })
    .await;
    for transport in [Transport::Websocket, Transport::Tcp, Transport::Floor] {
        let report = run_fanout(&FanoutOptions {
            http_addr: server.http_addr.to_string(),
            tcp_addr: server.tcp_addr.to_string(),
            subscribers: 20,
            rate: 200,
            size: 64,
            duration: Duration::from_millis(500),
            transport,
            protocol: Protocol::Duplex,
            client_threads: 2,
            publish_addr: None,
            // The server runs in this process (with the load client, so this is an upper bound).
            server_pid: (transport != Transport::Floor).then(std::process::id),
        })
        .await
        .expect("a short run completes");
        assert_eq!(report.publications, 100);
        assert_eq!(report.deliveries, 100 * 20, "{transport:?}");
        assert_eq!((report.missed, report.duplicated), (0, 0));
        assert!(report.latency_ms.p50 <= report.latency_ms.p99);
        assert!(report.latency_ms.p99 <= report.latency_ms.max);
        // 200/s to 20 subscribers offers 4,000 deliveries/s for half a second: counted from the
        // first due time to the last delivery (or the window's end), the figure can only be at
        // or under that, and a light load like this one is kept up with.
        let offered = 200.0 * 20.0;
        assert!(
            (0.5 * offered..=1.001 * offered).contains(&report.deliveries_per_second),
            "{transport:?}: {} deliveries/s counted for {offered} offered",
            report.deliveries_per_second
        );
        assert!(
            report.drain_ms < 1000.0,
            "{transport:?}: {} ms",
            report.drain_ms
        );
        assert!(report.after_publishing <= report.deliveries);
        match (transport, report.server_cpu_seconds) {
            (Transport::Floor, cpu) => assert_eq!(cpu, None),
            // Half a second of publishing and at most 5 s of tail, on at most a few cores.
            (_, Some(cpu)) => assert!(
                cpu > 0.0 && cpu < 4.0 * 5.5,
                "{transport:?}: {cpu} CPU seconds in a half-second run"
            ),
            (_, None) => panic!("{transport:?}: no CPU measured though a pid was given"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reports_memory_per_connection() {
    let server = TestServer::start().await;
    let report = run_connections(&ConnectionsOptions {
        http_addr: server.http_addr.to_string(),
        protocol: Protocol::Duplex,
        server_pid: std::process::id(),
        connections: 50,
        concurrency: 10,
        sources: 3,
    })
    .await
    .expect("a short run completes");
    assert_eq!(report.connections, 50);
    assert!(report.connect_rate > 0.0);
    assert!(report.rss_after > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundtrips_report_requests_and_recoveries() {
    let server = TestServer::start().await;
    let addr = server.http_addr.to_string();
    let requests = duplex_bench::run_requests(&addr, 20)
        .await
        .expect("requests");
    assert_eq!(requests.samples, 20);
    assert!(requests.latency_ms.p50 > 0.0);
    let recovery = duplex_bench::run_recovery(&addr, 15, 3)
        .await
        .expect("recovery");
    assert_eq!(recovery.samples, 3);
    assert!(recovery.latency_ms.p50 <= recovery.latency_ms.max);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_report_every_method_with_nothing_lost() {
    // The publisher publishes over a socket, as `duplex bench` does to its own server.
    let server = TestServer::start_with(|c| {
        c.namespaces = duplex_testkit::namespaces("[bench]\npublish = \"anyone\"\n");
    })
    .await;
    let report = duplex_bench::run_transports(
        &duplex_bench::TransportsOptions {
            http_addr: server.http_addr.to_string(),
            tcp_addr: server.tcp_addr.to_string(),
            server_pid: Some(std::process::id()),
            clients: 10,
            rate: 20,
            size: 64,
            duration: Duration::from_millis(1000),
            poll_interval: Duration::from_millis(200),
            methods: duplex_bench::Method::ALL.to_vec(),
        },
        &|_, _, _| {},
    )
    .await
    .expect("a short run completes");
    assert_eq!(report.methods.len(), 5);
    for method in &report.methods {
        assert_eq!(method.publications, 20, "{:?}", method.method);
        assert_eq!(method.deliveries, 20 * 10, "{:?}", method.method);
        assert_eq!(
            (method.missed, method.duplicated),
            (0, 0),
            "{:?}",
            method.method
        );
        // 20 updates/s to 10 clients for a second: 200/s offered. Counted from the first due
        // time to the last delivery (a short poll's comes up to an interval late), never more.
        assert!(
            (100.0..=200.5).contains(&method.deliveries_per_second),
            "{:?}: {} deliveries/s for 200 offered",
            method.method,
            method.deliveries_per_second
        );
        // Every byte read: at least the 64-byte payload, and not kilobytes of it.
        assert!(
            (64.0..2000.0).contains(&method.bytes_per_delivery),
            "{:?}: {} bytes per delivery",
            method.method,
            method.bytes_per_delivery
        );
        let cpu = method
            .server_cpu_per_1000_deliveries
            .expect("a pid was given");
        assert!(cpu > 0.0, "{:?}: {cpu}", method.method);
    }
    let by = |wanted: duplex_bench::Method| {
        report
            .methods
            .iter()
            .find(|m| m.method == wanted)
            .expect("every method ran")
    };
    use duplex_bench::Method;
    // Short polls: the first poll and one every 200 ms for a second and the tail, per client
    // of 20 deliveries each.
    let short = by(Method::ShortPoll).requests_per_delivery;
    assert!((0.1..1.0).contains(&short), "short polling: {short}");
    // Long polls: the first one, then at most one per delivery.
    let long = by(Method::LongPoll).requests_per_delivery;
    assert!(long > 0.0 && long <= 21.0 / 20.0, "long polling: {long}");
    // One stream request per client, counted.
    assert_eq!(by(Method::Sse).requests_per_delivery, 10.0 / 200.0);
    assert_eq!(by(Method::Websocket).requests_per_delivery, 0.0);
    assert_eq!(by(Method::Tcp).requests_per_delivery, 0.0);
    // A long poll's answer carries an HTTP head; a WebSocket frame a few bytes of header.
    assert!(
        by(Method::LongPoll).bytes_per_delivery > by(Method::Websocket).bytes_per_delivery + 50.0
    );
    let html = duplex_bench::report::html(&report);
    assert!(html.starts_with("<!doctype html>"));
    assert_eq!(html.matches("<svg").count(), 6, "six charts");
    assert!(duplex_bench::report::latency_svg(&report).starts_with("<svg"));
    // Without the server's pid there is no CPU chart, rather than bars at 0.
    let mut unmeasured = report.clone();
    for method in &mut unmeasured.methods {
        method.server_cpu_per_1000_deliveries = None;
    }
    let html = duplex_bench::report::html(&unmeasured);
    assert_eq!(html.matches("<svg").count(), 5);
    assert!(html.contains("Server CPU was not measured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bench_reports_each_operation_beside_the_baseline() {
    let server = TestServer::start().await;
    let http_addr = server.http_addr.to_string();
    let size = duplex_bench::record_size(&http_addr)
        .await
        .expect("the record is created");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let baseline_addr = listener.local_addr().expect("addr").to_string();
    let baseline = tokio::spawn(duplex_bench::serve_baseline_on(listener, size));
    let body = reqwest::get(format!("http://{baseline_addr}/record"))
        .await
        .expect("the baseline answers")
        .bytes()
        .await
        .expect("body");
    assert_eq!(body.len(), size, "the baseline's body is the record's size");
    let options = duplex_bench::HttpOptions {
        concurrency: 4,
        duration: Duration::from_millis(300),
        server_pid: None,
        baseline: Some((baseline_addr, None)),
    };
    let report = duplex_bench::run_http(&http_addr, &options)
        .await
        .expect("a short run completes");
    baseline.abort();
    // Each record's timestamps print as many fractional digits as they need, so two records
    // of the same fields may differ by a few bytes.
    assert!(
        report.record_bytes.abs_diff(size) <= 12,
        "{} against {size}",
        report.record_bytes
    );
    let baseline = report.baseline.expect("the baseline was measured");
    assert!(baseline.requests > 0);
    let names: Vec<&str> = report.phases.iter().map(|p| p.operation).collect();
    assert_eq!(names, vec!["get", "list", "list-next", "create", "patch"]);
    for phase in &report.phases {
        assert!(phase.requests > 0, "{}", phase.operation);
        assert_eq!(phase.errors, 0, "{} failed", phase.operation);
        let ratio = phase.ratio.expect("a ratio to the baseline");
        let expected = phase.requests_per_second / baseline.requests_per_second;
        assert!((ratio - expected).abs() < 1e-9);
        let half = phase.half_rate.as_ref().expect("a half-rate pass");
        assert!((half.rate - phase.requests_per_second / 2.0).abs() < 1e-6);
        assert_eq!(half.errors, 0, "{} failed at half rate", phase.operation);
        // The server's own timing of the pass, from its /metrics: a bucket's bound.
        let server = half
            .server_p99_ms_at_most
            .expect("the server timed the pass");
        assert!(
            server > 0.0 && server <= 5000.0,
            "{}: {server}",
            phase.operation
        );
        let over = half.server_over_5ms_percent.expect("the share over 5 ms");
        assert!((0.0..=100.0).contains(&over), "{}: {over}", phase.operation);
        assert_eq!(
            over <= 1.0,
            server <= 5.0,
            "{}: at most 1 % over 5 ms exactly when the p99 is within 5 ms",
            phase.operation
        );
    }
    let baseline_half = baseline.half_rate.as_ref().expect("a half-rate pass");
    assert_eq!(
        baseline_half.server_p99_ms_at_most, None,
        "the baseline has no /metrics"
    );
    assert_eq!(baseline_half.server_over_5ms_percent, None);
}

#[tokio::test]
async fn fanout_across_two_nodes_counts_every_delivery() {
    let Some(broker) = duplex_testkit::redis_broker() else {
        eprintln!("skipped: set DUPLEX_TEST_REDIS (redis://127.0.0.1:6379) to run");
        return;
    };
    let node = |broker: String| {
        move |c: &mut duplex_server::Config| {
            c.namespaces = duplex_testkit::namespaces("[bench]\npublish = \"anyone\"\n");
            c.broker = Some(broker);
        }
    };
    let subscribers = TestServer::start_with(node(broker.clone())).await;
    let publisher = TestServer::start_with(node(broker)).await;
    let report = run_fanout(&FanoutOptions {
        http_addr: subscribers.http_addr.to_string(),
        tcp_addr: subscribers.tcp_addr.to_string(),
        subscribers: 20,
        rate: 200,
        size: 64,
        duration: Duration::from_millis(500),
        transport: Transport::Websocket,
        protocol: Protocol::Duplex,
        client_threads: 2,
        publish_addr: Some(publisher.http_addr.to_string()),
        server_pid: None,
    })
    .await
    .expect("a short run completes");
    assert_eq!(report.deliveries, 100 * 20);
    assert_eq!((report.missed, report.duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_publications_the_server_refuses_fails_rather_than_reports() {
    // No `[bench]` table: anonymous clients may not publish there.
    let server = TestServer::start().await;
    let error = run_fanout(&FanoutOptions {
        http_addr: server.http_addr.to_string(),
        tcp_addr: server.tcp_addr.to_string(),
        subscribers: 2,
        rate: 50,
        size: 64,
        duration: Duration::from_millis(100),
        transport: Transport::Websocket,
        protocol: Protocol::Duplex,
        client_threads: 1,
        publish_addr: None,
        server_pid: None,
    })
    .await
    .expect_err("every publication is refused");
    let message = format!("{error:#}");
    assert!(
        message.contains("refused 5 publications") && message.contains("\"type\":\"error\""),
        "{message}"
    );
}

/// Where the installed peer servers are; `None` (the test skips) when they are not installed,
/// unless `DUPLEX_TEST_PEERS` is set (as CI sets it), when a missing install fails the test.
fn installed_peers() -> Option<std::path::PathBuf> {
    let dir = duplex_bench::peers_dir();
    if dir.join("node_modules/ws").is_dir() && dir.join("node_modules/socket.io").is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("DUPLEX_TEST_PEERS").is_none(),
        "DUPLEX_TEST_PEERS is set but the peers are not installed in {}: run scripts/install-peers.sh",
        dir.display()
    );
    eprintln!("skipped: run scripts/install-peers.sh (and set DUPLEX_TEST_PEERS) to run");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peers_fan_out_to_every_subscriber_and_hold_idle_connections() {
    let Some(dir) = installed_peers() else {
        return;
    };
    for protocol in [Protocol::Ws, Protocol::SocketIo] {
        // Socket.IO pings every 100 ms here (25 s by default), so a client that did not answer
        // would be cut off within the run.
        let server = ServerProcess::start_peer(protocol, &dir, &["--ping-ms", "100"])
            .await
            .expect("the peer starts");
        let report = run_fanout(&FanoutOptions {
            http_addr: server.http_addr.clone(),
            tcp_addr: String::new(),
            subscribers: 20,
            rate: 200,
            size: 64,
            duration: Duration::from_millis(1000),
            transport: Transport::Websocket,
            protocol,
            client_threads: 2,
            publish_addr: None,
            server_pid: server.pid(),
        })
        .await
        .expect("a short run completes");
        assert_eq!(report.protocol, protocol);
        assert_eq!(report.publications, 200);
        assert_eq!(report.deliveries, 200 * 20, "{protocol:?}");
        assert_eq!((report.missed, report.duplicated), (0, 0), "{protocol:?}");
        let cpu = report.server_cpu_seconds.expect("the peer's CPU");
        assert!(
            cpu > 0.0 && cpu < 2.0 * 6.0,
            "{protocol:?}: {cpu} CPU seconds"
        );
        assert!(report.server_rss_bytes.expect("the peer's memory") > 1 << 20);
        assert!(report.client_cpu_seconds > 0.0);
        let idle = run_connections(&ConnectionsOptions {
            http_addr: server.http_addr.clone(),
            protocol,
            server_pid: server.pid().expect("running"),
            connections: 50,
            concurrency: 10,
            sources: 2,
        })
        .await
        .expect("idle connections");
        assert_eq!(idle.connections, 50, "{protocol:?}");
        server.stop().await.expect("stopped");
    }
}

#[tokio::test]
async fn a_peer_is_measured_over_websocket_only() {
    let error = run_fanout(&FanoutOptions {
        http_addr: "127.0.0.1:9".into(),
        tcp_addr: "127.0.0.1:9".into(),
        subscribers: 1,
        rate: 10,
        size: 64,
        duration: Duration::from_millis(100),
        transport: Transport::Tcp,
        protocol: Protocol::Ws,
        client_threads: 1,
        publish_addr: None,
        server_pid: None,
    })
    .await
    .expect_err("ws has no raw TCP");
    assert!(error.to_string().contains("over WebSocket only"), "{error}");
}
