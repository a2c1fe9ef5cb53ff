//! A loopback TCP proxy whose connections a test can cut, stall, and which can refuse new ones:
//! the network failing under a client, without touching the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:PORT` to a target address.
#[derive(Debug)]
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Bumped to cut every open connection.
    generation: watch::Sender<u64>,
    down: Arc<AtomicBool>,
    /// While true, bytes are held in both directions (connections stay open).
    stalled: watch::Sender<bool>,
    /// Bumped to make every open connection go dark (see [`TcpProxy::blackhole`]).
    dark: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (generation, _) = watch::channel(0u64);
        let down = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let target = Arc::new(std::sync::Mutex::new(target));
        let (stalled, _) = watch::channel(false);
        let (dark, _) = watch::channel(0u64);
        let task = tokio::spawn(accept(
            listener,
            target.clone(),
            Signals {
                cut: generation.clone(),
                stalled: stalled.clone(),
                dark: dark.clone(),
            },
            down.clone(),
            accepted.clone(),
        ));
        TcpProxy {
            addr,
            generation,
            down,
            stalled,
            dark,
            accepted,
            target,
            task,
        }
    }

    /// Drops every open connection at once (both directions), as a network failure would.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// While down, new connections are closed as soon as they are accepted.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While stalled, nothing gets through in either direction, but no connection closes: a
    /// network that silently stops carrying packets for a while.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Every open connection goes dark, as when a NAT or a firewall forgets it: the target's side
    /// is closed (the target drops the client), while the client's side stays open and hears
    /// nothing, ever; what the client sends is swallowed. Only the client's own liveness checks
    /// can tell. New connections are forwarded as usual.
    pub fn blackhole(&self) {
        self.dark.send_modify(|g| *g += 1);
    }

    /// Forwards new connections to `target` from now on (a server restarted on a new port).
    pub fn retarget(&self, target: SocketAddr) {
        *self
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = target;
    }

    /// How many connections were forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// What the proxy's connections follow.
struct Signals {
    cut: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    dark: watch::Sender<u64>,
}

async fn accept(
    listener: TcpListener,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    signals: Signals,
    down: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let mut cut = signals.cut.subscribe();
        cut.borrow_and_update();
        let mut dark = signals.dark.subscribe();
        dark.borrow_and_update();
        accepted.fetch_add(1, Ordering::SeqCst);
        let target = *target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (up_stall, down_stall) = (signals.stalled.subscribe(), signals.stalled.subscribe());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            client.set_nodelay(true).ok();
            server.set_nodelay(true).ok();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::select! {
                _ = async {
                    tokio::join!(
                        pump(&mut client_read, &mut server_write, up_stall),
                        pump(&mut server_read, &mut client_write, down_stall),
                    )
                } => return,
                _ = cut.changed() => return,
                _ = dark.changed() => {}
            }
            // Dark: the target's side closes; the client's stays open, silent, until cut.
            drop((server_read, server_write));
            let swallow = async {
                use tokio::io::AsyncReadExt as _;
                let mut buffer = vec![0u8; 16 * 1024];
                while matches!(client_read.read(&mut buffer).await, Ok(n) if n > 0) {}
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = swallow => {}
                _ = cut.changed() => {}
            }
            drop(client_write);
        });
    }
}

/// Copies one direction until it ends, holding bytes back while stalled.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.wait_for(|stalled| !*stalled).await.is_err()
            || to.write_all(&buffer[..n]).await.is_err()
        {
            break;
        }
    }
    let _ = to.shutdown().await;
}
