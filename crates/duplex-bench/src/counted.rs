//! Byte counting at the socket: what a client of the transport comparison received, every byte
//! the kernel handed it (status lines, headers, chunk sizes, frame headers, pings), rather than
//! an estimate from the messages it decoded.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A stream that adds every byte read from it to a shared count.
#[derive(Debug)]
pub(crate) struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, read: Arc<AtomicU64>) -> Counted<S> {
        Counted { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects to `addr` with the bytes read counted in `read`.
pub(crate) async fn connect(
    addr: &str,
    read: Arc<AtomicU64>,
) -> anyhow::Result<Counted<TcpStream>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(Counted::new(stream, read))
}

/// One kept-alive HTTP/1.1 connection whose received bytes are counted.
pub(crate) struct HttpConnection {
    host: String,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl HttpConnection {
    /// Opens a connection to `addr` (`127.0.0.1:PORT`), counting what it reads in `read`.
    pub(crate) async fn open(addr: &str, read: Arc<AtomicU64>) -> anyhow::Result<HttpConnection> {
        let stream = connect(addr, read).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        // Ends when the sender is dropped or the server closes the connection.
        tokio::spawn(connection);
        Ok(HttpConnection {
            host: addr.to_owned(),
            sender,
        })
    }

    /// `GET path`: the response, its body still to read; an error unless 2xx.
    pub(crate) async fn get(&mut self, path: &str) -> anyhow::Result<hyper::Response<Incoming>> {
        self.sender.ready().await.context("the connection closed")?;
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &self.host)
            .body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        if !response.status().is_success() {
            bail!("GET {path}: {}", response.status());
        }
        Ok(response)
    }

    /// `GET path` and its whole body.
    pub(crate) async fn get_body(&mut self, path: &str) -> anyhow::Result<Bytes> {
        let response = self.get(path).await?;
        Ok(response.into_body().collect().await?.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn every_byte_read_is_counted() {
        let (ours, mut theirs) = tokio::io::duplex(256);
        let read = Arc::new(AtomicU64::new(0));
        let mut counted = Counted::new(ours, read.clone());
        theirs.write_all(&[1; 100]).await.expect("write");
        drop(theirs);
        let mut all = Vec::new();
        counted.read_to_end(&mut all).await.expect("read");
        assert_eq!(all.len(), 100);
        assert_eq!(read.load(Ordering::Relaxed), 100);
    }
}
