//! `AccessLogPath`: a line per request, appended to a file by a writer task so that requests
//! never wait for the disk.
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
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use http::StatusCode;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tracing::warn;

use super::headers::format_response_time;

/// Lines waiting for the writer; beyond this, lines are dropped and counted rather than slowing
/// requests down.
const QUEUED_LINES: usize = 16 * 1024;

/// One request, as the access log reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub client: IpAddr,
    /// `METHOD target VERSION`, as the client sent it.
    pub request_line: String,
    pub status: StatusCode,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: String,
    /// Every endpoint tried, in order.
    pub upstreams: Vec<UpstreamAttempt>,
}

/// One try of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamAttempt {
    pub addr: SocketAddr,
    /// The upstream's status, or the one the proxy would answer for the failure (502, 504).
    pub status: StatusCode,
    pub response_time: Duration,
}

/// A handle to the access log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    lines: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens `path` for appending and returns the log and its writer, a future to run until every
    /// handle is dropped. `/dev/stdout` and `/dev/stderr` are xlb's own standard output and
    /// error, which need not be reopenable (a socket to journald is not).
    pub async fn open(
        path: &Path,
    ) -> io::Result<(Self, impl std::future::Future<Output = ()> + Send + 'static)> {
        let file: Box<dyn AsyncWrite + Send + Unpin> = if path == Path::new("/dev/stdout") {
            Box::new(tokio::io::stdout())
        } else if path == Path::new("/dev/stderr") {
            Box::new(tokio::io::stderr())
        } else {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await?;
            Box::new(file)
        };
        let (lines, queued) = mpsc::channel(QUEUED_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = write_lines(queued, file, path.to_owned(), Arc::clone(&dropped));
        Ok((Self { lines, dropped }, writer))
    }

    /// Queues the line for `entry`, which sent `body_bytes` response body bytes.
    pub fn record(&self, entry: &AccessEntry, body_bytes: u64) {
        let time = chrono::Local::now().format("%d/%b/%Y:%H:%M:%S %z");
        let line = format_line(entry, body_bytes, &time.to_string());
        if self.lines.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn write_lines(
    mut queued: mpsc::Receiver<String>,
    file: Box<dyn AsyncWrite + Send + Unpin>,
    path: PathBuf,
    dropped: Arc<AtomicU64>,
) {
    let mut file = tokio::io::BufWriter::new(file);
    let mut failing = false;
    while let Some(line) = queued.recv().await {
        let mut result = file.write_all(line.as_bytes()).await;
        // Write what queued up meanwhile, then flush once the queue is empty.
        while let (Ok(()), Ok(line)) = (&result, queued.try_recv()) {
            result = file.write_all(line.as_bytes()).await;
        }
        if result.is_ok() {
            result = file.flush().await;
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            warn!(
                path = %path.display(),
                lines = lost,
                "access log lines dropped: the writer fell behind"
            );
        }
        match result {
            Err(error) if !failing => {
                warn!(path = %path.display(), %error, "writing the access log failed");
                failing = true;
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
    }
}

/// The log line for `entry`, with its trailing newline.
pub fn format_line(entry: &AccessEntry, body_bytes: u64, local_time: &str) -> String {
    let mut line = String::with_capacity(256);
    let optional = |value: &Option<String>| value.as_deref().map_or_else(|| "-".to_owned(), escape);
    let upstream_field =
        |field: &dyn Fn(&UpstreamAttempt) -> String| match entry.upstreams.as_slice() {
            [] => "-".to_owned(),
            tried => tried.iter().map(field).collect::<Vec<_>>().join(", "),
        };
    let _ = writeln!(
        line,
        "{client} - - [{local_time}] \"{request}\" {status} {body_bytes} \"{referer}\" \"{agent}\" \
         {request_id} \"{addrs}\" \"{statuses}\" \"{times}\"",
        client = entry.client,
        request = escape(&entry.request_line),
        status = entry.status.as_u16(),
        referer = optional(&entry.referer),
        agent = optional(&entry.user_agent),
        request_id = entry.request_id,
        addrs = upstream_field(&|tried| tried.addr.to_string()),
        statuses = upstream_field(&|tried| tried.status.as_u16().to_string()),
        times = upstream_field(&|tried| format_response_time(tried.response_time)),
    );
    line
}

/// nginx's default log escaping: `"`, `\`, control characters and bytes above 0x7e as `\xHH`.
fn escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'"' | b'\\' | ..0x20 | 0x7f.. => {
                let _ = write!(escaped, "\\x{byte:02X}");
            }
            printable => escaped.push(char::from(printable)),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn entry() -> AccessEntry {
        AccessEntry {
            client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            request_line: "GET /ping?x=1 HTTP/1.1".to_owned(),
            status: StatusCode::OK,
            referer: None,
            user_agent: Some("curl/8.5.0".to_owned()),
            request_id: "0123456789abcdef0123456789abcdef".to_owned(),
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
    fn values_are_escaped_like_nginx() {
        assert_eq!(
            escape("a\"b\\c\td\u{7f}é"),
            "a\\x22b\\x5Cc\\x09d\\x7F\\xC3\\xA9"
        );
    }

    #[tokio::test]
    async fn lines_are_appended_to_the_file() {
        let path = std::env::temp_dir().join(format!("xlb-access-{}.log", uuid::Uuid::new_v4()));
        std::fs::write(&path, "earlier line\n").unwrap();
        let (log, writer) = AccessLog::open(&path).await.unwrap();
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
