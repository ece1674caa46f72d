//! A small HTTP/1.1 client for the trainer's API on its Unix socket (what `fedcurate-node
//! train wait|push|status` uses).

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One request (`Connection: close`; the answer is read to the end).
pub async fn call(
    socket: &Path,
    method: &str,
    target: &str,
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut s = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (is `fedcurate-node train serve` running, and may this user connect?)",
                socket.display()
            ),
        )
    })?;
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: node\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("the answer has no header"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("the answer has no status"))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Answer { status, body })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..end]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&b[start..(start + n).min(b.len())]);
        b = &b[(start + n + 2).min(b.len())..];
    }
    out
}
