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
        let task = tokio::spawn(accept(
            listener,
            target.clone(),
            generation.clone(),
            down.clone(),
            stalled.clone(),
            accepted.clone(),
        ));
        TcpProxy {
            addr,
            generation,
            down,
            stalled,
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

async fn accept(
    listener: TcpListener,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    generation: watch::Sender<u64>,
    down: Arc<AtomicBool>,
    stalled: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let mut cut = generation.subscribe();
        cut.borrow_and_update();
        accepted.fetch_add(1, Ordering::SeqCst);
        let target = *target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (up_stall, down_stall) = (stalled.subscribe(), stalled.subscribe());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            client.set_nodelay(true).ok();
            server.set_nodelay(true).ok();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                _ = async {
                    tokio::join!(
                        pump(client_read, server_write, up_stall),
                        pump(server_read, client_write, down_stall),
                    )
                } => {}
                _ = cut.changed() => {}
            }
        });
    }
}

/// Copies one direction until it ends, holding bytes back while stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
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
