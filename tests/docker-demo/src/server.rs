//! The HTTP/1.1 server: one thread per connection, keep-alive, requests parsed
//! with httparse. Only `GET /ping` exists; anything unparsable gets a 400 and
//! the connection is closed, since the next request's start can't be found.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::ping::{ping_body, Identity};

/// A request head larger than this is refused rather than buffered forever.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Idle keep-alive connections are dropped so abandoned ones don't pin threads.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn serve(listener: TcpListener, identity: Identity) {
    let identity = Arc::new(identity);
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let identity = Arc::clone(&identity);
                thread::spawn(move || {
                    // A peer that resets or times out is routine for a backend
                    // behind a load balancer; there is nobody to report it to.
                    let _ = handle_connection(stream, &identity);
                });
            }
            Err(error) => eprintln!("docker-demo: accept failed: {error}"),
        }
    }
}

/// The parts of a request head that the response depends on, copied out so
/// the read buffer can be reused for the next request.
struct RequestHead {
    method: String,
    path: String,
    request_id: String,
    keep_alive: bool,
    body_length: usize,
}

enum Parsed {
    Complete {
        head: RequestHead,
        head_length: usize,
    },
    Partial,
}

struct Malformed;

fn parse_head(buffer: &[u8]) -> Result<Parsed, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_length = match request.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err(Malformed),
    };
    let http_1_1 = request.version == Some(1);
    let mut keep_alive = http_1_1;
    let mut request_id = String::new();
    let mut body_length = 0;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).map_err(|_| Malformed)?;
        if header.name.eq_ignore_ascii_case("x-request-id") {
            request_id = value.trim().to_string();
        } else if header.name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            body_length = value.trim().parse().map_err(|_| Malformed)?;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked bodies are never sent to this endpoint; without decoding
            // them the next request's start is unknown.
            return Err(Malformed);
        }
    }
    let path = request.path.unwrap_or_default();
    let head = RequestHead {
        method: request.method.unwrap_or_default().to_string(),
        path: path.split('?').next().unwrap_or_default().to_string(),
        request_id,
        keep_alive,
        body_length,
    };
    Ok(Parsed::Complete { head, head_length })
}

fn handle_connection(mut stream: TcpStream, identity: &Identity) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let (head, head_length) = match parse_head(&buffer) {
            Ok(Parsed::Complete { head, head_length }) => (head, head_length),
            Ok(Parsed::Partial) if buffer.len() >= MAX_HEAD_BYTES => {
                return bad_request(&mut stream);
            }
            Ok(Parsed::Partial) => {
                if !read_more(&mut stream, &mut buffer)? {
                    return Ok(());
                }
                continue;
            }
            Err(Malformed) => return bad_request(&mut stream),
        };
        buffer.drain(..head_length);
        if !discard_body(&mut stream, &mut buffer, head.body_length)? {
            return Ok(());
        }
        respond(&mut stream, identity, &head)?;
        if !head.keep_alive {
            return Ok(());
        }
    }
}

/// Appends whatever the peer sends next; false once it has closed.
fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 4096];
    let read = stream.read(&mut chunk)?;
    buffer.extend_from_slice(&chunk[..read]);
    Ok(read > 0)
}

/// Skips a request body nobody reads, part of which may already be buffered;
/// false if the peer closed before sending all of it.
fn discard_body(stream: &mut TcpStream, buffer: &mut Vec<u8>, length: usize) -> io::Result<bool> {
    let buffered = length.min(buffer.len());
    buffer.drain(..buffered);
    let remaining = (length - buffered) as u64;
    let skipped = io::copy(&mut stream.take(remaining), &mut io::sink())?;
    Ok(skipped == remaining)
}

fn respond(stream: &mut TcpStream, identity: &Identity, head: &RequestHead) -> io::Result<()> {
    let keep_alive = head.keep_alive;
    match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/ping") => {
            let body = ping_body(identity, &head.request_id);
            write_response(stream, "200 OK", "application/json", &[], &body, keep_alive)
        }
        (_, "/ping") => write_response(
            stream,
            "405 Method Not Allowed",
            "text/plain",
            &["Allow: GET"],
            "method not allowed\n",
            keep_alive,
        ),
        _ => write_response(
            stream,
            "404 Not Found",
            "text/plain",
            &[],
            "not found\n",
            keep_alive,
        ),
    }
}

fn bad_request(stream: &mut TcpStream) -> io::Result<()> {
    write_response(
        stream,
        "400 Bad Request",
        "text/plain",
        &[],
        "bad request\n",
        false,
    )
}

fn write_response(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    extra_headers: &[&str],
    body: &str,
    keep_alive: bool,
) -> io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in extra_headers {
        response.push_str(header);
        response.push_str("\r\n");
    }
    // Said explicitly both ways so HTTP/1.0 clients keep the connection too.
    response.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    response.push_str(body);
    stream.write_all(response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn start_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = listener.local_addr().unwrap();
        let identity = Identity {
            instance: "test-instance".to_string(),
            metadata: "demo".to_string(),
        };
        thread::spawn(move || serve(listener, identity));
        address
    }

    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// Reads exactly one response, leaving the connection usable for the next.
    fn read_response(stream: &mut TcpStream) -> Response {
        let mut buffer = Vec::new();
        let mut byte = [0u8; 1];
        while !buffer.ends_with(b"\r\n\r\n") {
            assert_eq!(
                stream.read(&mut byte).unwrap(),
                1,
                "connection closed mid-head"
            );
            buffer.push(byte[0]);
        }
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        assert!(response.parse(&buffer).unwrap().is_complete());
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).to_string(),
                )
            })
            .collect();
        let status = response.code.unwrap();
        let length: usize = headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case("content-length"))
            .map(|(_, value)| value.parse().unwrap())
            .unwrap();
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).unwrap();
        Response {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        }
    }

    fn connect(address: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    fn assert_closed(stream: &mut TcpStream) {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "unexpected bytes after close: {rest:?}");
    }

    #[test]
    fn ping_answers_json_and_keeps_the_connection() {
        let mut stream = connect(start_server());
        stream
            .write_all(b"GET /ping HTTP/1.1\r\nHost: demo.local\r\nX-Request-Id: abc\r\n\r\n")
            .unwrap();
        let first = read_response(&mut stream);
        assert_eq!(first.status, 200);
        assert_eq!(first.header("content-type"), Some("application/json"));
        assert_eq!(
            first.body,
            r#"{"instance":"test-instance","version":"0.1","metadata":"demo","request_id":"abc"}"#
        );

        // Pipelined: both requests in one write, answered in order.
        stream
            .write_all(b"GET /ping?x=1 HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n")
            .unwrap();
        let second = read_response(&mut stream);
        assert_eq!(second.status, 200);
        assert!(
            second.body.ends_with(r#""request_id":""}"#),
            "{}",
            second.body
        );
        assert_eq!(read_response(&mut stream).status, 404);
    }

    #[test]
    fn request_body_is_skipped() {
        let mut stream = connect(start_server());
        stream
            .write_all(
                b"POST /ping HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /ping HTTP/1.1\r\n\r\n",
            )
            .unwrap();
        assert_eq!(read_response(&mut stream).status, 405);
        assert_eq!(read_response(&mut stream).status, 200);
    }

    #[test]
    fn connection_close_is_honoured() {
        let mut stream = connect(start_server());
        stream
            .write_all(b"GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let response = read_response(&mut stream);
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("close"));
        assert_closed(&mut stream);
    }

    #[test]
    fn malformed_request_gets_400_and_close() {
        let mut stream = connect(start_server());
        stream
            .write_all(b"GET /ping HTTP/1.1\r\nBad Header\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut stream).status, 400);
        assert_closed(&mut stream);
    }
}
