//! `AccessLogPath`: a line per request, appended to a file by a writer thread so that requests
//! never wait for the disk.
//!
//! Lines are gathered in memory and written in batches, as nginx's `access_log ... buffer=32k
//! flush=100ms` does: a request only formats its line and appends it under a lock, and the
//! writer is woken once per batch (when [`BATCH_BYTES`] are waiting, or when the first line
//! after a quiet spell arrives), not once per request. The writer is a plain thread rather
//! than a task on tokio's blocking pool: each `tokio::fs` write is a hand-off to a pool thread
//! and back, two context switches a request.
//!
//! The line is nginx's "combined" format followed by the request id and the upstream fields of
//! Interlock's trace format, comma-separated per endpoint tried as nginx writes them:
//!
//! ```text
//! $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer"
//! "$http_user_agent" $request_id "$upstream_addr" "$upstream_status" "$upstream_response_time"
//! ```
//!
//! Values are escaped as nginx does (`"`, `\`, control and non-ASCII bytes as `\xHH`), absent
//! ones written as `-`.

use std::{
    cell::RefCell,
    fmt::Write as _,
    fs::OpenOptions,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderValue, Method, StatusCode, Uri, Version};
use tokio::sync::oneshot;
use tracing::warn;

use super::{ascii::Ascii, headers::RequestId};

/// Bytes of lines that make a batch: the writer is woken when this much is waiting.
const BATCH_BYTES: usize = 32 * 1024;
/// The longest a line waits for its batch to be written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes held while the writer is behind (a stalled disk); beyond this, lines are dropped and
/// counted rather than slowing requests down or growing without bound.
const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;

/// One request, as the access log reports it. Its parts are the request's own (shared,
/// reference-counted) values, formatted only into the line: copying them into Strings was
/// three allocations and a `format!` per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub client: IpAddr,
    pub request_line: RequestLine,
    pub status: StatusCode,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub request_id: RequestId,
    /// Every endpoint tried, in order.
    pub upstreams: Vec<UpstreamAttempt>,
}

/// nginx's `$request`: `METHOD target VERSION`, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestLine {
    Parsed {
        method: Method,
        target: Uri,
        version: Version,
    },
    /// What a refused head's first line was, or `-`.
    Text(String),
}

/// One try of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamAttempt {
    pub addr: SocketAddr,
    /// The upstream's status, or the one the proxy would answer for the failure (502, 504).
    pub status: StatusCode,
    pub response_time: Duration,
}

/// A handle to the access log; cheap to clone. The writer finishes once every handle is gone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    handle: Arc<Handle>,
}

/// Dropped with the last [`AccessLog`]: tells the writer to write what is left and stop.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    held: Mutex<Held>,
    wake_writer: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Held {
    bytes: Vec<u8>,
    /// The writer waits without a deadline (nothing was held): the next line must wake it.
    writer_idle: bool,
    /// The writer has been woken for a full batch and has not taken it yet.
    batch_signalled: bool,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Held> {
        // A panic while holding the lock leaves only bytes behind, which are still good lines.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AccessLog {
    /// Opens `path` for appending and starts its writer; returns the log and a future that
    /// completes once the writer has written the last line, after every handle is dropped.
    /// `/dev/stdout` and `/dev/stderr` are xlb's own standard output and error, which need not
    /// be reopenable (a socket to journald is not).
    pub fn open(
        path: &Path,
    ) -> io::Result<(Self, impl std::future::Future<Output = ()> + Send + 'static)> {
        let out: Box<dyn io::Write + Send> = if path == Path::new("/dev/stdout") {
            Box::new(io::stdout())
        } else if path == Path::new("/dev/stderr") {
            Box::new(io::stderr())
        } else {
            Box::new(OpenOptions::new().create(true).append(true).open(path)?)
        };
        let shared = Arc::new(Shared {
            held: Mutex::new(Held::default()),
            wake_writer: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let (finished, writer_done) = oneshot::channel();
        let writer = WriterThread {
            shared: Arc::clone(&shared),
            out,
            path: path.to_owned(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("xlb-access-log".to_owned())
            .spawn(move || {
                writer.run();
                let _ = finished.send(());
            })?;
        let log = Self {
            handle: Arc::new(Handle { shared }),
        };
        Ok((log, async move {
            let _ = writer_done.await;
        }))
    }

    /// Queues the line for `entry`, which sent `body_bytes` response body bytes. The line is
    /// formatted into a buffer the thread keeps, with a timestamp formatted once a second.
    pub fn record(&self, entry: &AccessEntry, body_bytes: u64) {
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch { line, clock } = scratch;
            line.clear();
            write_line(line, entry, body_bytes, clock.now());
            self.append(line.as_bytes());
        });
    }

    fn append(&self, line: &[u8]) {
        let shared = &self.handle.shared;
        let mut held = shared.lock();
        if held.bytes.len() + line.len() > MAX_HELD_BYTES {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        held.bytes.extend_from_slice(line);
        let wake = if held.writer_idle {
            held.writer_idle = false;
            true
        } else if held.bytes.len() >= BATCH_BYTES && !held.batch_signalled {
            held.batch_signalled = true;
            true
        } else {
            false
        };
        drop(held);
        if wake {
            shared.wake_writer.notify_one();
        }
    }
}

/// What each thread that logs keeps between lines, so that a line costs no allocation.
#[derive(Default)]
struct Scratch {
    line: String,
    clock: LocalTimeCache,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// nginx's `$time_local` (`10/Oct/2000:13:55:36 -0700`), formatted again only when the
/// second changes: a strftime per request cost more than the rest of the line.
#[derive(Default)]
struct LocalTimeCache {
    second: Option<u64>,
    text: String,
}

impl LocalTimeCache {
    fn now(&mut self) -> &str {
        let second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if self.second != Some(second) {
            self.second = Some(second);
            self.text.clear();
            let _ = write!(
                self.text,
                "{}",
                chrono::Local::now().format("%d/%b/%Y:%H:%M:%S %z")
            );
        }
        &self.text
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake_writer.notify_one();
    }
}

struct WriterThread {
    shared: Arc<Shared>,
    out: Box<dyn io::Write + Send>,
    path: PathBuf,
    failing: bool,
}

impl WriterThread {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH_BYTES);
        loop {
            let closed = {
                let mut held = self.shared.lock();
                if !held.closed && held.bytes.is_empty() {
                    held.writer_idle = true;
                    while held.writer_idle && !held.closed {
                        held = self
                            .shared
                            .wake_writer
                            .wait(held)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
                if !held.closed && held.bytes.len() < BATCH_BYTES {
                    held = self
                        .shared
                        .wake_writer
                        .wait_timeout_while(held, FLUSH_INTERVAL, |held| {
                            !held.closed && held.bytes.len() < BATCH_BYTES
                        })
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                std::mem::swap(&mut held.bytes, &mut batch);
                held.batch_signalled = false;
                held.closed
            };
            self.write(&batch);
            batch.clear();
            if closed {
                return;
            }
        }
    }

    fn write(&mut self, batch: &[u8]) {
        let result = self.out.write_all(batch).and_then(|()| self.out.flush());
        let lost = self.shared.dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            warn!(
                path = %self.path.display(),
                lines = lost,
                "access log lines dropped: the writer fell behind"
            );
        }
        match result {
            Err(error) if !self.failing => {
                warn!(path = %self.path.display(), %error, "writing the access log failed");
                self.failing = true;
            }
            Err(_) => {}
            Ok(()) => self.failing = false,
        }
    }
}

/// Appends the log line for `entry`, with its trailing newline, to `line`. Pieces are
/// pushed one by one, numbers with itoa: `write!` goes through the formatting machinery,
/// which cost 2k instructions per line.
pub fn write_line(line: &mut String, entry: &AccessEntry, body_bytes: u64, local_time: &str) {
    let mut number = itoa::Buffer::new();
    line.push_str(Ascii::ip(entry.client).as_str());
    line.push_str(" - - [");
    line.push_str(local_time);
    line.push_str("] \"");
    push_request_line(line, &entry.request_line);
    line.push_str("\" ");
    line.push_str(entry.status.as_str());
    line.push(' ');
    line.push_str(number.format(body_bytes));
    line.push_str(" \"");
    push_optional(line, entry.referer.as_ref());
    line.push_str("\" \"");
    push_optional(line, entry.user_agent.as_ref());
    line.push_str("\" ");
    line.push_str(entry.request_id.as_str());
    line.push_str(" \"");
    push_upstream_field(line, &entry.upstreams, |line, tried| {
        line.push_str(Ascii::socket_addr(tried.addr).as_str());
    });
    line.push_str("\" \"");
    push_upstream_field(line, &entry.upstreams, |line, tried| {
        line.push_str(tried.status.as_str());
    });
    line.push_str("\" \"");
    push_upstream_field(line, &entry.upstreams, |line, tried| {
        line.push_str(Ascii::seconds_with_millis(tried.response_time).as_str());
    });
    line.push_str("\"\n");
}

impl std::fmt::Display for RequestLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Parsed {
                method,
                target,
                version,
            } => write!(f, "{method} {target} {}", version_text(*version)),
            Self::Text(text) => f.write_str(text),
        }
    }
}

fn push_request_line(line: &mut String, request_line: &RequestLine) {
    match request_line {
        RequestLine::Parsed {
            method,
            target,
            version,
        } => {
            push_escaped(line, method.as_str().as_bytes());
            line.push(' ');
            // An origin-form target (nearly all) is its path and query; others, as `Uri`
            // writes them.
            match (target.scheme(), target.path_and_query()) {
                (None, Some(origin_form)) => push_escaped(line, origin_form.as_str().as_bytes()),
                _ => push_escaped(line, target.to_string().as_bytes()),
            }
            line.push(' ');
            line.push_str(version_text(*version));
        }
        RequestLine::Text(text) => push_escaped(line, text.as_bytes()),
    }
}

fn version_text(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// An optional header's value, escaped, or `-` when absent.
fn push_optional(line: &mut String, value: Option<&HeaderValue>) {
    match value {
        Some(value) => push_escaped(line, value.as_bytes()),
        None => line.push('-'),
    }
}

/// One field per endpoint tried, comma-separated as nginx writes them, or `-` for none.
fn push_upstream_field(
    line: &mut String,
    tried: &[UpstreamAttempt],
    field: impl Fn(&mut String, &UpstreamAttempt),
) {
    if tried.is_empty() {
        line.push('-');
    }
    for (index, attempt) in tried.iter().enumerate() {
        if index > 0 {
            line.push_str(", ");
        }
        field(line, attempt);
    }
}

/// nginx's default log escaping: `"`, `\\`, control characters and bytes above 0x7e as `\\xHH`.
/// Runs that need none are pushed whole.
fn push_escaped(line: &mut String, mut value: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let needs_escape = |byte: &u8| matches!(byte, b'"' | b'\\' | ..0x20 | 0x7f..);
    while !value.is_empty() {
        let run = value.iter().position(needs_escape).unwrap_or(value.len());
        // Printable ASCII only, so always UTF-8.
        line.push_str(std::str::from_utf8(&value[..run]).unwrap_or_default());
        if let Some(&byte) = value.get(run) {
            line.push_str("\\x");
            line.push(char::from(HEX[usize::from(byte >> 4)]));
            line.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        value = value.get(run + 1..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn entry() -> AccessEntry {
        AccessEntry {
            client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            request_line: RequestLine::Parsed {
                method: Method::GET,
                target: Uri::from_static("/ping?x=1"),
                version: Version::HTTP_11,
            },
            status: StatusCode::OK,
            referer: None,
            user_agent: Some(HeaderValue::from_static("curl/8.5.0")),
            request_id: RequestId::from_static("0123456789abcdef0123456789abcdef"),
            upstreams: vec![
                UpstreamAttempt {
                    addr: "10.0.0.5:8080".parse().unwrap(),
                    status: StatusCode::BAD_GATEWAY,
                    response_time: Duration::from_millis(1),
                },
                UpstreamAttempt {
                    addr: "10.0.0.6:8080".parse().unwrap(),
                    status: StatusCode::OK,
                    response_time: Duration::from_millis(4),
                },
            ],
        }
    }

    fn format_line(entry: &AccessEntry, body_bytes: u64, local_time: &str) -> String {
        let mut line = String::new();
        write_line(&mut line, entry, body_bytes, local_time);
        line
    }

    #[test]
    fn line_is_combined_format_plus_request_id_and_upstreams() {
        assert_eq!(
            format_line(&entry(), 123, "10/Oct/2000:13:55:36 +0000"),
            "192.0.2.7 - - [10/Oct/2000:13:55:36 +0000] \"GET /ping?x=1 HTTP/1.1\" 200 123 \"-\" \
             \"curl/8.5.0\" 0123456789abcdef0123456789abcdef \"10.0.0.5:8080, 10.0.0.6:8080\" \
             \"502, 200\" \"0.001, 0.004\"\n"
        );
    }

    #[test]
    fn a_request_answered_by_the_proxy_has_no_upstream_fields() {
        let local = AccessEntry {
            upstreams: Vec::new(),
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..entry()
        };
        let line = format_line(&local, 0, "t");
        assert!(
            line.ends_with(" 0123456789abcdef0123456789abcdef \"-\" \"-\" \"-\"\n"),
            "{line}"
        );
    }

    #[test]
    fn the_request_line_is_the_one_the_client_sent() {
        let cases = [
            (
                Method::GET,
                "/ping?x=1",
                Version::HTTP_10,
                "GET /ping?x=1 HTTP/1.0",
            ),
            (
                Method::GET,
                "http://app.example.org/a?b",
                Version::HTTP_11,
                "GET http://app.example.org/a?b HTTP/1.1",
            ),
            (Method::OPTIONS, "*", Version::HTTP_11, "OPTIONS * HTTP/1.1"),
            (
                Method::POST,
                "/a\"b",
                Version::HTTP_2,
                "POST /a\\x22b HTTP/2.0",
            ),
        ];
        for (method, target, version, expected) in cases {
            let request_line = RequestLine::Parsed {
                method,
                target: Uri::try_from(target).unwrap(),
                version,
            };
            let mut line = String::new();
            push_request_line(&mut line, &request_line);
            assert_eq!(line, expected);
        }
    }

    #[test]
    fn values_are_escaped_like_nginx() {
        let mut escaped = String::new();
        push_escaped(&mut escaped, "a\"b\\c\td\u{7f}é".as_bytes());
        assert_eq!(escaped, "a\\x22b\\x5Cc\\x09d\\x7F\\xC3\\xA9");
        // Header values need not be UTF-8: their bytes are escaped as they are.
        let mut escaped = String::new();
        push_escaped(&mut escaped, b"agent\xff/1");
        assert_eq!(escaped, "agent\\xFF/1");
    }

    #[test]
    fn the_cached_time_is_the_local_time_of_this_second() {
        let mut clock = LocalTimeCache::default();
        // Formatted on either side of a second boundary, the two can differ once; not twice.
        let matches = (0..2).any(|_| {
            let expected = chrono::Local::now()
                .format("%d/%b/%Y:%H:%M:%S %z")
                .to_string();
            clock.now() == expected
        });
        assert!(matches, "{} is not the local time", clock.now());
        let first = clock.now().to_owned();
        std::thread::sleep(Duration::from_millis(1_100));
        assert_ne!(clock.now(), first, "the cached time never moves on");
    }

    #[test]
    fn a_line_after_a_quiet_spell_is_written_without_waiting_for_a_batch() {
        let path = std::env::temp_dir().join(format!("xlb-access-{}.log", uuid::Uuid::new_v4()));
        let (log, _writer) = AccessLog::open(&path).unwrap();
        // Let the writer go idle (nothing held), then log one line and keep the log open.
        std::thread::sleep(FLUSH_INTERVAL * 2);
        log.record(&entry(), 7);
        let deadline = std::time::Instant::now() + FLUSH_INTERVAL * 10;
        let mut written = String::new();
        while std::time::Instant::now() < deadline && written.is_empty() {
            std::thread::sleep(FLUSH_INTERVAL / 4);
            written = std::fs::read_to_string(&path).unwrap();
        }
        drop(log);
        std::fs::remove_file(&path).unwrap();
        assert!(written.contains("\" 200 7 \""), "{written:?}");
    }

    #[tokio::test]
    async fn lines_are_appended_to_the_file() {
        let path = std::env::temp_dir().join(format!("xlb-access-{}.log", uuid::Uuid::new_v4()));
        std::fs::write(&path, "earlier line\n").unwrap();
        let (log, writer) = AccessLog::open(&path).unwrap();
        let writer = tokio::spawn(writer);
        log.record(&entry(), 5);
        log.record(&entry(), 6);
        drop(log);
        writer.await.unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 3, "{written}");
        assert_eq!(lines[0], "earlier line");
        assert!(lines[1].contains("\" 200 5 \""), "{}", lines[1]);
        assert!(lines[2].contains("\" 200 6 \""), "{}", lines[2]);
    }
}
