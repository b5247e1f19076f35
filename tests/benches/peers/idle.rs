//! Idle keep-alive client connections: each opened from the client namespace, used for one
//! request (so the proxy has parsed a request on it and holds it as keep-alive, as a
//! browser's connection is held), then left open while the proxy's memory is read.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use xlb_testbed::{in_netns, Netns};

use crate::bed::{HOST, PATH};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Open connections; closed when dropped.
pub struct IdleConnections {
    streams: Vec<TcpStream>,
    /// Why fewer than asked for are open: the first connection the proxy did not serve.
    pub refused: Option<String>,
}

impl IdleConnections {
    /// Opens `count` connections to `to` from `from`, one answered request each. Stops at
    /// the first connection the proxy refuses or does not answer (a connection limit), and
    /// says why in [`IdleConnections::refused`].
    pub fn open(from: &Netns, to: SocketAddr, count: usize) -> Result<IdleConnections> {
        let request = format!("GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        in_netns(from, || {
            let mut streams = Vec::with_capacity(count);
            for index in 0..count {
                match one_request(to, request.as_bytes()) {
                    Ok(stream) => streams.push(stream),
                    Err(error) => {
                        return IdleConnections {
                            streams,
                            refused: Some(format!(
                                "connection {} of {count}: {error:#}",
                                index + 1
                            )),
                        }
                    }
                }
            }
            IdleConnections {
                streams,
                refused: None,
            }
        })
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }
}

fn one_request(to: SocketAddr, request: &[u8]) -> Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request)?;
    // Read until the whole response (head + Content-Length body) is in.
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            bail!("the proxy closed the connection");
        }
        received.extend_from_slice(&buffer[..read]);
        if let Some(head_end) = find(&received, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                bail!("answered {:?}", head.lines().next().unwrap_or_default());
            }
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse().ok())
                .context("a response without Content-Length")?;
            if received.len() >= head_end + 4 + length {
                return Ok(stream);
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
