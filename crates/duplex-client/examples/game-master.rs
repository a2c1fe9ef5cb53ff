//! The game master of the Coin rush example (`/examples/game`): it runs rounds for whoever plays
//! in the browser, with the Rust client.
//!
//! ```sh
//! cargo run --release -- serve                                   # the server, in one terminal
//! cargo run -p duplex-client --example game-master               # this, in another
//! # then open http://127.0.0.1:8080/examples/game in two windows and press Play
//! ```
//!
//! What it shows:
//! - **The server asks a client.** Before each round it asks every player in the arena
//!   (`presence` of `game:arena`) "ready?" with `POST /api/connections/{id}/request`, all at
//!   once, and plays with those who answered in time.
//! - **Latest-wins state.** It follows the players' moves on `game:arena.moves` and publishes
//!   the whole game (phase, coins, scores, time left) 20 times a second on `game:arena`. The
//!   `game` namespace conflates: a slow player gets the newest state, never a backlog.
//! - **Records for what lasts.** Each round's scores are written to the `scores` collection.
//!
//! `DUPLEX_SERVER` (default `http://127.0.0.1:8080`) names the server; `DUPLEX_API_KEY` is sent
//! when the server API needs a key.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use duplex_client::{Client, Connection, Event, Payload};
use serde_json::{Value, json};

/// The arena, as the page draws it.
const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 500.0;
/// A coin is taken by a player whose centre comes this close.
const REACH: f64 = 16.0 + 10.0;
const COINS: usize = 5;
/// The state goes out this often (20 times a second).
const TICK: Duration = Duration::from_millis(50);

/// How long each part of a round lasts.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Between rounds, while players are asked.
    pub lobby: Duration,
    /// A round.
    pub round: Duration,
    /// Showing the result.
    pub over: Duration,
    /// How long a player has to answer "ready?".
    pub answer: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lobby: Duration::from_secs(4),
            round: Duration::from_secs(30),
            over: Duration::from_secs(5),
            answer: Duration::from_secs(3),
        }
    }
}

/// A player as the master knows it.
#[derive(Debug, Clone)]
struct Player {
    name: String,
    color: String,
    x: f64,
    y: f64,
    score: u32,
    in_round: bool,
}

#[tokio::main]
async fn main() -> Result<(), duplex_client::Error> {
    let server = std::env::var("DUPLEX_SERVER").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    println!("game master for {server}: open {server}/examples/game in two windows");
    run(&server, Timing::default(), std::future::pending()).await
}

/// Runs rounds on the server at `server` until `stop` completes.
pub async fn run(
    server: &str,
    timing: Timing,
    stop: impl Future<Output = ()>,
) -> Result<(), duplex_client::Error> {
    let mut builder = Client::builder(server);
    if let Ok(key) = std::env::var("DUPLEX_API_KEY") {
        builder = builder.api_key(key);
    }
    let client = builder.build()?;
    let connection = client.connect().await?;
    let mut master = Master {
        client,
        connection,
        timing,
        players: HashMap::new(),
        coins: Vec::new(),
        round: 0,
    };
    tokio::select! {
        result = master.rounds() => result,
        () = stop => Ok(()),
    }
}

struct Master {
    client: Client,
    connection: Connection,
    timing: Timing,
    players: HashMap<String, Player>,
    coins: Vec<(f64, f64)>,
    round: u64,
}

impl Master {
    async fn rounds(&mut self) -> Result<(), duplex_client::Error> {
        let mut moves = self.connection.subscribe("game:arena.moves").await?;
        loop {
            // Lobby: the state says so while the players are asked.
            let ready = self.ask_everyone(&mut moves).await?;
            if ready.is_empty() {
                continue;
            }
            self.round += 1;
            for (client, player) in &mut self.players {
                player.in_round = ready.contains(client);
                player.score = 0;
            }
            self.coins = (0..COINS).map(|_| random_spot()).collect();
            println!("round {} with {} players", self.round, ready.len());
            self.play("playing", self.timing.round, &mut moves).await?;
            self.save_scores().await;
            self.play("over", self.timing.over, &mut moves).await?;
        }
    }

    /// Asks every player in the arena "ready?" at once, while the lobby's state goes out;
    /// the ones that answered ready.
    async fn ask_everyone(
        &mut self,
        moves: &mut duplex_client::Subscription,
    ) -> Result<HashSet<String>, duplex_client::Error> {
        let present = self.client.presence("game:arena").await?;
        self.players
            .retain(|client, _| present.iter().any(|p| &p.client == client));
        for who in &present {
            let player = self.players.entry(who.client.clone()).or_insert(Player {
                name: who
                    .meta
                    .as_ref()
                    .and_then(|m| m["name"].as_str())
                    .unwrap_or("someone")
                    .to_owned(),
                color: who
                    .meta
                    .as_ref()
                    .and_then(|m| m["color"].as_str())
                    .unwrap_or("gray")
                    .to_owned(),
                x: WIDTH / 2.0,
                y: HEIGHT / 2.0,
                score: 0,
                in_round: false,
            });
            player.in_round = false;
        }
        let question = json!({"question": "ready?", "round": self.round + 1});
        let (client, wait) = (self.client.clone(), self.timing.answer);
        let asking = futures_util::future::join_all(present.iter().map(|who| {
            let (client, question) = (&client, &question);
            async move {
                let answer = client.request_connection(&who.client, question, wait).await;
                (who.client.clone(), answer)
            }
        }));
        let message = if present.is_empty() {
            "nobody is in the arena".to_owned()
        } else {
            format!("asking {} player(s): ready?", present.len())
        };
        let lobby = self.play_with_message("lobby", self.timing.lobby, &message, moves);
        let (answers, played) = tokio::join!(asking, lobby);
        played?;
        Ok(answers
            .into_iter()
            .filter(|(_, answer)| matches!(answer, Ok(value) if value["ready"] == true))
            .map(|(client, _)| client)
            .collect())
    }

    async fn play(
        &mut self,
        phase: &str,
        length: Duration,
        moves: &mut duplex_client::Subscription,
    ) -> Result<(), duplex_client::Error> {
        self.play_with_message(phase, length, "", moves).await
    }

    /// Follows moves and publishes the state every tick for `length`.
    async fn play_with_message(
        &mut self,
        phase: &str,
        length: Duration,
        message: &str,
        moves: &mut duplex_client::Subscription,
    ) -> Result<(), duplex_client::Error> {
        let ends = tokio::time::Instant::now() + length;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                event = moves.next() => match event {
                    Some(Event::Message(message)) => {
                        if let Payload::Json(data) = message.data {
                            self.moved(&data, phase == "playing");
                        }
                    }
                    Some(_) => {}
                    None => return Err(duplex_client::Error::Protocol("the moves subscription ended".into())),
                },
                _ = tick.tick() => {
                    let left = ends.saturating_duration_since(tokio::time::Instant::now());
                    self.publish_state(phase, left, message).await?;
                    if left.is_zero() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// A player moved: it takes the coins it reaches while a round is on.
    fn moved(&mut self, data: &Value, playing: bool) {
        let Some(client) = data["client"].as_str() else {
            return;
        };
        let Some(player) = self.players.get_mut(client) else {
            return;
        };
        player.x = data["x"].as_f64().unwrap_or(player.x).clamp(0.0, WIDTH);
        player.y = data["y"].as_f64().unwrap_or(player.y).clamp(0.0, HEIGHT);
        if !playing || !player.in_round {
            return;
        }
        for coin in &mut self.coins {
            if (coin.0 - player.x).hypot(coin.1 - player.y) <= REACH {
                player.score += 1;
                *coin = random_spot();
            }
        }
    }

    async fn publish_state(
        &self,
        phase: &str,
        left: Duration,
        message: &str,
    ) -> Result<(), duplex_client::Error> {
        let players: Vec<Value> = self
            .players
            .iter()
            .map(|(client, p)| {
                json!({"client": client, "name": p.name, "color": p.color, "x": p.x, "y": p.y,
                       "score": p.score, "in_round": p.in_round})
            })
            .collect();
        let coins: Vec<[f64; 2]> = self.coins.iter().map(|&(x, y)| [x, y]).collect();
        self.connection
            .publish(
                "game:arena",
                &json!({"phase": phase, "round": self.round, "ends_in_ms": left.as_millis() as u64,
                        "players": players, "coins": coins, "message": message}),
            )
            .await?;
        Ok(())
    }

    /// Each player's score of the round, as a record.
    async fn save_scores(&self) {
        for player in self.players.values().filter(|p| p.in_round) {
            let record = json!({"round": self.round, "name": player.name, "score": player.score});
            if let Err(error) = self.client.records("scores").create(&record).await {
                eprintln!("cannot save a score: {error}");
            }
        }
    }
}

fn random_spot() -> (f64, f64) {
    (
        40.0 + fastrand::f64() * (WIDTH - 80.0),
        40.0 + fastrand::f64() * (HEIGHT - 80.0),
    )
}
