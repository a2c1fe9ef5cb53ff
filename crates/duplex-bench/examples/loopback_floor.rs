//! The floor under any fan-out figure on this machine: no server at all, only the kernel.
//!
//! `SUBSCRIBERS` loopback TCP connections; `WRITERS` plain threads write each "publication" (a
//! line of `SIZE` bytes stamped with its due time) to every connection with one blocking
//! `write` each, `RATE` times a second (what fell due during a turn goes out together in the
//! next turn's writes), and readers like `duplex bench fanout`'s (a tokio
//! runtime of `READER_THREADS` workers, one task per connection, a line parsed for its stamp)
//! record the latency. Whatever a real server adds (framing, queues, task wake-ups) comes on
//! top of this.
//!
//! ```sh
//! cargo run --release -p duplex-bench --example loopback_floor -- 1000 100 95 10 1 2
//! #                                       subscribers rate size seconds writers reader-threads
//! ```

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::AsyncBufReadExt as _;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let subscribers = arg(1, 1000) as usize;
    let rate = arg(2, 100).max(1);
    let size = arg(3, 95) as usize;
    let seconds = arg(4, 10);
    let writers = arg(5, 1).max(1) as usize;
    let reader_threads = arg(6, 2).max(1) as usize;
    let publications = rate * seconds;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(reader_threads)
        .enable_all()
        .build()?;
    let mut readers = Vec::new();
    let mut server_side = Vec::new();
    for _ in 0..subscribers {
        let client = TcpStream::connect(addr)?;
        client.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        server_side.push(server);
        readers.push(runtime.spawn(async move {
            let stream = tokio::net::TcpStream::from_std(client)?;
            let mut lines = tokio::io::BufReader::with_capacity(16 * 1024, stream);
            let mut line = Vec::new();
            let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
            for _ in 0..publications {
                line.clear();
                if lines.read_until(b'\n', &mut line).await? == 0 {
                    break;
                }
                let digits = line.iter().take_while(|b| b.is_ascii_digit());
                let sent = digits.fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                latency.record(now_micros().saturating_sub(sent).max(1))?;
            }
            anyhow::Ok(latency)
        }));
    }

    let interval = Duration::from_secs(1) / rate as u32;
    let start = Instant::now();
    let start_micros = now_micros();
    let chunk = subscribers.div_ceil(writers);
    let mut threads = Vec::new();
    for mut sockets in server_side
        .chunks(chunk)
        .map(|c| {
            c.iter()
                .map(|s| s.try_clone())
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?
    {
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            // Every turn writes what is due by then, in one write per socket: a server that
            // falls behind batches, as duplex's connections do.
            let mut lines = Vec::new();
            let mut next = 0u64;
            while next < publications {
                let wait =
                    (start + interval * next as u32).saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                let due = (start.elapsed().as_nanos() / interval.as_nanos()) as u64 + 1;
                lines.clear();
                for i in next..due.min(publications) {
                    let stamp = start_micros + (interval * i as u32).as_micros() as u64;
                    let line_start = lines.len();
                    write!(lines, "{stamp}")?;
                    lines.resize(
                        line_start + size.max(lines.len() - line_start + 1) - 1,
                        b'x',
                    );
                    lines.push(b'\n');
                }
                next = due.min(publications);
                for socket in &mut sockets {
                    socket.write_all(&lines)?;
                }
            }
            Ok(())
        }));
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let elapsed = start.elapsed();
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    runtime.block_on(async {
        for reader in readers {
            all.add(reader.await??)?;
        }
        anyhow::Ok(())
    })?;
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{subscribers} subscribers, {rate}/s, {size} B, {writers} writer thread(s), {reader_threads} reader thread(s): {:.0} deliveries/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        all.len() as f64 / elapsed.as_secs_f64(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        all.max() as f64 / 1000.0
    );
    Ok(())
}
