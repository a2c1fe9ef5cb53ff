//! What the browser tests share: whether Chromium, Node and playwright-core are here, and a
//! harness that runs a script of tests/browser under Node and answers its commands.
//!
//! A script prints `CMD NAME JSON` on a line when it needs the Rust side (a Rust client to
//! publish, a proxy to cut, a record to change behind the page's back); the harness runs the
//! test's handler and answers `OK JSON` on the script's stdin. `PASS` means every check passed;
//! anything else the script prints is shown. `scripts/install-browser.sh` installs what is
//! needed (CI runs it and sets `DUPLEX_TEST_BROWSER=1`, which makes a missing piece a failure
//! instead of a skip).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

/// The folder of the browser scripts.
pub(crate) fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser")
}

/// Why the browser tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        return Some(format!("no Chromium at {chromium}"));
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("no node".into());
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("tests/browser/node_modules has no playwright-core".into());
    }
    None
}

/// True when the browser tests can run; false (having said why) when they are skipped.
pub(crate) fn available() -> bool {
    let Some(why) = missing() else {
        return true;
    };
    if std::env::var_os("DUPLEX_TEST_BROWSER").is_some() {
        panic!("DUPLEX_TEST_BROWSER is set but {why}; run scripts/install-browser.sh");
    }
    eprintln!("skipped: {why} (run scripts/install-browser.sh, then set DUPLEX_TEST_BROWSER=1)");
    false
}

/// What a script's command gets back.
pub(crate) type Answer<'a> = Pin<Box<dyn Future<Output = Value> + 'a>>;

/// Runs `script` with `env`, answering its commands with `handle(name, argument)`, and
/// asserts that it passed within `limit`.
pub(crate) async fn run_script<'a>(
    script: &str,
    env: &[(&str, String)],
    limit: Duration,
    mut handle: impl FnMut(String, Value) -> Answer<'a>,
) {
    let mut node = tokio::process::Command::new("node");
    node.arg(script)
        .current_dir(browser_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (key, value) in env {
        node.env(key, value);
    }
    let mut node = node.spawn().expect("spawn node");
    let mut stdin = node.stdin.take().expect("stdin");
    let mut lines = BufReader::new(node.stdout.take().expect("stdout")).lines();
    let mut passed = false;
    let run = async {
        while let Some(line) = lines.next_line().await.expect("read node's output") {
            if line == "PASS" {
                passed = true;
                continue;
            }
            let Some(command) = line.strip_prefix("CMD ") else {
                eprintln!("node: {line}");
                continue;
            };
            let (name, argument) = command.split_once(' ').unwrap_or((command, "null"));
            let argument: Value = serde_json::from_str(argument).expect("a JSON argument");
            let answer = handle(name.to_owned(), argument).await;
            stdin
                .write_all(format!("OK {answer}\n").as_bytes())
                .await
                .expect("answer node");
        }
    };
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("{script} finishes within {limit:?}"));
    let status = node.wait().await.expect("node exits");
    assert!(status.success() && passed, "{script} failed: {status}");
}
