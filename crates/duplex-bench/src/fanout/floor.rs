//! [`super::Transport::Floor`]: the same subscribers against plain threads writing to loopback
//! sockets, no server at all: what the kernel alone costs.

use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::TcpStream;

use super::subscribers::{DueTimes, read_lines};
use super::{
    Driven, FanoutOptions, FanoutReport, Timing, Window, publications_of, report_of,
    subscribers_runtime,
};

/// The floor under every fan-out figure on this machine: no server at all. Plain threads (one
/// per core, as a server's runtime has) write each publication — a `message` line as duplex's
/// raw TCP sends it, stamped with its due time — to every loopback socket with one blocking
/// `write` each, what fell due during a turn going out together; the subscribers read lines as
/// [`super::Transport::Tcp`]'s do. Whatever a server adds (framing, queues, wake-ups) comes on top.
pub(super) async fn run_floor(options: &FanoutOptions) -> anyhow::Result<FanoutReport> {
    let publications = publications_of(options)?;
    let runtime = subscribers_runtime(options.client_threads)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u64);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut sockets = Vec::with_capacity(options.subscribers);
    let mut subscribers = Vec::with_capacity(options.subscribers);
    let due = DueTimes::default();
    for _ in 0..options.subscribers {
        let client = std::net::TcpStream::connect(addr)?;
        client.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        sockets.push(server);
        let stop = stop_rx.clone();
        let due = due.clone();
        subscribers.push(runtime.spawn(async move {
            let stream = TcpStream::from_std(client)?;
            read_lines(
                BufReader::with_capacity(16 * 1024, stream),
                publications,
                stop,
                due,
            )
            .await
        }));
    }
    let driven = Driven::start(runtime)?;
    let (rate, size) = (options.rate, options.size);
    let measured = async {
        let window = tokio::task::spawn_blocking(move || {
            write_floor(sockets, publications, rate, size, &due)
        })
        .await??;
        let all = crate::runs::collect_within(subscribers, Duration::from_secs(5), || {
            stop_tx.send(1).ok();
        })
        .await?;
        anyhow::Ok((all, window))
    }
    .await;
    driven.finish();
    let (all, window) = measured?;
    report_of(options, publications, window, &all)
}

/// The floor's writers: one thread per core, each with its share of the sockets.
pub(super) fn write_floor(
    mut sockets: Vec<std::net::TcpStream>,
    publications: u64,
    rate: u32,
    size: usize,
    due: &DueTimes,
) -> anyhow::Result<Window> {
    let writers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let share = sockets.len().div_ceil(writers).max(1);
    let timing = Timing::new(rate);
    let window = timing.window(publications);
    due.set(window.first_due_micros, window.last_due_micros);
    let padding = "x".repeat(size.saturating_sub(24));
    std::thread::scope(|scope| {
        let writers: Vec<_> = sockets
            .chunks_mut(share)
            .map(|share| scope.spawn(|| floor_turns(share, publications, &timing, &padding)))
            .collect();
        for writer in writers {
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("a floor writer panicked"))??;
        }
        anyhow::Ok(())
    })?;
    Ok(window)
}

/// One floor writer: sleeps to the next due time, then writes everything due by then to each
/// of its sockets in one `write`.
pub(super) fn floor_turns(
    sockets: &mut [std::net::TcpStream],
    publications: u64,
    timing: &Timing,
    padding: &str,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut lines = Vec::new();
    let mut next = 0;
    while next < publications {
        timing.sleep_until_due(next);
        let due_now = timing.start.elapsed().as_nanos() / timing.interval.as_nanos().max(1);
        let due_now = (due_now as u64 + 1).min(publications);
        lines.clear();
        for i in next..due_now {
            let t = timing.start_micros + timing.due(i).as_micros() as u64;
            let offset = i + 1;
            writeln!(
                lines,
                r#"{{"type":"message","channel":"floor","offset":{offset},"data":{{"t":{t},"p":"{padding}"}}}}"#
            )?;
        }
        next = due_now;
        for socket in sockets.iter_mut() {
            socket.write_all(&lines)?;
        }
    }
    Ok(())
}
