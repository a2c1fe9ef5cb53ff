//! A deadline on writes that make no progress: a client that stops reading (its receive window
//! shut, the kernel's send buffer full) holds its connection only so long.
//!
//! Without it such a connection lives as long as the client acknowledges TCP's zero-window
//! probes — for ever — whatever the application does: a WebSocket or raw TCP client that keeps
//! sending pings is never idle, an SSE response is never polled again, and each holds a file
//! descriptor and a place under the connection limits. Every HTTP and raw TCP connection is
//! wrapped once, below TLS; a write that stays pending for `timeout` fails with `TimedOut`, which
//! ends the connection like any broken pipe. The timer exists only while a write is stalled.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A socket whose stalled writes fail after a deadline.
#[derive(Debug)]
pub(crate) struct WriteDeadline<IO> {
    io: IO,
    timeout: Duration,
    /// Set when a write first stays pending; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Counts the connection as disconnected for `write_timeout` (once) when the deadline fires.
    timed_out: Option<Counter>,
}

impl<IO> WriteDeadline<IO> {
    pub(crate) fn new(io: IO, timeout: Duration) -> Self {
        WriteDeadline {
            io,
            timeout,
            stalled: None,
            timed_out: None,
        }
    }

    /// Counts in `counter` (`duplex_disconnects_total{code="write_timeout"}`) when the deadline
    /// ends the connection.
    pub(crate) fn counting(mut self, counter: Counter) -> Self {
        self.timed_out = Some(counter);
        self
    }

    /// Passes a finished poll through (progress: the deadline is cleared), or starts or checks
    /// the deadline of a pending one.
    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if let Some(counter) = self.timed_out.take() {
                    counter.inc();
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client took nothing for {timeout:?}"),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.guard(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.guard(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_deadline() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut guarded = WriteDeadline::new(ours, Duration::from_secs(30));
        // The pipe holds 64 bytes; nobody reads the rest.
        let error = guarded
            .write_all(&[7; 1024])
            .await
            .expect_err("the write stalls");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let mut first = [0; 64];
        theirs.read_exact(&mut first).await.expect("what fitted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_cut_off() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut guarded = WriteDeadline::new(ours, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut buf = [0; 64];
            let mut total = 0;
            while total < 4096 {
                // Each read comes 20 s after the last: slower than the pipe, within the deadline.
                tokio::time::sleep(Duration::from_secs(20)).await;
                total += theirs.read(&mut buf).await.expect("read");
            }
            total
        });
        guarded
            .write_all(&[7; 4096])
            .await
            .expect("progress resets the deadline");
        assert_eq!(reader.await.expect("reader"), 4096);
    }
}
