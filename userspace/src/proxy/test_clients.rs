//! Clients on real sockets for the proxy's tests: a keep-alive test client (from any
//! 127.0.0.0/8 address) and a raw TCP client for requests no HTTP client library would send.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// One keep-alive HTTP/1.1 client connection.
pub struct TestClient {
    sender: SendRequest<Full<Bytes>>,
}

impl TestClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let local = match addr {
            SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        };
        Self::connect_from(addr, local).await
    }

    /// A connection from `local` (any address of 127.0.0.0/8 works on Linux' loopback).
    pub async fn connect_from(addr: SocketAddr, local: IpAddr) -> Self {
        let socket = match local {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .unwrap();
        socket.bind(SocketAddr::new(local, 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        Self { sender }
    }

    pub async fn get(&mut self, host: &str, path: &str) -> TestResponse {
        let request = Request::get(path)
            .header("host", host)
            .body(Full::default())
            .unwrap();
        self.send(request).await
    }

    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> TestResponse {
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// Whether the server has closed this connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    /// The echo backend's report.
    pub fn echo(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// One raw TCP connection to the proxy, for requests no HTTP client library would send.
pub struct RawConnection {
    stream: TcpStream,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
        }
    }

    /// A connection whose receive buffer is `bytes` (as the kernel rounds it): the proxy's
    /// writes block as soon as the client stops reading.
    pub async fn with_receive_buffer(addr: SocketAddr, bytes: u32) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        Self {
            stream: socket.connect(addr).await.unwrap(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Closes the sending side, as a client does that has nothing more to send.
    pub async fn finish_sending(&mut self) {
        self.stream.shutdown().await.unwrap();
    }

    /// Everything the proxy sends until it closes the connection (at most ten seconds).
    pub async fn read_until_closed(mut self) -> RawExchange {
        let mut received = Vec::new();
        let reading = self.stream.read_to_end(&mut received);
        let closed = match tokio::time::timeout(Duration::from_secs(10), reading).await {
            Ok(Ok(_)) => true,
            // A reset after the answer was sent still counts as closed.
            Ok(Err(_)) => true,
            Err(_) => false,
        };
        RawExchange { received, closed }
    }

    /// The next response, read without waiting for the connection to close.
    pub async fn read_response(&mut self) -> RawResponse {
        self.read_response_pausing(usize::MAX, Duration::ZERO).await
    }

    /// The next response, read as [`RawConnection::read_response`] does, but pausing for
    /// `pause` once `after` bytes of it have arrived: a client that stops reading mid-way.
    pub async fn read_response_pausing(&mut self, after: usize, pause: Duration) -> RawResponse {
        let mut received = Vec::new();
        let mut buf = [0u8; 8192];
        let mut paused = false;
        loop {
            if let Some((response, _)) = RawResponse::parse(&received) {
                return response;
            }
            if !paused && received.len() >= after {
                paused = true;
                tokio::time::sleep(pause).await;
            }
            let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf));
            match read.await {
                Ok(Ok(0)) => panic!("closed before a full response: {}", excerpt(&received)),
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
                Ok(Err(error)) => panic!("reading a response: {error}"),
                Err(_) => panic!("no full response within 10 s: {}", excerpt(&received)),
            }
        }
    }
}

/// The start of `received` and its length, for a failure message that stays readable.
fn excerpt(received: &[u8]) -> String {
    let start = &received[..received.len().min(300)];
    format!(
        "{} bytes: {:?}",
        received.len(),
        String::from_utf8_lossy(start)
    )
}

/// What the proxy sent on one raw connection before closing it.
#[derive(Debug)]
pub struct RawExchange {
    pub received: Vec<u8>,
    /// Whether the proxy closed the connection (within ten seconds).
    pub closed: bool,
}

impl RawExchange {
    pub async fn run(addr: SocketAddr, request: &[u8]) -> Self {
        let mut connection = RawConnection::connect(addr).await;
        connection.send(request).await;
        connection.read_until_closed().await
    }

    /// Every complete response received, in order.
    pub fn responses(&self) -> Vec<RawResponse> {
        let mut responses = Vec::new();
        let mut rest = self.received.as_slice();
        while let Some((response, length)) = RawResponse::parse(rest) {
            responses.push(response);
            rest = &rest[length..];
        }
        responses
    }

    /// The status of the only response.
    pub fn status(&self) -> u16 {
        match self.responses().as_slice() {
            [response] => response.status,
            other => panic!(
                "expected one response, got {}: {:?}",
                other.len(),
                String::from_utf8_lossy(&self.received)
            ),
        }
    }
}

/// A response parsed from raw bytes (bodies delimited by `content-length` only).
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first response in `bytes` and its length, if complete.
    fn parse(bytes: &[u8]) -> Option<(Self, usize)> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let head_length = match response.parse(bytes).ok()? {
            httparse::Status::Complete(length) => length,
            httparse::Status::Partial => return None,
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|header| {
                let value = String::from_utf8_lossy(header.value).into_owned();
                (header.name.to_ascii_lowercase(), value)
            })
            .collect();
        let body_length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .map_or(0, |(_, value)| value.parse().unwrap());
        let body = bytes.get(head_length..head_length + body_length)?.to_vec();
        let status = response.code?;
        Some((
            Self {
                status,
                headers,
                body,
            },
            head_length + body_length,
        ))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}
