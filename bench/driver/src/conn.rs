//! One persistent HTTP/1.1 connection, spoken by hand.
//!
//! The soak checks that no keep-alive connection is ever closed or broken under swaps, so its
//! clients must notice when one is. Pooling clients hide that (ureq, like most, silently
//! retries an idempotent request on a new connection when a reused one fails); this one never
//! reconnects by itself: every request goes on the same socket, and a close is an error.
//! It understands exactly what the example handler sends: a status line, headers and a body
//! of `content-length` bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

/// A kept-alive connection to 127.0.0.1:`port`.
pub(crate) struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// The head of a response.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) content_length: u64,
}

impl Conn {
    /// Connects; every read and write on the connection then fails after `timeout`.
    pub(crate) fn open(port: u16, timeout: Duration) -> Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect to 127.0.0.1:{port}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Conn { reader: BufReader::with_capacity(64 << 10, stream.try_clone()?), writer: stream })
    }

    /// `GET path`, handing the body to `sink` as it arrives; returns the head once the whole
    /// body has been read (the connection is then ready for the next request).
    pub(crate) fn get(&mut self, path: &str, mut sink: impl FnMut(&[u8])) -> Result<Head> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
        self.writer.write_all(request.as_bytes()).context("send the request")?;
        let head = self.read_head()?;
        let mut left = head.content_length;
        while left > 0 {
            let buf = self.reader.fill_buf().context("read the body")?;
            ensure!(!buf.is_empty(), "connection closed with {left} of {} body bytes unread", head.content_length);
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            sink(&buf[..n]);
            self.reader.consume(n);
            left -= n as u64;
        }
        Ok(head)
    }

    /// `GET path` with a small body, returned as text.
    pub(crate) fn get_text(&mut self, path: &str) -> Result<(u16, String)> {
        let mut body = Vec::new();
        let head = self.get(path, |chunk| body.extend_from_slice(chunk))?;
        Ok((head.status, String::from_utf8_lossy(&body).into_owned()))
    }

    fn read_head(&mut self) -> Result<Head> {
        let status_line = self.line().context("read the status line")?;
        let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
            ["HTTP/1.1", code, ..] => code.parse().with_context(|| format!("bad status line {status_line:?}"))?,
            _ => bail!("bad status line {status_line:?}"),
        };
        let mut content_length = None;
        let mut close = false;
        loop {
            let line = self.line().context("read a header")?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').with_context(|| format!("bad header line {line:?}"))?;
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = Some(value.trim().parse().with_context(|| format!("bad {line:?}"))?),
                "transfer-encoding" => bail!("unexpected {line:?} (only content-length bodies are understood)"),
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        ensure!(!close, "the server asked to close the connection (status {status})");
        let content_length = content_length.with_context(|| format!("no content-length in a {status} response"))?;
        Ok(Head { status, content_length })
    }

    /// One CRLF-terminated line, without the CRLF; an error at end of stream.
    fn line(&mut self) -> Result<String> {
        let mut line = Vec::new();
        (&mut self.reader).take(16 << 10).read_until(b'\n', &mut line)?;
        ensure!(!line.is_empty(), "connection closed by the server");
        ensure!(line.ends_with(b"\r\n"), "truncated line {:?}", String::from_utf8_lossy(&line));
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that answers each of `responses` to one request on one connection, then closes
    /// its side. It closes with a FIN, never a reset: it goes on reading until the client has
    /// gone, because closing a socket with unread input (the client's next request) makes the
    /// kernel send RST, which the client may see as "connection reset" instead of the close.
    fn serve(responses: &'static [&'static str]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            for response in responses {
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                    line.clear();
                }
                writer.write_all(response.as_bytes()).unwrap();
            }
            writer.shutdown(std::net::Shutdown::Write).unwrap();
            // Until the client closes (or resets, when the test ends): errors here are moot.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        port
    }

    #[test]
    fn requests_share_one_connection_and_a_close_is_an_error() {
        let port = serve(&["HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno"]);
        let mut conn = Conn::open(port, Duration::from_secs(5)).unwrap();
        assert_eq!(conn.get_text("/").unwrap(), (200, "hello".to_owned()));
        assert_eq!(conn.get_text("/").unwrap(), (404, "no".to_owned()));
        let err = conn.get_text("/").unwrap_err();
        assert!(format!("{err:#}").contains("connection closed by the server"), "{err:#}");
    }

    #[test]
    fn a_short_body_or_a_close_request_is_an_error() {
        let port = serve(&["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"]);
        let err = Conn::open(port, Duration::from_secs(5)).unwrap().get_text("/").unwrap_err();
        assert!(format!("{err:#}").contains("5 of 10 body bytes unread"), "{err:#}");
        let port = serve(&["HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"]);
        let err = Conn::open(port, Duration::from_secs(5)).unwrap().get_text("/").unwrap_err();
        assert!(format!("{err:#}").contains("asked to close"), "{err:#}");
    }
}
