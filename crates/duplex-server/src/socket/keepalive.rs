//! One task keeps every WebSocket connection alive, instead of timers in each connection: it
//! pings them every `ping_interval`, closes those that sent nothing within `idle_timeout`
//! (`idle_timeout`) or whose token ran out (`token_expired`), and at shutdown closes them all
//! (`shutdown`). A connection's task then only waits on its socket and its queue, which keeps
//! an idle connection small: no sleep, interval or cancellation future of its own.

use std::sync::Arc;
use std::time::Duration;

use duplex_proto::DisconnectCode;
use tokio_util::sync::CancellationToken;

use super::SocketLimits;
use crate::hub::Hub;
use crate::hub::connection::clock_ms;
use crate::hub::queue::Outgoing;

/// Sweeps until `shutdown`, then closes every WebSocket connection with `shutdown`.
pub(crate) async fn run(hub: Arc<Hub>, limits: Arc<SocketLimits>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(tick(&limits));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = interval.tick() => sweep(&hub, &limits),
        }
    }
    hub.each_connection(|connection| {
        if connection.transport == super::Transport::WebSocket.name() {
            connection.queue.close(DisconnectCode::Shutdown);
        }
    });
}

/// How often to look: a quarter of the shorter of the two intervals, from 10 ms to 1 s.
fn tick(limits: &SocketLimits) -> Duration {
    (limits.ping_interval.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

fn sweep(hub: &Hub, limits: &SocketLimits) {
    let now = clock_ms();
    let idle = limits.idle_timeout.as_millis() as u64;
    let ping = limits.ping_interval.as_millis() as u64;
    hub.each_connection(|connection| {
        if connection.transport != super::Transport::WebSocket.name()
            || connection.queue.is_closing()
        {
            return;
        }
        if now.saturating_sub(connection.last_seen()) >= idle {
            connection.queue.close(DisconnectCode::IdleTimeout);
        } else if connection.token_deadline().is_some_and(|d| now >= d) {
            connection.queue.close(DisconnectCode::TokenExpired);
        } else if connection.ping_due(now, ping) {
            connection.queue.push_other(Outgoing::Ping);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_is_finer_than_the_shortest_interval() {
        let mut limits = crate::Config::default().sockets;
        limits.ping_interval = Duration::from_secs(25);
        limits.idle_timeout = Duration::from_secs(60);
        assert_eq!(tick(&limits), Duration::from_secs(1));
        limits.idle_timeout = Duration::from_millis(200);
        assert_eq!(tick(&limits), Duration::from_millis(50));
        limits.idle_timeout = Duration::from_millis(1);
        assert_eq!(tick(&limits), Duration::from_millis(10));
    }
}
