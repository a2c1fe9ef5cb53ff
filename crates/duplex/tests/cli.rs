//! The client commands run as processes against real servers: records, pub/sub, request,
//! presence, `sub` across a server restart, and `chat` in a pseudo-terminal.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use duplex_client::{ConnectOptions, Connection};
use duplex_testkit::TestServer;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn duplex(server: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duplex"));
    command
        .env("DUPLEX_SERVER", server)
        .env_remove("DUPLEX_TOKEN")
        .env_remove("DUPLEX_API_KEY")
        .env("DUPLEX_LOG", "warn");
    command
}

/// Runs a command to completion off the async runtime; (success, stdout, stderr).
async fn run(mut command: Command, stdin: Option<&str>) -> (bool, String, String) {
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn duplex");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write stdin");
        }
        let output = child.wait_with_output().expect("wait");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

fn parse(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn records_commands_create_read_update_list_and_delete() {
    let server = TestServer::start().await;
    let url = server.url("");
    let mut create = duplex(&url);
    create.args(["records", "create", "notes", r#"{"title":"from args"}"#]);
    let (ok, out, err) = run(create, None).await;
    assert!(ok, "{err}");
    let first = parse(&out);
    assert_eq!(first["title"], "from args");
    let id = first["id"].as_str().expect("id").to_owned();

    let mut create = duplex(&url);
    create.args(["records", "create", "notes", "--json"]);
    let (ok, out, _) = run(create, Some(r#"{"title":"from stdin"}"#)).await;
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "--json prints one line");
    assert_eq!(parse(&out)["title"], "from stdin");

    let mut update = duplex(&url);
    update.args([
        "records",
        "update",
        "notes",
        &id,
        r#"{"done":true}"#,
        "--merge",
        "--if-version",
        "1",
    ]);
    let (ok, out, err) = run(update, None).await;
    assert!(ok, "{err}");
    assert_eq!(parse(&out)["version"], 2);
    let mut stale = duplex(&url);
    stale.args([
        "records",
        "update",
        "notes",
        &id,
        r#"{"x":1}"#,
        "--if-version",
        "1",
    ]);
    let (ok, _, err) = run(stale, None).await;
    assert!(!ok);
    assert!(err.contains("412 precondition_failed"), "{err}");

    let mut get = duplex(&url);
    get.args(["records", "get", "notes", &id]);
    let (ok, out, _) = run(get, None).await;
    assert!(ok);
    let got = parse(&out);
    assert_eq!(
        (got["title"].clone(), got["done"].clone()),
        (json!("from args"), json!(true))
    );

    let mut list = duplex(&url);
    list.args([
        "records", "list", "notes", "--all", "--limit", "1", "--json", "--sort", "created",
    ]);
    let (ok, out, _) = run(list, None).await;
    assert!(ok);
    let titles: Vec<String> = out
        .lines()
        .map(|l| parse(l)["title"].as_str().expect("title").to_owned())
        .collect();
    assert_eq!(titles, ["from args", "from stdin"]);

    let mut delete = duplex(&url);
    delete.args(["records", "delete", "notes", &id]);
    assert!(run(delete, None).await.0);
    let mut get = duplex(&url);
    get.args(["records", "get", "notes", &id]);
    let (ok, _, err) = run(get, None).await;
    assert!(!ok);
    assert!(err.contains("404 not_found"), "{err}");

    let mut bad = duplex(&url);
    bad.args(["records", "create", "notes", "{not json"]);
    let (ok, _, err) = run(bad, None).await;
    assert!(!ok);
    assert!(err.contains("not JSON"), "{err}");
}

#[tokio::test]
async fn a_server_that_is_down_is_said_plainly() {
    for args in [
        vec!["records", "get", "notes", "x"],
        vec!["pub", "chat:lobby", "hi"],
        vec!["sub", "chat:lobby"],
    ] {
        let mut command = duplex("http://127.0.0.1:1");
        command.args(&args);
        let (ok, _, err) = run(command, None).await;
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("cannot reach the server at http://127.0.0.1:1"),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test]
async fn pub_request_and_presence_talk_to_live_connections() {
    let server =
        TestServer::start_with(|c| c.api_key = Some("the-admin-key-0123456789".into())).await;
    let url = server.url("");
    let connection = Connection::connect(
        ConnectOptions::new(&server.ws_url())
            .meta(json!({"name": "ana"}))
            .on_request(|data| async move { Ok(json!({"echo": data})) }),
    )
    .await
    .expect("connect");
    let mut lobby = connection.subscribe("chat:lobby").await.expect("subscribe");

    let mut publish = duplex(&url);
    publish.args([
        "pub",
        "chat:lobby",
        r#"{"text":"hi"}"#,
        "--api-key",
        "the-admin-key-0123456789",
    ]);
    let (ok, out, err) = run(publish, None).await;
    assert!(ok, "{err}");
    assert_eq!(parse(&out)["offset"], 1);
    let event = tokio::time::timeout(WAIT, lobby.next())
        .await
        .expect("in time")
        .expect("open");
    assert!(
        matches!(event, duplex_client::Event::Message(m) if m.data == duplex_client::Payload::Json(json!({"text": "hi"})))
    );

    // The same command with an idempotency key, run twice: published once.
    for replayed in [false, true] {
        let mut once = duplex(&url);
        once.args([
            "pub",
            "chat:lobby",
            "again",
            "--idempotency-key",
            "cli-once",
        ])
        .env("DUPLEX_API_KEY", "the-admin-key-0123456789");
        let (ok, out, err) = run(once, None).await;
        assert!(ok, "{err}");
        let printed = parse(&out);
        assert_eq!(printed["offset"], 2, "{printed}");
        assert_eq!(
            printed.get("replayed") == Some(&json!(true)),
            replayed,
            "{printed}"
        );
    }
    let event = tokio::time::timeout(WAIT, lobby.next())
        .await
        .expect("in time")
        .expect("open");
    assert!(
        matches!(&event, duplex_client::Event::Message(m) if m.offset == 2),
        "{event:?}"
    );

    let mut refused = duplex(&url);
    refused.args(["pub", "chat:lobby", "hi"]);
    let (ok, _, err) = run(refused, None).await;
    assert!(!ok);
    assert!(err.contains("401 unauthorized"), "{err}");

    let id = connection.client_id().expect("connected");
    let mut request = duplex(&url);
    request
        .args(["request", &id, r#"{"q":1}"#, "--timeout", "3s"])
        .env("DUPLEX_API_KEY", "the-admin-key-0123456789");
    let (ok, out, err) = run(request, None).await;
    assert!(ok, "{err}");
    assert_eq!(parse(&out), json!({"echo": {"q": 1}}));

    let mut presence = duplex(&url);
    presence
        .args(["presence", "chat:lobby"])
        .env("DUPLEX_API_KEY", "the-admin-key-0123456789");
    let (ok, out, err) = run(presence, None).await;
    assert!(ok, "{err}");
    let listed = parse(&out);
    assert_eq!(listed["clients"][0]["meta"]["name"], "ana");
}

/// A child process killed (by its PID) when the test ends, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// `duplex serve` as a child process on fixed ports; its stdout line says where.
fn serve(data: &std::path::Path, http: &str, tcp: &str) -> Killed {
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["serve", "--http", http, "--tcp", tcp, "--data"])
        .arg(data)
        .env("DUPLEX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the address line");
    assert!(line.contains("serving HTTP"), "{line}");
    Killed(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn terminate(child: &mut Killed) {
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    child.wait().expect("the server exits");
}

/// Lines a child prints, as they come.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `duplex sub` on a channel whose history is kept in the store (`chat`) goes on across a
/// restart of the server as across any reconnect: same epoch, nothing missed. On a channel
/// whose history is in memory (`feed`, the default namespace), it says what was lost.
#[test]
fn sub_follows_a_channel_across_a_server_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let http = format!("127.0.0.1:{}", free_port());
    let tcp = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{http}");
    let mut server = serve(data.path(), &http, &tcp);

    let follow = |channel: &str| {
        let mut sub = Killed(
            duplex(&url)
                .args(["sub", channel])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn sub"),
        );
        let lines = lines_of(sub.stdout.take().expect("stdout"));
        (sub, lines)
    };
    let publish = |channel: &str, text: &str| {
        let status = duplex(&url)
            .args(["pub", channel, text, "--json"])
            .stdout(Stdio::null())
            .status()
            .expect("pub");
        assert!(status.success());
    };
    let (mut kept, kept_lines) = follow("chat:restart");
    let (mut lost, lost_lines) = follow("feed:restart");
    let mut firsts = Vec::new();
    for (channel, lines) in [("chat:restart", &kept_lines), ("feed:restart", &lost_lines)] {
        // Retry until the subscription is in place (the first publish may race it).
        let first = loop {
            publish(channel, "before");
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(500)) {
                break line;
            }
        };
        let first: Value = serde_json::from_str(&first).expect("json line");
        assert_eq!(first["data"], "before");
        firsts.push(first);
    }
    // Publications while the subs are following, before the restart: offsets move on.
    publish("chat:restart", "also before");
    let before_restart = kept_lines.recv_timeout(WAIT).expect("a line");
    let before_restart: Value = serde_json::from_str(&before_restart).expect("json line");
    assert_eq!(before_restart["data"], "also before");

    terminate(&mut server);
    let mut server = serve(data.path(), &http, &tcp);
    // Whatever each sub prints from now on, until it prints the publication made after the
    // restart.
    let after_restart = |channel: &str, lines: &mpsc::Receiver<String>| {
        let mut printed = Vec::new();
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            publish(channel, "after");
            while let Ok(line) = lines.recv_timeout(Duration::from_millis(300)) {
                let value: Value = serde_json::from_str(&line).expect("json line");
                let done = value["data"] == "after";
                printed.push(value);
                if done {
                    return printed;
                }
            }
        }
        panic!("sub on {channel} printed no message published after the restart: {printed:?}");
    };
    let kept_printed = after_restart("chat:restart", &kept_lines);
    assert!(
        kept_printed.iter().all(|line| line.get("gap").is_none()),
        "nothing lost on chat: {kept_printed:?}"
    );
    let after = kept_printed
        .iter()
        .find(|line| line["data"] == "after")
        .expect("after");
    assert_eq!(after["epoch"], firsts[0]["epoch"], "the same epoch");
    assert_eq!(
        after["offset"],
        before_restart["offset"].as_u64().expect("offset") + 1,
        "the next offset: {kept_printed:?}"
    );

    let lost_printed = after_restart("feed:restart", &lost_lines);
    let gap = lost_printed
        .iter()
        .find(|line| line.get("gap").is_some())
        .unwrap_or_else(|| {
            panic!("sub said the history before the restart was lost: {lost_printed:?}")
        });
    assert_eq!(gap["gap"]["reason"], "epoch_changed");
    let after = lost_printed
        .iter()
        .find(|line| line["data"] == "after")
        .expect("after");
    assert_ne!(after["epoch"], firsts[1]["epoch"]);

    for sub in [&mut kept, &mut lost] {
        sub.kill().expect("stop sub");
        sub.wait().expect("sub exits");
    }
    terminate(&mut server);
}

#[tokio::test]
async fn chat_in_a_pseudo_terminal_shows_history_people_and_messages() {
    let server = TestServer::start().await;
    let url = server.url("");
    let client = duplex_client::Client::new(&url).expect("client");
    client
        .publish(
            "chat:den",
            &json!({"name": "bo", "text": "earlier message"}),
        )
        .await
        .expect("history");
    let bo = Connection::connect(ConnectOptions::new(&server.ws_url()).meta(json!({"name": "bo"})))
        .await
        .expect("bo");
    let _bo_in_den = bo.subscribe("chat:den").await.expect("subscribe");

    let binary = env!("CARGO_BIN_EXE_duplex").to_owned();
    let session = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(binary);
        command
            .args(["chat", "den", "--name", "ana", "--server", &url])
            .env("DUPLEX_LOG", "warn");
        let mut chat = rexpect::session::spawn_command(command, Some(15_000)).expect("pty");
        chat.exp_string("bo: earlier message")
            .expect("history on join");
        chat.exp_string("in the room: ana, bo")
            .expect("presence on join");
        chat.send_line("hello from the terminal").expect("type");
        chat.exp_string("ana: hello from the terminal")
            .expect("own message echoed");
        chat
    })
    .await
    .expect("chat started");

    let mut den = client.presence("chat:den").await.expect("presence");
    den.sort_by_key(|c| c.meta.as_ref().map(|m| m["name"].to_string()));
    assert_eq!(den.len(), 2);
    bo.publish("chat:den", &json!({"name": "bo", "text": "welcome ana"}))
        .await
        .expect("bo speaks");
    tokio::task::spawn_blocking(move || {
        let mut chat = session;
        chat.exp_string("bo: welcome ana").expect("live message");
        chat.send_line("/who").expect("type");
        chat.exp_string("in the room: ana, bo").expect("who");
        chat.send_line("/quit").expect("type");
        chat.exp_string("bye").expect("clean exit");
        chat.exp_eof().expect("the process ends");
    })
    .await
    .expect("chat ended");
}

#[tokio::test]
async fn https_and_wss_work_with_the_servers_certificate() {
    let certificate = duplex_testkit::TestCertificate::localhost();
    let cert = certificate.cert.clone();
    let server = TestServer::start_with(|c| c.tls = certificate.config()).await;
    let url = format!("https://localhost:{}", server.http_addr.port());

    let mut create = duplex(&url);
    create
        .args([
            "records",
            "create",
            "notes",
            r#"{"over":"https"}"#,
            "--ca-cert",
        ])
        .arg(&cert);
    let (ok, out, err) = run(create, None).await;
    assert!(ok, "{err}");
    assert_eq!(parse(&out)["over"], "https");

    // `sub` speaks wss:// to the same server; `pub` goes over https.
    let mut sub = Killed(
        duplex(&url)
            .args(["sub", "chat:tls", "--ca-cert"])
            .arg(&cert)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sub"),
    );
    let lines = lines_of(sub.stdout.take().expect("stdout"));
    let stderr = sub.stderr.take().expect("stderr");
    // Read off the runtime: the server under test runs on it.
    let subscribed = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stderr).read_line(&mut line).expect("read");
        line
    })
    .await
    .expect("join");
    assert!(
        subscribed.contains("subscribed to chat:tls"),
        "{subscribed}"
    );
    let mut publish = duplex(&url);
    publish
        .args(["pub", "chat:tls", "secure", "--ca-cert"])
        .arg(&cert);
    assert!(run(publish, None).await.0);
    let line = tokio::task::spawn_blocking(move || lines.recv_timeout(WAIT))
        .await
        .expect("join")
        .expect("a message over wss");
    assert_eq!(
        serde_json::from_str::<Value>(&line).expect("json")["data"],
        "secure"
    );
    sub.kill().expect("stop sub");
    sub.wait().expect("sub exits");

    let mut untrusted = duplex(&url);
    untrusted.args(["records", "list", "notes"]);
    let (ok, _, err) = run(untrusted, None).await;
    assert!(!ok);
    assert!(err.contains("cannot reach the server"), "{err}");
}

/// A certificate made by `openssl req -x509` (a CA, as WebPKI sees it) works with `--ca-cert`,
/// as it does with curl's `--cacert`.
#[tokio::test]
async fn a_certificate_made_by_openssl_works_with_ca_cert() {
    let certificate = duplex_testkit::TestCertificate::openssl_localhost();
    let cert = certificate.cert.clone();
    let server = TestServer::start_with(|c| c.tls = certificate.config()).await;
    let url = format!("https://localhost:{}", server.http_addr.port());
    let mut create = duplex(&url);
    create
        .args([
            "records",
            "create",
            "notes",
            r#"{"over":"openssl"}"#,
            "--ca-cert",
        ])
        .arg(&cert);
    let (ok, out, err) = run(create, None).await;
    assert!(ok, "{err}");
    assert_eq!(parse(&out)["over"], "openssl");
    let mut publish = duplex(&url);
    publish
        .args(["pub", "chat:openssl", "pinned", "--ca-cert"])
        .arg(&cert);
    let (ok, _, err) = run(publish, None).await;
    assert!(ok, "{err}");
}
