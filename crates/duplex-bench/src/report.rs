//! A self-contained HTML report of the transport comparison, with SVG charts drawn here (no
//! scripts, no external assets), so the file opens anywhere.

use std::fmt::Write as _;

use crate::compare::CompareReport;
use crate::fanout::FanoutReport;
use crate::transports::{MethodReport, TransportsReport};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 300.0;
const MARGIN: f64 = 56.0;
const COLOURS: [&str; 5] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A bar chart: one group per method, one bar per series.
pub fn bar_chart(title: &str, unit: &str, methods: &[&str], series: &[(&str, Vec<f64>)]) -> String {
    let max = series
        .iter()
        .flat_map(|(_, values)| values.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let plot_width = WIDTH - 2.0 * MARGIN;
    let plot_height = HEIGHT - 2.0 * MARGIN;
    let group = plot_width / methods.len().max(1) as f64;
    let bar = group * 0.8 / series.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let base = HEIGHT - MARGIN;
    let _ = write!(
        svg,
        r##"<line x1="{MARGIN}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"##,
        WIDTH - MARGIN,
        HEIGHT / 2.0,
        HEIGHT / 2.0,
        escape(unit)
    );
    for (m, method) in methods.iter().enumerate() {
        let x0 = MARGIN + group * m as f64 + group * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            let value = values.get(m).copied().unwrap_or(0.0);
            let height = value / max * plot_height;
            let x = x0 + bar * s as f64;
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{height:.1}" fill="{}"><title>{}: {value:.3} {}</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                base - height,
                bar * 0.9,
                COLOURS[s % COLOURS.len()],
                escape(method),
                escape(unit),
                x + bar * 0.45,
                base - height - 3.0,
                format_value(value)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x0 + group * 0.4,
            base + 16.0,
            escape(method)
        );
    }
    for (s, (name, _)) in series.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="32" width="10" height="10" fill="{}"/><text x="{:.1}" y="41">{}</text>"#,
            MARGIN + 150.0 * s as f64,
            COLOURS[s % COLOURS.len()],
            MARGIN + 150.0 * s as f64 + 14.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn format_value(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

/// A line chart of one series per method; `log_y` draws the y axis in log10.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> String {
    let y_of = |v: f64| if log_y { v.max(1e-3).log10() } else { v };
    let points = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x_max, mut y_min, mut y_max) = (1e-9_f64, f64::MAX, f64::MIN);
    for (x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y_of(y));
        y_max = y_max.max(y_of(y));
    }
    if y_min >= y_max {
        y_min -= 1.0;
        y_max += 1.0;
    }
    let plot_width = WIDTH - 2.0 * MARGIN;
    let plot_height = HEIGHT - 2.0 * MARGIN;
    let sx = |x: f64| MARGIN + x / x_max * plot_width;
    let sy = |y: f64| HEIGHT - MARGIN - (y_of(y) - y_min) / (y_max - y_min) * plot_height;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15">{}</text><line x1="{MARGIN}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{}" stroke="#333"/><text x="{}" y="{}" text-anchor="middle">{}</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"##,
        WIDTH / 2.0,
        escape(title),
        HEIGHT - MARGIN,
        WIDTH - MARGIN,
        HEIGHT - MARGIN,
        HEIGHT - MARGIN,
        WIDTH / 2.0,
        HEIGHT - 12.0,
        escape(x_label),
        HEIGHT / 2.0,
        HEIGHT / 2.0,
        escape(y_label)
    );
    let (low, high) = if log_y {
        (10f64.powf(y_min), 10f64.powf(y_max))
    } else {
        (y_min, y_max)
    };
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end" font-size="10">{}</text><text x="{}" y="{}" text-anchor="end" font-size="10">{}</text>"#,
        MARGIN - 4.0,
        HEIGHT - MARGIN,
        format_value(low),
        MARGIN - 4.0,
        MARGIN + 4.0,
        format_value(high)
    );
    for (s, (name, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/><rect x="{:.1}" y="32" width="10" height="10" fill="{}"/><text x="{:.1}" y="41">{}</text>"#,
            COLOURS[s % COLOURS.len()],
            path.join(" "),
            MARGIN + 150.0 * s as f64,
            COLOURS[s % COLOURS.len()],
            MARGIN + 150.0 * s as f64 + 14.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The latency chart (p50 and p99 per method), on its own, for documentation.
pub fn latency_svg(report: &TransportsReport) -> String {
    let names: Vec<&str> = report.methods.iter().map(|m| m.method.name()).collect();
    bar_chart(
        "Delivery latency by transport",
        "milliseconds",
        &names,
        &[
            (
                "p50",
                report.methods.iter().map(|m| m.latency_ms.p50).collect(),
            ),
            (
                "p99",
                report.methods.iter().map(|m| m.latency_ms.p99).collect(),
            ),
        ],
    )
}

fn table(methods: &[MethodReport]) -> String {
    let mut html = String::from(
        "<table><tr><th>transport</th><th>deliveries/s</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>max ms</th><th>drain ms</th><th>server CPU s / 1,000 deliveries</th><th>bytes / delivery</th><th>HTTP requests / delivery</th><th>missed</th><th>duplicated</th></tr>",
    );
    for m in methods {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{:.0}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.1}</td><td>{}</td><td>{:.0}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            m.method.name(),
            m.deliveries_per_second,
            m.latency_ms.p50,
            m.latency_ms.p90,
            m.latency_ms.p99,
            m.latency_ms.max,
            m.drain_ms,
            m.server_cpu_per_1000_deliveries
                .map_or("–".to_owned(), |c| format!("{c:.4}")),
            m.bytes_per_delivery,
            m.requests_per_delivery,
            m.missed,
            m.duplicated
        );
    }
    html.push_str("</table>");
    html
}

/// The whole report as one HTML page.
pub fn html(report: &TransportsReport) -> String {
    let names: Vec<&str> = report.methods.iter().map(|m| m.method.name()).collect();
    let clients = report.methods.first().map_or(0, |m| m.clients);
    let distribution: Vec<(&str, Vec<(f64, f64)>)> = report
        .methods
        .iter()
        .map(|m| (m.method.name(), m.latency_distribution.clone()))
        .collect();
    let throughput: Vec<(&str, Vec<(f64, f64)>)> = report
        .methods
        .iter()
        .map(|m| {
            let points = m
                .deliveries_per_second_series
                .iter()
                .enumerate()
                .map(|(second, count)| (second as f64, *count as f64))
                .collect();
            (m.method.name(), points)
        })
        .collect();
    // A server whose pid was not given has no CPU figures: no chart rather than bars at 0.
    let cpu: Option<Vec<f64>> = report
        .methods
        .iter()
        .map(|m| m.server_cpu_per_1000_deliveries)
        .collect();
    let cpu_chart = cpu.map_or_else(
        || "<p>Server CPU was not measured (no server process id).</p>".to_owned(),
        |cpu| {
            bar_chart(
                "Server CPU per 1,000 deliveries",
                "CPU seconds",
                &names,
                &[("cpu", cpu)],
            )
        },
    );
    let charts = [
        latency_svg(report),
        line_chart(
            "Latency distribution",
            "percentile",
            "milliseconds (log scale)",
            &distribution,
            true,
        ),
        line_chart(
            "Deliveries per second over the run",
            "seconds",
            "deliveries",
            &throughput,
            false,
        ),
        cpu_chart,
        bar_chart(
            "Bytes received per delivery",
            "bytes",
            &names,
            &[(
                "bytes",
                report
                    .methods
                    .iter()
                    .map(|m| m.bytes_per_delivery)
                    .collect(),
            )],
        ),
        bar_chart(
            "HTTP requests per delivery",
            "requests",
            &names,
            &[(
                "requests",
                report
                    .methods
                    .iter()
                    .map(|m| m.requests_per_delivery)
                    .collect(),
            )],
        ),
    ];
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>duplex: HTTP against sockets</title><style>body{{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}}td:first-child{{text-align:left}}svg{{display:block;margin:1.5em 0}}</style></head><body><h1>The same updates by five transports</h1><p>{clients} clients per transport follow one channel while a publisher sends {} updates a second of {} bytes for {:.0} s; short polling asks every {:.1} s. Latency is from each update's due time to its receipt; deliveries/s counts the updates received in order over the time from the first due time to the last delivery; bytes are every byte the clients read from their sockets, connection setup included; server CPU runs from the first update to the end of the drain.</p>{}{}</body></html>"#,
        report.rate,
        report.size,
        report.duration_seconds,
        report.poll_interval_seconds,
        table(&report.methods),
        charts.join("")
    )
}

/// A fan-out run matrix as one HTML page: latency and throughput per run.
pub fn fanout_html(runs: &[FanoutReport]) -> String {
    let labels: Vec<String> = runs
        .iter()
        .map(|r| format!("{}×{}/s×{}B", r.subscribers, r.rate, r.size))
        .collect();
    let names: Vec<&str> = labels.iter().map(String::as_str).collect();
    let latency = bar_chart(
        "Fan-out latency per run",
        "milliseconds",
        &names,
        &[
            ("p50", runs.iter().map(|r| r.latency_ms.p50).collect()),
            ("p99", runs.iter().map(|r| r.latency_ms.p99).collect()),
        ],
    );
    let throughput = bar_chart(
        "Deliveries per second per run",
        "deliveries/s",
        &names,
        &[(
            "deliveries/s",
            runs.iter().map(|r| r.deliveries_per_second).collect(),
        )],
    );
    let mut rows = String::new();
    for (label, r) in labels.iter().zip(runs) {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{:.0}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>",
            escape(label),
            r.deliveries_per_second,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.missed + r.duplicated
        );
    }
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>duplex: fan-out</title><style>body{{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}}td:first-child{{text-align:left}}svg{{display:block;margin:1.5em 0}}</style></head><body><h1>Fan-out</h1><table><tr><th>subscribers × rate × size</th><th>deliveries/s</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>max ms</th><th>missed</th></tr>{rows}</table>{latency}{throughput}</body></html>"#
    )
}

/// Which latency percentile a chart draws.
type Percentile = fn(&crate::Percentiles) -> f64;

/// `duplex bench compare` as one HTML page: the sustained rates, latency against the rate
/// offered, what a delivery cost in CPU and memory, and idle memory per connection.
pub fn compare_html(report: &CompareReport) -> String {
    let names: Vec<&str> = report.contenders.iter().map(|c| c.name).collect();
    let sustained = |f: &dyn Fn(&crate::Sustained) -> f64| -> Vec<f64> {
        report
            .contenders
            .iter()
            .map(|c| c.sustained.as_ref().map_or(0.0, f))
            .collect()
    };
    let mut charts = vec![bar_chart(
        &format!(
            "Deliveries per second sustained (p99 ≤ {:.0} ms, nothing missed)",
            report.p99_bound_ms
        ),
        "deliveries/s",
        &names,
        &[("deliveries/s", sustained(&|s| s.deliveries_per_second))],
    )];
    // One line per server: a latency percentile against the deliveries/s offered, per run.
    let against_offered = |percentile: Percentile| {
        report
            .contenders
            .iter()
            .map(|c| {
                let points = c
                    .runs
                    .iter()
                    .map(|r| {
                        (
                            f64::from(r.rate) * r.subscribers as f64,
                            percentile(&r.latency_ms),
                        )
                    })
                    .collect();
                (c.name, points)
            })
            .collect::<Vec<(&str, Vec<(f64, f64)>)>>()
    };
    let percentiles: [(&str, Percentile); 2] = [("p99", |p| p.p99), ("p50", |p| p.p50)];
    for (name, percentile) in percentiles {
        charts.push(line_chart(
            &format!("{name} latency against deliveries/s offered"),
            "deliveries/s offered",
            &format!("{name} ms (log)"),
            &against_offered(percentile),
            true,
        ));
    }
    if report.contenders.iter().any(|c| {
        c.sustained
            .as_ref()
            .is_some_and(|s| s.server_cpu_per_1000.is_some())
    }) {
        charts.push(bar_chart(
            "Server CPU per 1,000 deliveries at the sustained rate",
            "CPU ms",
            &names,
            &[(
                "CPU ms",
                sustained(&|s| s.server_cpu_per_1000.unwrap_or(0.0) * 1000.0),
            )],
        ));
    }
    charts.push(bar_chart(
        "Server memory at the sustained rate",
        "MiB",
        &names,
        &[(
            "RSS MiB",
            sustained(&|s| s.server_rss_bytes.unwrap_or(0) as f64 / 1048576.0),
        )],
    ));
    let idle: Vec<(&str, f64)> = report
        .contenders
        .iter()
        .filter_map(|c| c.idle.as_ref().map(|i| (c.name, i.rss_per_connection)))
        .collect();
    if !idle.is_empty() {
        let idle_names: Vec<&str> = idle.iter().map(|(name, _)| *name).collect();
        charts.push(bar_chart(
            "Server memory per idle WebSocket connection",
            "bytes",
            &idle_names,
            &[("bytes", idle.iter().map(|(_, bytes)| *bytes).collect())],
        ));
    }
    let mut rows = String::new();
    for c in &report.contenders {
        let s = c.sustained.as_ref();
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
            escape(c.name),
            s.map_or("—".to_owned(), |s| format!(
                "{:.0}",
                s.deliveries_per_second
            )),
            s.map_or("—".to_owned(), |s| s.rate.to_string()),
            s.map_or("—".to_owned(), |s| format!("{:.2}", s.p50_ms)),
            s.map_or("—".to_owned(), |s| format!("{:.2}", s.p99_ms)),
            s.and_then(|s| s.server_cpu_per_1000)
                .map_or("—".to_owned(), |cpu| format!("{:.1}", cpu * 1000.0)),
            s.and_then(|s| s.server_rss_bytes)
                .map_or("—".to_owned(), |rss| format!(
                    "{:.0}",
                    rss as f64 / 1048576.0
                )),
            s.map_or("—".to_owned(), |s| format!("{:.2}", s.client_cores)),
            c.idle
                .as_ref()
                .map_or("—".to_owned(), |i| format!("{:.0}", i.rss_per_connection)),
            c.idle
                .as_ref()
                .map_or("—".to_owned(), |i| format!("{:.0}", i.connect_rate)),
            escape(&c.stopped),
        );
    }
    let mut runs = String::new();
    for c in &report.contenders {
        for r in &c.runs {
            let _ = write!(
                runs,
                "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
                escape(c.name),
                r.rate,
                r.deliveries_per_second,
                r.latency_ms.p50,
                r.latency_ms.p99,
                r.latency_ms.max,
                r.missed + r.duplicated,
                r.server_cpu_seconds
                    .map_or("—".to_owned(), |cpu| format!("{cpu:.2}")),
                r.client_cpu_seconds,
            );
        }
    }
    let idle_count = report
        .contenders
        .iter()
        .find_map(|c| c.idle.as_ref().map(|i| i.connections))
        .unwrap_or(0);
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>duplex beside Node ws and Socket.IO</title><style>body{{font-family:sans-serif;max-width:860px;margin:2em auto;color:#222}}table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}}td:first-child{{text-align:left}}svg{{display:block;margin:1.5em 0}}</style></head><body><h1>duplex beside Node ws and Socket.IO</h1><p>{} subscribers follow one channel (a room for Socket.IO; every client for ws) while one publisher sends messages of {} bytes at rising rates, {:.0} s per rate, each server until its p99 passes {:.0} ms or a delivery is missed, twice in a row at the same rate. Latency runs from each message's due time to its receipt, so a server that falls behind shows it; deliveries/s counts the messages received in order over the time from the first due time to the last delivery. The same load client ({} subscriber threads, one publisher thread) measures every server; servers and client share this machine's {} cores, and the client's own CPU is in the table (in cores). Idle memory: the server's resident memory gained per connection with {} idle WebSocket connections open.</p><table><tr><th>server</th><th>deliveries/s sustained</th><th>at rate/s</th><th>p50 ms</th><th>p99 ms</th><th>server CPU ms / 1,000 deliveries</th><th>server RSS MiB</th><th>client cores</th><th>bytes / idle connection</th><th>connects/s</th><th>stopped rising</th></tr>{rows}</table>{}<h2>Every run</h2><table><tr><th>server</th><th>rate/s</th><th>deliveries/s</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th><th>missed</th><th>server CPU s</th><th>client CPU s</th></tr>{runs}</table></body></html>"#,
        report.subscribers,
        report.size,
        report.duration_seconds,
        report.p99_bound_ms,
        report.client_threads,
        report.cores,
        idle_count,
        charts.join(""),
    )
}
