//! The server under test, as a child process whose CPU time and memory we can read.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::peers::{Protocol, peer_command};

/// A `duplex serve` child process on loopback ports (or a peer server: [`ServerProcess::start_peer`]).
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// `127.0.0.1:PORT` of HTTP and WebSocket.
    pub http_addr: String,
    /// `127.0.0.1:PORT` of raw TCP.
    pub tcp_addr: String,
    _data: tempfile::TempDir,
}

/// CPU and memory of a process, read from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerUsage {
    /// User plus system CPU seconds so far.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
}

/// The `duplex.toml` a bench server runs with; a server given with `--server` needs the same
/// `[namespaces.bench]` table (or its publisher needs a token).
pub(crate) const BENCH_CONFIG: &str = "publish_rate = 100000000\npublish_burst = 100000000\n\n[namespaces.bench]\npublish = \"anyone\"\n";

/// [`BENCH_CONFIG`] with the `bench` namespace's history kept in `history_storage` (`memory`,
/// the default, or `store`).
pub fn bench_config(history_storage: &str) -> String {
    format!("{BENCH_CONFIG}history_storage = \"{history_storage}\"\n")
}

impl ServerProcess {
    /// Starts `exe serve` and waits for the line with its addresses.
    pub async fn start(exe: &Path) -> anyhow::Result<ServerProcess> {
        // The fan-out publisher is one connection sending as fast as asked: lift the
        // per-connection publish limit so the bench measures delivery, not the limiter, and
        // open the `bench` namespace to its anonymous publisher.
        Self::start_with_config(exe, BENCH_CONFIG).await
    }

    /// Starts `exe serve` with `config` as its `duplex.toml` (empty: the defaults a user gets).
    pub async fn start_with_config(exe: &Path, config: &str) -> anyhow::Result<ServerProcess> {
        let data = tempfile::tempdir()?;
        let config_text = config;
        let config = data.path().join("duplex.toml");
        std::fs::write(&config, config_text)?;
        let mut child = Command::new(exe)
            .args(["serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .arg("--data")
            .arg(data.path())
            .env("DUPLEX_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let (line, http_addr) = first_line_address(&mut child, "the server").await?;
        let Some(tcp_addr) = line.split_whitespace().last().map(str::to_owned) else {
            bail!("no TCP address in {line:?}");
        };
        Ok(ServerProcess {
            child,
            http_addr,
            tcp_addr,
            _data: data,
        })
    }

    /// Starts `exe bench baseline-server`: the bare axum route `duplex bench http` compares
    /// with, serving a body of `size` bytes.
    pub async fn start_baseline(exe: &Path, size: usize) -> anyhow::Result<ServerProcess> {
        let data = tempfile::tempdir()?;
        let mut child = Command::new(exe)
            .args(["bench", "baseline-server", "--size", &size.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let (_, http_addr) = first_line_address(&mut child, "the baseline").await?;
        Ok(ServerProcess {
            child,
            http_addr,
            tcp_addr: String::new(),
            _data: data,
        })
    }

    /// Starts the peer server of `protocol` (Node `ws` or Socket.IO) from `dir`
    /// ([`crate::peers_dir`]), on a free loopback port, with `args` after its own (Socket.IO
    /// takes `--ping-ms N`: its ping interval and timeout, 25 s and 20 s by default).
    pub async fn start_peer(
        protocol: Protocol,
        dir: &Path,
        args: &[&str],
    ) -> anyhow::Result<ServerProcess> {
        let mut command = Command::from(peer_command(protocol, dir)?);
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start node (scripts/install-peers.sh installs it)")?;
        let (_, http_addr) = first_line_address(&mut child, protocol.name()).await?;
        Ok(ServerProcess {
            child,
            http_addr,
            tcp_addr: String::new(),
            _data: tempfile::tempdir()?,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// CPU time and resident memory now.
    pub fn usage(&self) -> anyhow::Result<ServerUsage> {
        usage_of(self.pid().context("the server has exited")?)
    }

    /// Stops the server (SIGKILL: nothing of it is kept).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

impl ServerUsage {
    /// CPU time and resident memory of process `pid`.
    pub fn of(pid: u32) -> anyhow::Result<ServerUsage> {
        usage_of(pid)
    }
}

/// CPU time and resident memory of process `pid`.
pub(crate) fn usage_of(pid: u32) -> anyhow::Result<ServerUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after_name = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // `stat` counts in clock ticks (10 ms): a light second of work can read as nothing. The
    // process's CPU clock is the same total to the nanosecond, exited threads included.
    let cpu_seconds = process_cpu_seconds(pid).unwrap_or(ticks / clock_ticks_per_second());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(ServerUsage {
        cpu_seconds,
        rss_bytes: rss_kib * 1024,
    })
}

/// The CPU time process `pid` used so far, from its CPU-time clock; `None` where the system
/// does not give it.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    let time = nix::time::ClockId::pid_cpu_clock_id(pid).ok()?.now().ok()?;
    Some(time.tv_sec() as f64 + time.tv_nsec() as f64 / 1e9)
}

/// The unit of `/proc/PID/stat`'s CPU times: `sysconf(_SC_CLK_TCK)` (100 on common Linux
/// builds, but the kernel's `USER_HZ` is what counts).
fn clock_ticks_per_second() -> f64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100.0,
        ticks => ticks as f64,
    }
}

/// The first line `child` prints, and the `http://` address in it.
pub(crate) async fn first_line_address(
    child: &mut tokio::process::Child,
    what: &str,
) -> anyhow::Result<(String, String)> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .with_context(|| format!("{what} did not start within 30 s"))??
        .with_context(|| format!("{what} exited before printing its address"))?;
    let http_addr = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("http://"))
        .with_context(|| format!("no HTTP address in {what}'s first line"))?
        .to_owned();
    Ok((line, http_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_finer_than_a_clock_tick() {
        let pid = std::process::id();
        let before = usage_of(pid).expect("own usage").cpu_seconds;
        // Two milliseconds of work: a fifth of the 10 ms tick `/proc/PID/stat` counts in.
        let start = std::time::Instant::now();
        let mut spins = 0u64;
        while start.elapsed() < Duration::from_millis(2) {
            spins = std::hint::black_box(spins + 1);
        }
        let used = usage_of(pid).expect("own usage").cpu_seconds - before;
        assert!(used > 0.0005 && used < 1.0, "{used} s for 2 ms of work");
    }

    #[test]
    fn another_process_cpu_clock_is_readable() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let cpu = process_cpu_seconds(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let cpu = cpu.expect("a child's CPU clock");
        assert!((0.0..1.0).contains(&cpu), "{cpu}");
    }
}
