//! The hand-written exchange against upstreams that answer with scripted bytes: every way a
//! response body can be delimited, interim answers, broken framing, and whether the
//! connection is kept after each.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

/// A backend that answers each request with the next scripted response, on whichever
/// connection it comes, and records what it received. It closes a connection after an
/// HTTP/1.0 response (whose body ends with the close) and after its last response.
struct ScriptedBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl ScriptedBackend {
    async fn start(responses: &[&'static [u8]]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(Vec::from(responses).into_iter()));
        let (counter, log) = (Arc::clone(&accepted), Arc::clone(&received));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let (script, log) = (Arc::clone(&script), Arc::clone(&log));
                tokio::spawn(async move {
                    while let Some(request) = read_request(&mut stream).await {
                        log.lock().unwrap().extend_from_slice(&request);
                        let Some(response) = script.lock().unwrap().next() else {
                            return;
                        };
                        if stream.write_all(response).await.is_err()
                            || response.starts_with(b"HTTP/1.0")
                            || script.lock().unwrap().len() == 0
                        {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            received,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

/// One request's bytes: its head, and a body by Content-Length, or up to the empty line that
/// ends a chunked body's trailer section.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(head_end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
            let body = &request[head_end + 4..];
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map(|length| length.trim().parse::<usize>().unwrap());
            let complete = match length {
                Some(length) => body.len() >= length,
                None if head.contains("transfer-encoding: chunked") => body.ends_with(b"\r\n\r\n"),
                None => true,
            };
            if complete {
                return Some(request);
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => request.extend_from_slice(&buf[..read]),
        }
    }
}

fn request(method: Method, addr: SocketAddr) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())
        .unwrap()
}

/// Sends `request`, reads the whole response body, and tells the status, the body and
/// whether the connection was kept for the next request.
async fn exchange<B>(
    pool: &UpstreamPool,
    addr: SocketAddr,
    request: Request<B>,
) -> (u16, Result<Bytes, ExchangeError>, bool)
where
    B: ReplayBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let Ok(upstream) = pool.send(addr, request).await else {
        panic!("the exchange failed");
    };
    let status = upstream.response.status().as_u16();
    let body = upstream
        .response
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes());
    (status, body, pool.idle_count(addr) == 1)
}

#[tokio::test]
async fn a_chunked_body_with_extensions_and_trailers_is_decoded_and_the_connection_kept() {
    let backend = ScriptedBackend::start(&[
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
          5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-checksum: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let pool = UpstreamPool::new(PoolSettings::default());
    let (status, body, kept) =
        exchange(&pool, backend.addr, request(Method::GET, backend.addr)).await;
    assert_eq!(
        (status, body.unwrap(), kept),
        (200, Bytes::from("hello world"), true)
    );
    let (_, body, _) = exchange(&pool, backend.addr, request(Method::GET, backend.addr)).await;
    assert_eq!(body.unwrap(), "ok");
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_body_without_length_runs_until_the_upstream_closes_and_the_connection_goes() {
    let backend =
        ScriptedBackend::start(&[b"HTTP/1.0 200 OK\r\n\r\neverything until the close"]).await;
    let pool = UpstreamPool::new(PoolSettings::default());
    let (status, body, kept) =
        exchange(&pool, backend.addr, request(Method::GET, backend.addr)).await;
    assert_eq!(
        (status, body.unwrap(), kept),
        (200, Bytes::from("everything until the close"), false)
    );
}

#[tokio::test]
async fn answers_without_a_body_keep_the_connection() {
    let backend = ScriptedBackend::start(&[
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let pool = UpstreamPool::new(PoolSettings::default());
    for method in [Method::HEAD, Method::GET, Method::GET] {
        let (_, body, kept) = exchange(&pool, backend.addr, request(method, backend.addr)).await;
        assert_eq!((body.unwrap(), kept), (Bytes::new(), true));
    }
    let (_, body, _) = exchange(&pool, backend.addr, request(Method::GET, backend.addr)).await;
    assert_eq!(body.unwrap(), "ok");
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn an_interim_answer_is_skipped_for_the_final_one() {
    let backend = ScriptedBackend::start(&[b"HTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n\
          HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone"])
    .await;
    let pool = UpstreamPool::new(PoolSettings::default());
    let (status, body, kept) =
        exchange(&pool, backend.addr, request(Method::GET, backend.addr)).await;
    assert_eq!(
        (status, body.unwrap(), kept),
        (201, Bytes::from("done"), true)
    );
}

#[tokio::test]
async fn connections_that_must_not_be_reused_are_not() {
    let backend = ScriptedBackend::start(&[
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        // Transfer-Encoding wins over Content-Length, and the connection is not trusted after.
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
          2\r\nok\r\n0\r\n\r\n",
        // Bytes after the body that nobody asked for.
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
        // HTTP/1.0 without keep-alive.
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let pool = UpstreamPool::new(PoolSettings::default());
    for _ in 0..4 {
        let (status, body, kept) =
            exchange(&pool, backend.addr, request(Method::GET, backend.addr)).await;
        assert_eq!(
            (status, body.unwrap(), kept),
            (200, Bytes::from("ok"), false)
        );
    }
    assert_eq!(backend.accepted(), 4);

    // A protocol switch the request did not ask for.
    let backend = ScriptedBackend::start(&[
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: other\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let (status, _, kept) = exchange(&pool, backend.addr, request(Method::GET, backend.addr)).await;
    assert_eq!((status, kept), (101, false));
}

#[tokio::test]
async fn broken_framing_fails_the_exchange() {
    let too_large: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-filler: {}\r\n\r\n",
            "a".repeat(exchange::MAX_HEAD_BYTES)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let cases: [(&'static [u8], &str); 4] = [
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            "differing Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "invalid Content-Length",
        ),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "invalid response head"),
        (too_large, "response head longer than"),
    ];
    for (response, expected) in cases {
        let backend = ScriptedBackend::start(&[response]).await;
        let pool = UpstreamPool::new(PoolSettings::default());
        match pool
            .send(backend.addr, request(Method::GET, backend.addr))
            .await
        {
            Err(SendError::Failed(error)) => {
                assert!(error.to_string().contains(expected), "{error}");
            }
            other => panic!("expected a failed exchange ({expected}), got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_no_chunked_garbage_passes() {
    let cases: [&'static [u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    ];
    for response in cases {
        let backend = ScriptedBackend::start(&[response]).await;
        let pool = UpstreamPool::new(PoolSettings::default());
        let upstream = pool
            .send(backend.addr, request(Method::GET, backend.addr))
            .await
            .unwrap();
        let body = upstream.response.into_body().collect().await;
        assert!(body.is_err(), "{:?}", String::from_utf8_lossy(response));
        assert_eq!(pool.idle_count(backend.addr), 0);
    }
}

/// A request body of unknown length, sent in two frames and then trailers.
struct StreamedBody {
    frames: Vec<Frame<Bytes>>,
}

impl Body for StreamedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.is_empty() {
            true => Poll::Ready(None),
            false => Poll::Ready(Some(Ok(self.frames.remove(0)))),
        }
    }
}

impl ReplayBody for StreamedBody {
    fn replay(&self) -> Option<Self> {
        None
    }
}

#[tokio::test]
async fn request_bodies_go_with_the_framing_they_need() {
    let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let backend = ScriptedBackend::start(&[ok, ok, ok]).await;
    let addr = backend.addr;

    let mut trailers = HeaderMap::new();
    trailers.insert("x-digest", HeaderValue::from_static("abc"));
    let streamed = Request::post("/streamed")
        .header(http::header::HOST, "upstream.example")
        .body(StreamedBody {
            frames: vec![
                Frame::data(Bytes::from("hello ")),
                Frame::data(Bytes::from("world")),
                Frame::trailers(trailers),
            ],
        })
        .unwrap();
    let pool = UpstreamPool::new(PoolSettings::default());
    let (status, _, kept) = exchange(&pool, addr, streamed).await;
    assert_eq!((status, kept), (200, true));

    let sized = Request::put("/sized")
        .header(http::header::HOST, "upstream.example")
        .body(Full::new(Bytes::from("12345")))
        .unwrap();
    let pool = UpstreamPool::new(PoolSettings::default());
    assert_eq!(exchange(&pool, addr, sized).await.1.unwrap(), "ok");

    let empty = Request::post("/empty")
        .header(http::header::HOST, "upstream.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let pool = UpstreamPool::new(PoolSettings::default());
    assert_eq!(exchange(&pool, addr, empty).await.1.unwrap(), "ok");

    assert_eq!(
        backend.received(),
        "POST /streamed HTTP/1.1\r\nhost: upstream.example\r\ntransfer-encoding: chunked\r\n\r\n\
         6\r\nhello \r\n5\r\nworld\r\n0\r\nx-digest: abc\r\n\r\n\
         PUT /sized HTTP/1.1\r\nhost: upstream.example\r\ncontent-length: 5\r\n\r\n12345\
         POST /empty HTTP/1.1\r\nhost: upstream.example\r\ncontent-length: 0\r\n\r\n"
    );
}
