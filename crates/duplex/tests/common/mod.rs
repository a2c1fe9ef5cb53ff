//! What the process tests share: `duplex serve` as a child process.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Spawns `duplex serve` on port 0 with `--data data` and `args`, and returns it with the HTTP
/// address it printed. The child is killed when dropped.
pub(crate) async fn spawn_serve(data: &std::path::Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
        .args(args)
        .arg("--data")
        .arg(data)
        .env("DUPLEX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn duplex");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the server prints its address in time")
        .expect("read stdout")
        .expect("a line");
    let url = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (child, url)
}

/// Sends SIGTERM to a server started by [`spawn_serve`] and waits (15 s at most) for it to
/// exit successfully.
#[allow(
    dead_code,
    reason = "not every test file that shares this module stops a server this way"
)]
pub(crate) async fn terminate(child: &mut Child) {
    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the server exits after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
}
