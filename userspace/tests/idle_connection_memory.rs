//! What an idle keep-alive client connection costs the proxy in heap, counted by a global
//! allocator of this test binary's own: 2 000 connections, one answered GET each (as the
//! bench's idle connections), then left open.
//!
//! hyper's h1 server alone holds about 30 KiB per connection while it serves one; an idle
//! connection must keep none of it, and no task of its own either (a plain connection's task
//! is 384 bytes): it waits in its worker's lot of parked connections. What is left is its node
//! in the lot, its head guard (224), tokio's I/O registration (256) and timer (112), and the
//! state the guard shares with requests (96): about 800 bytes, against 1 088 with a task per
//! idle connection and 34 KB before idle connections were parked.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicIsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use xlb::{
    proxy::{serve, ProxySettings, Router},
    routes::{Balance, Route, RouteTable, Transport, ROOT_CONTEXT},
};

/// Heap bytes allocated and not freed, by anyone in this process.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const HOST: &str = "idle.example.org";
const WARM_UP: usize = 50;
const MEASURED: usize = 2_000;
/// Above what is left today (see the top), below what a task per idle connection costs.
const MAX_BYTES_PER_IDLE_CONNECTION: isize = 1024;

#[test]
fn an_idle_keep_alive_connection_holds_no_request_buffers() {
    raise_open_file_limit(4 * (WARM_UP + MEASURED) as u64);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let (proxy, served) = runtime.block_on(start_proxy(shutdown.clone()));
    let proxy_thread = std::thread::spawn(move || runtime.block_on(served));

    let mut open = Vec::with_capacity(WARM_UP + MEASURED);
    for _ in 0..WARM_UP {
        open.push(one_answered_request(proxy));
    }
    settle();
    let before = LIVE_BYTES.load(Ordering::SeqCst);
    for _ in 0..MEASURED {
        open.push(one_answered_request(proxy));
    }
    let at_once = (LIVE_BYTES.load(Ordering::SeqCst) - before) / MEASURED as isize;
    settle();
    let after = LIVE_BYTES.load(Ordering::SeqCst);
    let per_connection = (after - before) / MEASURED as isize;
    println!("{per_connection} heap bytes per idle client connection, {at_once} as the last was answered");

    shutdown.cancel();
    proxy_thread.join().unwrap().unwrap();
    drop(open);
    assert!(
        per_connection <= MAX_BYTES_PER_IDLE_CONNECTION,
        "{per_connection} heap bytes per idle client connection (at most {MAX_BYTES_PER_IDLE_CONNECTION})"
    );
    // A connection that answered its one request must not hold hyper's buffers while it
    // waits to be parked: opened one after the other, the last thousand or so would still
    // hold theirs, and that is the proxy's RSS, however briefly each holds them.
    assert!(
        at_once <= MAX_BYTES_PER_IDLE_CONNECTION,
        "{at_once} heap bytes per idle client connection right after the last was answered \
         (at most {MAX_BYTES_PER_IDLE_CONNECTION})"
    );
}

/// Both ends of every connection are in this process: a default soft limit of 1 024 open
/// files would stop it early.
fn raise_open_file_limit(needed: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= needed,
        "this test needs {needed} open files; the hard limit is {hard}"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, needed, hard).unwrap();
    }
}

/// The proxy on an ephemeral loopback port with one service, whose backend answers every
/// request with a short body; the future that serves both until `shutdown`.
async fn start_proxy(
    shutdown: CancellationToken,
) -> (
    SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>>,
) {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let router = Router::new();
    router.update(&RouteTable {
        routes: BTreeMap::from([(HOST.to_owned(), vec![route(backend_addr)])]),
        ..RouteTable::default()
    });
    let settings = ProxySettings {
        max_connections: 2 * (WARM_UP + MEASURED),
        ..ProxySettings::default()
    };
    let served = async move {
        let backend_shutdown = shutdown.clone();
        tokio::spawn(async move {
            while let Some(Ok((stream, _))) =
                backend_shutdown.run_until_cancelled(backend.accept()).await
            {
                tokio::spawn(http1::Builder::new().serve_connection(
                    TokioIo::new(stream),
                    service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok\n"),
                        )))
                    }),
                ));
            }
        });
        serve(listener, Arc::clone(&router), settings, shutdown).await
    };
    (proxy_addr, served)
}

fn route(endpoint: SocketAddr) -> Route {
    Route {
        service: "idle".to_owned(),
        context_root: ROOT_CONTEXT.to_owned(),
        context_root_rewrite: false,
        endpoints: vec![endpoint],
        balance: Balance::RoundRobin,
        ssl_only: false,
        redirects: Vec::new(),
        transport: Transport::default(),
    }
}

/// A new connection with one GET answered on it, left open.
fn one_answered_request(proxy: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").unwrap();
    let mut received = [0u8; 4096];
    let mut length = 0;
    while !received[..length].ends_with(b"\r\n\r\nok\n") {
        let read = stream.read(&mut received[length..]).unwrap();
        assert!(read > 0, "the proxy closed the connection");
        length += read;
    }
    assert!(received.starts_with(b"HTTP/1.1 200"));
    stream
}

/// Gives the proxy time to finish with the last connection before the heap is counted.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}
