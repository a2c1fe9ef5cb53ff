//! The client commands: `records`, `pub`, `sub`, `request`, `presence` and `chat`, all through
//! the `duplex-client` crate.

use std::io::Read as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use duplex_client::{Client, ConnectOptions, Connection, Event, ListOptions, Payload};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

/// Which server to talk to, and as whom.
#[derive(Debug, Clone, Args)]
pub(crate) struct Remote {
    /// The server's HTTP URL.
    #[arg(
        long,
        env = "DUPLEX_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// A connection token (JWT): the user for sockets, polls and records rules.
    #[arg(long, env = "DUPLEX_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// An API key for the server API (and the records API with the `records` scope).
    #[arg(long, env = "DUPLEX_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// A PEM CA certificate to trust for https:// and wss:// (a private CA or self-signed).
    #[arg(long, env = "DUPLEX_CA_CERT", global = true)]
    ca_cert: Option<std::path::PathBuf>,
    /// Print compact JSON (one value per line) instead of pretty JSON.
    #[arg(long, global = true)]
    json: bool,
}

impl Remote {
    fn client(&self) -> anyhow::Result<Client> {
        let mut builder = Client::builder(&self.server);
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        if let Some(key) = &self.api_key {
            builder = builder.api_key(key.clone());
        }
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
            builder = builder.ca_cert_pem(pem);
        }
        Ok(builder.build()?)
    }

    fn print(&self, value: &Value) {
        let text = if self.json {
            value.to_string()
        } else {
            serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
        };
        println!("{text}");
    }

    /// Turns a client error into one clear line: who refused what, or why nothing answered.
    fn explain(&self, error: duplex_client::Error) -> anyhow::Error {
        match error {
            duplex_client::Error::Unreachable(e) => {
                anyhow::anyhow!("cannot reach the server at {}: {e}", self.server)
            }
            duplex_client::Error::Timeout(after) => {
                anyhow::anyhow!(
                    "the server at {} did not answer within {after:?}",
                    self.server
                )
            }
            duplex_client::Error::Socket(e) => {
                anyhow::anyhow!("cannot reach the server at {}: {e}", self.server)
            }
            duplex_client::Error::Api(problem) => anyhow::anyhow!(
                "the server refused: {} {}: {}",
                problem.status,
                problem.code,
                problem.detail
            ),
            other => other.into(),
        }
    }

    async fn connect(&self, meta: Option<Value>) -> anyhow::Result<Connection> {
        let client = self.client()?;
        let mut url = client.base_url().join("ws").context("a WebSocket URL")?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .map_err(|()| anyhow::anyhow!("cannot make a WebSocket URL of {}", self.server))?;
        let mut options = ConnectOptions::new(url.as_str());
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(meta) = meta {
            options = options.meta(meta);
        }
        if let Some(path) = &self.ca_cert {
            options = options.ca_cert_pem(std::fs::read(path)?);
        }
        Connection::connect(options)
            .await
            .map_err(|e| self.explain(e))
    }
}

/// `duplex records …`.
#[derive(Debug, Subcommand)]
pub(crate) enum RecordsCommand {
    /// Create a record from a JSON object (argument, or stdin when absent or `-`).
    Create {
        /// The collection.
        collection: String,
        /// The record's fields as a JSON object.
        #[arg(value_name = "JSON")]
        fields: Option<String>,
    },
    /// Print one record.
    Get {
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
    },
    /// List a collection (one page, or every page with --all).
    List {
        /// The collection.
        collection: String,
        /// Records per page (1–500).
        #[arg(long)]
        limit: Option<u32>,
        /// created, -created, updated or -updated.
        #[arg(long)]
        sort: Option<String>,
        /// Equality filter on a top-level field, FIELD=VALUE (repeatable).
        #[arg(long = "filter", value_parser = parse_filter)]
        filters: Vec<(String, String)>,
        /// The `next` cursor of a previous page.
        #[arg(long)]
        cursor: Option<String>,
        /// Follow every page and print every record.
        #[arg(long)]
        all: bool,
    },
    /// Replace a record's fields (or merge-patch them with --merge).
    Update {
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
        /// The new fields (or the patch) as JSON (argument, or stdin when absent or `-`).
        #[arg(value_name = "JSON")]
        fields: Option<String>,
        /// Apply a JSON merge patch instead of replacing (null removes a field).
        #[arg(long)]
        merge: bool,
        /// Only if the record is still at this version (If-Match).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Delete a record.
    Delete {
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
        /// Only if the record is still at this version (If-Match).
        #[arg(long)]
        if_version: Option<u64>,
    },
}

fn parse_filter(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not FIELD=VALUE"))
}

/// JSON from an argument, or from stdin when there is none (or it is `-`).
fn json_input(arg: Option<String>) -> anyhow::Result<Value> {
    let text = match arg.filter(|a| a != "-") {
        Some(text) => text,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read JSON from stdin")?;
            text
        }
    };
    serde_json::from_str(&text).with_context(|| format!("not JSON: {}", text.trim()))
}

fn record_json(record: &duplex_client::Record) -> Value {
    serde_json::to_value(record).unwrap_or(Value::Null)
}

pub(crate) async fn records(remote: &Remote, command: RecordsCommand) -> anyhow::Result<()> {
    let client = remote.client()?;
    let explain = |e| remote.explain(e);
    match command {
        RecordsCommand::Create { collection, fields } => {
            let fields = json_input(fields)?;
            let record = client
                .records(&collection)
                .create(&fields)
                .await
                .map_err(explain)?;
            remote.print(&record_json(&record));
        }
        RecordsCommand::Get { collection, id } => {
            let record = client
                .records(&collection)
                .get(&id)
                .await
                .map_err(explain)?;
            remote.print(&record_json(&record));
        }
        RecordsCommand::List {
            collection,
            limit,
            sort,
            filters,
            cursor,
            all,
        } => {
            let options = ListOptions {
                limit,
                sort,
                filters,
                cursor,
            };
            let records = client.records(&collection);
            if all {
                let mut stream = records.stream(options);
                while let Some(record) = stream.next().await {
                    let record = record.map_err(explain)?;
                    remote.print(&record_json(&record));
                }
            } else {
                let page = records.list(&options).await.map_err(explain)?;
                let items: Vec<Value> = page.items.iter().map(record_json).collect();
                remote.print(&json!({"items": items, "next": page.next}));
            }
        }
        RecordsCommand::Update {
            collection,
            id,
            fields,
            merge,
            if_version,
        } => {
            let body = json_input(fields)?;
            let records = client.records(&collection);
            let record = if merge {
                records.patch(&id, &body, if_version).await
            } else {
                records.replace(&id, &body, if_version).await
            }
            .map_err(explain)?;
            remote.print(&record_json(&record));
        }
        RecordsCommand::Delete {
            collection,
            id,
            if_version,
        } => {
            client
                .records(&collection)
                .delete(&id, if_version)
                .await
                .map_err(explain)?;
            remote.print(&json!({"deleted": id}));
        }
    }
    Ok(())
}

/// Publishes JSON (or, if DATA is not JSON, the text as a JSON string): over the server API,
/// or over a socket as the token's user when only a token is given.
/// With a `key`, a retry within the key's window prints the first publication's position.
pub(crate) async fn publish(
    remote: &Remote,
    channel: &str,
    data: &str,
    key: Option<&str>,
) -> anyhow::Result<()> {
    let data: Value = serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.into()));
    let published = if remote.token.is_some() && remote.api_key.is_none() {
        let connection = remote.connect(None).await?;
        let published = match key {
            Some(key) => connection.publish_once(channel, &data, key).await,
            None => connection.publish(channel, &data).await,
        };
        connection.close().await;
        published
    } else {
        let client = remote.client()?;
        match key {
            Some(key) => client.publish_once(channel, &data, key).await,
            None => client.publish(channel, &data).await,
        }
    }
    .map_err(|e| remote.explain(e))?;
    let mut printed = json!({"offset": published.offset, "epoch": published.epoch});
    if published.replayed {
        printed["replayed"] = json!(true);
    }
    remote.print(&printed);
    Ok(())
}

fn payload_json(payload: &Payload) -> Value {
    match payload {
        Payload::Json(value) => value.clone(),
        Payload::Binary(bytes) => json!({"bytes": bytes.len()}),
    }
}

/// Prints a channel's events as JSON lines until interrupted, reconnecting as needed.
pub(crate) async fn subscribe(
    remote: &Remote,
    channel: &str,
    since: Option<u64>,
    epoch: Option<String>,
) -> anyhow::Result<()> {
    let connection = remote.connect(None).await?;
    let mut events = match (since, epoch) {
        (Some(offset), Some(epoch)) => connection.subscribe_since(channel, offset, &epoch).await,
        (Some(_), None) => bail!("--since needs --epoch (offsets are only comparable within one)"),
        _ => connection.subscribe(channel).await,
    }
    .map_err(|e| remote.explain(e))?;
    let started = events.subscribed().clone();
    eprintln!(
        "subscribed to {channel} at offset {} (epoch {})",
        started.offset, started.epoch
    );
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(event) = event else { break };
        let line = match event {
            Event::Message(m) => json!({
                "channel": m.channel, "offset": m.offset, "epoch": m.epoch, "data": payload_json(&m.data),
            }),
            Event::Join(who) => json!({"join": who.client, "user": who.user, "meta": who.meta}),
            Event::Leave(who) => json!({"leave": who.client, "user": who.user}),
            Event::Gap {
                reason,
                last_seen,
                resumed_at,
                epoch,
            } => {
                json!({"gap": {"reason": reason, "last_seen": last_seen, "resumed_at": resumed_at, "epoch": epoch}})
            }
            Event::Ended { code } => {
                eprintln!("the subscription ended: {code}");
                std::process::exit(1);
            }
        };
        println!("{line}");
    }
    connection.close().await;
    Ok(())
}

/// Asks a connected client and prints its reply.
pub(crate) async fn request(
    remote: &Remote,
    connection: &str,
    data: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let data: Value = serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.into()));
    let reply = remote
        .client()?
        .request_connection(connection, &data, timeout)
        .await
        .map_err(|e| remote.explain(e))?;
    remote.print(&reply);
    Ok(())
}

/// Prints who is in a channel.
pub(crate) async fn presence(remote: &Remote, channel: &str) -> anyhow::Result<()> {
    let clients = remote
        .client()?
        .presence(channel)
        .await
        .map_err(|e| remote.explain(e))?;
    let clients: Vec<Value> = clients
        .into_iter()
        .map(|c| json!({"client": c.client, "user": c.user, "meta": c.meta}))
        .collect();
    remote.print(&json!({"channel": channel, "clients": clients}));
    Ok(())
}

fn display_name(meta: Option<&Value>, fallback: &str) -> String {
    meta.and_then(|m| m["name"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| fallback.to_owned())
}

fn chat_line(data: &Payload) -> String {
    match data {
        Payload::Json(value) => {
            let name = value["name"].as_str().unwrap_or("?");
            match value["text"].as_str() {
                Some(text) => format!("{name}: {text}"),
                None => format!("{name}: {value}"),
            }
        }
        Payload::Binary(bytes) => format!("({} bytes)", bytes.len()),
    }
}

/// `duplex chat ROOM --name NAME`: the room's recent history, then live messages and who comes
/// and goes; each line typed is sent; `/who` lists the room, `/quit` (or end of input) leaves.
pub(crate) async fn chat(remote: &Remote, room: &str, name: &str) -> anyhow::Result<()> {
    let channel = if room.contains(':') {
        room.to_owned()
    } else {
        format!("chat:{room}")
    };
    let connection = remote.connect(Some(json!({"name": name}))).await?;
    let mut events = connection
        .subscribe(&channel)
        .await
        .map_err(|e| remote.explain(e))?;
    let history = connection
        .history(&channel, None, Some(20))
        .await
        .map_err(|e| remote.explain(e))?;
    let seen_up_to = events.subscribed().offset;
    for frame in history["publications"].as_array().into_iter().flatten() {
        if frame["offset"].as_u64().is_some_and(|o| o <= seen_up_to) {
            println!("{}", chat_line(&Payload::Json(frame["data"].clone())));
        }
    }
    print_who(&connection, &channel).await;
    println!("* you are {name} in {channel}; /who lists the room, /quit leaves");

    let mut input = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = input.next_line() => {
                let Some(line) = line.context("cannot read the terminal")? else { break };
                let line = line.trim();
                match line {
                    "" => {}
                    "/quit" | "/exit" => break,
                    "/who" => print_who(&connection, &channel).await,
                    text => {
                        if let Err(error) = connection.publish(&channel, &json!({"name": name, "text": text})).await {
                            println!("* not sent: {error}");
                        }
                    }
                }
            }
            event = events.next() => {
                match event {
                    Some(Event::Message(message)) => println!("{}", chat_line(&message.data)),
                    Some(Event::Join(who)) => println!("* {} joined", display_name(who.meta.as_ref(), &who.client)),
                    Some(Event::Leave(who)) => println!("* {} left", display_name(who.meta.as_ref(), &who.client)),
                    Some(Event::Gap { .. }) => println!("* (some messages were missed while reconnecting)"),
                    Some(Event::Ended { code }) => {
                        println!("* the room closed: {code}");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
    connection.close().await;
    println!("* bye");
    Ok(())
}

async fn print_who(connection: &Connection, channel: &str) {
    match connection.presence(channel).await {
        Ok(clients) => {
            let mut names: Vec<String> = clients
                .iter()
                .map(|c| display_name(c.meta.as_ref(), &c.client))
                .collect();
            names.sort();
            println!("* in the room: {}", names.join(", "));
        }
        Err(error) => println!("* cannot list the room: {error}"),
    }
}
