//! The node's webhook tasks: the recorder (emitted events into the outbox, a batch per
//! transaction), the delivery (the outbox to the backend, in order, retried), and the sweeper
//! (signs of life, and taking over the nodes that stopped).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Budget, Emitted, Wake, WebhookSettings, Webhooks, is_event, lost_event};
use crate::metrics::{Metrics, ReasonLabels};
use crate::store::StoreError;
use crate::store::outbox::{Lost, Outbox, Pending};

/// Events the recorder writes in one transaction at most.
const RECORD_BATCH: usize = 512;

/// The first wait after a failed delivery; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The running tasks, stopped in order by [`Tasks::stop`].
#[derive(Debug)]
pub(crate) struct Tasks {
    recorder: JoinHandle<()>,
    deliverer: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    stop_recording: CancellationToken,
    stop: CancellationToken,
    outbox: Arc<dyn Outbox>,
    node: String,
}

impl Tasks {
    /// Writes what was emitted, stops delivering, and says this node stopped (so that another
    /// node, or the next start, delivers what is left at once).
    pub(crate) async fn stop(self) {
        self.stop_recording.cancel();
        let _ = self.recorder.await;
        self.stop.cancel();
        let _ = self.deliverer.await;
        let _ = self.sweeper.await;
        if let Err(error) = self.outbox.beat(&self.node, 0).await {
            tracing::warn!(%error, "could not mark this node stopped in the webhook outbox");
        }
    }
}

/// Takes over what stopped nodes left (all of it on a store only this server uses), then
/// starts the node's tasks.
pub(crate) async fn start(
    settings: WebhookSettings,
    node: String,
    outbox: Arc<dyn Outbox>,
    single_node: bool,
    budget: Arc<Budget>,
    wake: Wake,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Webhooks>, Tasks), StoreError> {
    let now = crate::store::now_micros();
    outbox.beat(&node, now).await?;
    let cutoff = if single_node {
        i64::MAX
    } else {
        now - micros(settings.node_expiry)
    };
    // This node's own rows are from its previous run (a node is started once under its name).
    let taken = outbox.take_over(&node, cutoff, true, lost(&node)).await?;
    if taken.connections > 0 || taken.nodes > 0 {
        tracing::info!(
            nodes = taken.nodes,
            connections = taken.connections,
            "took over the webhook events of stopped nodes"
        );
    }
    metrics.webhook_lost.inc_by(taken.connections as u64);
    budget.set(outbox.count(&node).await?);
    metrics.webhook_outbox.set(budget.waiting() as i64);

    let (webhooks, queue) = Webhooks::new(
        settings.clone(),
        node.clone(),
        budget.clone(),
        metrics.clone(),
    );
    let stop_recording = CancellationToken::new();
    let stop = CancellationToken::new();
    let recorder = tokio::spawn(record(
        outbox.clone(),
        node.clone(),
        queue,
        stop_recording.clone(),
        wake.clone(),
        metrics.clone(),
        budget.clone(),
    ));
    let client = reqwest::Client::builder()
        .timeout(settings.timeout)
        .user_agent(concat!("duplex/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a plain HTTP client builds");
    let deliverer = tokio::spawn(
        Delivery {
            outbox: outbox.clone(),
            node: node.clone(),
            settings: settings.clone(),
            client,
            wake: wake.clone(),
            metrics: metrics.clone(),
            budget: budget.clone(),
            stop: stop.clone(),
        }
        .run(),
    );
    let sweeper = tokio::spawn(sweep(
        outbox.clone(),
        node.clone(),
        settings.node_expiry,
        stop.clone(),
        wake,
        metrics,
        budget,
    ));
    Ok((
        Arc::new(webhooks),
        Tasks {
            recorder,
            deliverer,
            sweeper,
            stop_recording,
            stop,
            outbox,
            node,
        },
    ))
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn lost(taker: &str) -> Lost {
    let taker = taker.to_owned();
    Arc::new(move |info: &str| lost_event(info, &taker))
}

/// Writes emitted events into the outbox, a batch per transaction, in the order emitted; once
/// stopped, writes what is still queued and ends.
async fn record(
    outbox: Arc<dyn Outbox>,
    node: String,
    mut queue: mpsc::Receiver<Emitted>,
    stop: CancellationToken,
    wake: Wake,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    loop {
        let stopping = tokio::select! {
            received = queue.recv_many(&mut batch, RECORD_BATCH) => received == 0,
            () = stop.cancelled() => true,
        };
        if stopping {
            queue.close();
            while let Ok(emitted) = queue.try_recv() {
                batch.push(emitted);
            }
        }
        if !batch.is_empty() {
            write(&*outbox, &node, &mut batch, stopping, &metrics, &budget).await;
            wake.notify_one();
        }
        if stopping {
            return;
        }
    }
}

/// Appends one batch, retrying while the store fails (a few times only when stopping).
async fn write(
    outbox: &dyn Outbox,
    node: &str,
    batch: &mut Vec<Emitted>,
    stopping: bool,
    metrics: &Metrics,
    budget: &Budget,
) {
    let mut events = Vec::with_capacity(batch.len());
    let mut live = Vec::new();
    let mut done = Vec::new();
    for emitted in batch.drain(..) {
        if is_event(&emitted.event) {
            events.push(emitted.event);
        }
        live.extend(emitted.live);
        done.extend(emitted.done);
    }
    let count = events.len() as u64;
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match outbox.append(node, events.clone(), live.clone()).await {
            Ok(()) => {
                metrics.webhook_queued.inc_by(count);
                break;
            }
            Err(error) if stopping && attempts >= 3 => {
                tracing::error!(%error, events = count, "webhook events lost: the store failed while stopping");
                budget.release(count);
                metrics
                    .webhook_dropped
                    .get_or_create(&ReasonLabels { reason: "store" })
                    .inc_by(count);
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot write webhook events to the store; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    for done in done {
        let _ = done.send(());
    }
}

/// Delivers a node's outbox to the backend.
struct Delivery {
    outbox: Arc<dyn Outbox>,
    node: String,
    settings: WebhookSettings,
    client: reqwest::Client,
    wake: Wake,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    stop: CancellationToken,
}

impl Delivery {
    async fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        while !self.stop.is_cancelled() {
            let batch = match self.outbox.pending(&self.node, self.settings.batch).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the webhook outbox");
                    self.pause(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(first) = batch.first() else {
                // Woken by new events; the tick finds those taken over from other nodes.
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = self.stop.cancelled() => {}
                }
                continue;
            };
            let oldest_kept = crate::store::now_micros() - micros(self.settings.max_age);
            if first.at_us < oldest_kept {
                match self.outbox.expire(&self.node, oldest_kept).await {
                    Ok(expired) => {
                        tracing::warn!(expired, "webhook events dropped after max_age undelivered");
                        self.budget.release(expired);
                        self.metrics
                            .webhook_dropped
                            .get_or_create(&ReasonLabels { reason: "age" })
                            .inc_by(expired);
                    }
                    Err(error) => tracing::warn!(%error, "cannot expire webhook events"),
                }
                continue;
            }
            // Stopping abandons a delivery in flight: its events stay, delivered again later.
            let posted = tokio::select! {
                posted = self.post(&batch) => posted,
                () = self.stop.cancelled() => return,
            };
            match posted {
                Ok(()) => {
                    let count = batch.len() as u64;
                    let seqs = batch.iter().map(|p| p.seq).collect();
                    // Not removed (the store failed): delivered again later, at least once.
                    if let Err(error) = self.outbox.remove(seqs).await {
                        tracing::warn!(%error, "cannot remove delivered webhook events");
                        self.pause(Duration::from_secs(1)).await;
                        continue;
                    }
                    self.budget.release(count);
                    self.metrics.webhook_delivered.inc_by(count);
                    self.metrics
                        .webhook_outbox
                        .set(self.budget.waiting() as i64);
                    backoff = FIRST_BACKOFF;
                }
                Err(why) => {
                    tracing::warn!(%why, events = batch.len(), retry_in = ?backoff, "webhook delivery failed");
                    self.metrics.webhook_retried.inc_by(batch.len() as u64);
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn pause(&self, time: Duration) {
        tokio::select! {
            () = tokio::time::sleep(time) => {}
            () = self.stop.cancelled() => {}
        }
    }

    /// POSTs `{"events": [...]}`; an answer other than 2xx is a failure.
    async fn post(&self, batch: &[Pending]) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct Id<'a> {
            #[serde(borrow)]
            id: &'a str,
        }
        let mut body =
            String::with_capacity(batch.iter().map(|p| p.body.len() + 1).sum::<usize>() + 16);
        body.push_str("{\"events\":[");
        let mut ids = String::new();
        for (i, pending) in batch.iter().enumerate() {
            if i > 0 {
                body.push(',');
                ids.push(',');
            }
            body.push_str(&pending.body);
            if let Ok(event) = serde_json::from_str::<Id<'_>>(&pending.body) {
                ids.push_str(event.id);
            }
        }
        body.push_str("]}");
        let mut post = self
            .client
            .post(&self.settings.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("duplex-delivery", ids);
        if let Some(secret) = &self.settings.secret {
            post = post.header(
                "duplex-signature",
                crate::hooks::signature(secret.as_bytes(), body.as_bytes()),
            );
        }
        let response = post
            .body(body)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the backend answered {}", response.status()))
        }
    }
}

/// Says the node is alive, takes over nodes that stopped, and keeps the outbox count exact.
async fn sweep(
    outbox: Arc<dyn Outbox>,
    node: String,
    expiry: Duration,
    stop: CancellationToken,
    wake: Wake,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
) {
    let every = (expiry / 3).max(Duration::from_millis(100));
    let lost = lost(&node);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let now = crate::store::now_micros();
        if let Err(error) = outbox.beat(&node, now).await {
            tracing::warn!(%error, "cannot record this node's sign of life for webhooks");
            continue;
        }
        match outbox
            .take_over(&node, now - micros(expiry), false, lost.clone())
            .await
        {
            Ok(taken) if taken.nodes > 0 => {
                tracing::warn!(
                    nodes = taken.nodes,
                    connections = taken.connections,
                    "took over stopped nodes: their connections get disconnected (node_lost)"
                );
                metrics.webhook_lost.inc_by(taken.connections as u64);
                wake.notify_one();
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot take over stopped nodes"),
        }
        if let Ok(count) = outbox.count(&node).await {
            budget.set(count);
            metrics.webhook_outbox.set(count as i64);
        }
    }
}
