//! The little of HTTP/1.1 a records load client needs: requests written from prepared bytes on
//! one kept-alive connection, and answers read by `Content-Length` with only the status and the
//! `ETag` looked at.
//!
//! A general client (reqwest: a pool, a header map and a body stream per request) spends about
//! as much CPU per request as the server it measures; on a shared machine that cost shows up as
//! the server's latency and moves the figures between runs. Like [`crate::lean_ws`], this one
//! does the least a client can; the response head is parsed by `httparse` (hyper's parser).

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// What the load client looks at in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The status code.
    pub status: u16,
    /// The `ETag` as a record version (`"7"` → 7), when there is one.
    pub version: Option<u64>,
}

/// One kept-alive HTTP/1.1 connection that sends a request and reads its answer.
pub(crate) struct Connection {
    stream: TcpStream,
    /// Bytes read and not yet taken by an answer.
    buf: Vec<u8>,
}

impl Connection {
    /// Connects to `addr` (`host:port`).
    pub(crate) async fn open(addr: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Writes `request` (a whole request, head and body) and reads its answer.
    pub(crate) async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Answer> {
        self.stream.write_all(request).await?;
        loop {
            if let Some((answer, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(answer);
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the connection before answering");
            }
        }
    }
}

/// A `GET` of `path` on `host`.
pub(crate) fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes()
}

/// A request with a body; `headers` are whole lines without their `\r\n`.
pub(crate) fn with_body(
    method: &str,
    host: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    request
}

/// Once `buf` starts with a whole answer: the answer and how many bytes it takes.
fn parse(buf: &[u8]) -> anyhow::Result<Option<(Answer, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf).context("a malformed answer")? {
        httparse::Status::Complete(head) => head,
        httparse::Status::Partial => {
            if buf.len() > 64 * 1024 {
                bail!("an answer's head is over 64 KiB");
            }
            return Ok(None);
        }
    };
    let status = response.code.context("an answer without a status")?;
    let (mut length, mut version) = (None, None);
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)?;
            length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .context("a bad content-length")?,
            );
        } else if header.name.eq_ignore_ascii_case("etag") {
            let value = std::str::from_utf8(header.value)?;
            version = value.trim().trim_matches('"').parse::<u64>().ok();
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("a chunked answer (this client reads answers by content-length)");
        }
    }
    let length = match (length, status) {
        (Some(length), _) => length,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => bail!("an answer ({status}) without a content-length"),
    };
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some((Answer { status, version }, head + length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_by_content_length_one_after_another() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\netag: \"7\"\r\n\r\nhiHTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n";
        let (first, used) = parse(two).expect("parses").expect("whole");
        assert_eq!(
            first,
            Answer {
                status: 200,
                version: Some(7)
            }
        );
        let (second, rest) = parse(&two[used..]).expect("parses").expect("whole");
        assert_eq!(second.status, 412);
        assert_eq!(second.version, None);
        assert_eq!(used + rest, two.len());
    }

    #[test]
    fn a_partial_answer_waits_for_more_and_a_chunked_one_is_refused() {
        let whole = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        for cut in 0..whole.len() {
            assert!(
                parse(&whole[..cut]).expect("parses").is_none(),
                "cut at {cut}"
            );
        }
        assert!(parse(whole).expect("parses").is_some());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(parse(chunked).is_err());
        let no_length = b"HTTP/1.1 200 OK\r\n\r\n";
        assert!(parse(no_length).is_err());
    }

    #[test]
    fn requests_carry_their_length() {
        let request = with_body(
            "POST",
            "h:1",
            "/p",
            &["content-type: application/json"],
            b"{}",
        );
        assert_eq!(
            request,
            b"POST /p HTTP/1.1\r\nhost: h:1\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
        assert_eq!(get("h:1", "/x"), b"GET /x HTTP/1.1\r\nhost: h:1\r\n\r\n");
    }
}
