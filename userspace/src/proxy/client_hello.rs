//! Reads a TLS ClientHello just far enough to learn its SNI host name, keeping every byte read
//! so that the connection can still be relayed untouched or handed to rustls.
//!
//! The parser is bounded: it looks at no more than [`MAX_CLIENT_HELLO_BYTES`], allocates only
//! the host name, and turns anything that is not a well-formed ClientHello into an error.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest ClientHello accepted, records included. Real ones are under 2 KiB (4 KiB with
/// post-quantum key shares); rustls refuses larger handshake messages too.
pub const MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// RFC 1035's limit on a DNS name.
const MAX_HOST_NAME: usize = 253;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientHelloError {
    #[error("not a TLS handshake")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO_BYTES} bytes")]
    TooLarge,
    #[error("connection closed before the ClientHello was complete")]
    Truncated,
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("reading the ClientHello: {0}")]
    Io(String),
}

/// What [`parse`] makes of the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole ClientHello, with its SNI host name (lower case) if it has one.
    Complete { server_name: Option<String> },
}

/// A ClientHello read off a connection: the bytes, to be replayed, and its SNI host name.
#[derive(Debug)]
pub struct ClientHello {
    pub bytes: Vec<u8>,
    pub server_name: Option<String>,
}

/// Reads from `stream` until a whole ClientHello has arrived, within `timeout`.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<ClientHello, ClientHelloError> {
    let reading = async {
        let mut bytes = Vec::with_capacity(2048);
        loop {
            let mut chunk = [0u8; 4096];
            let room = MAX_CLIENT_HELLO_BYTES - bytes.len();
            let received = stream
                .read(&mut chunk[..room.min(4096)])
                .await
                .map_err(|error| ClientHelloError::Io(error.to_string()))?;
            if received == 0 {
                return Err(ClientHelloError::Truncated);
            }
            bytes.extend_from_slice(&chunk[..received]);
            match parse(&bytes)? {
                Parsed::Complete { server_name } => return Ok(ClientHello { bytes, server_name }),
                Parsed::Incomplete if bytes.len() >= MAX_CLIENT_HELLO_BYTES => {
                    return Err(ClientHelloError::TooLarge)
                }
                Parsed::Incomplete => {}
            }
        }
    };
    tokio::time::timeout(timeout, reading)
        .await
        .map_err(|_| ClientHelloError::Timeout(timeout))?
}

/// Parses the handshake records at the start of `bytes` as far as they go.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ClientHelloError> {
    // The ClientHello may span several records; their payloads are joined, bounded by the
    // input's own size.
    let mut handshake = Vec::new();
    let mut rest = bytes;
    loop {
        if handshake.len() >= 4 {
            let length = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if length + 4 > MAX_CLIENT_HELLO_BYTES {
                return Err(ClientHelloError::TooLarge);
            }
            if handshake.len() >= length + 4 {
                let server_name = server_name(&handshake[4..length + 4])?;
                return Ok(Parsed::Complete { server_name });
            }
        }
        if rest.len() < RECORD_HEADER {
            return check_record_prefix(rest, handshake.is_empty());
        }
        let (header, after_header) = rest.split_at(RECORD_HEADER);
        if header[0] != CONTENT_TYPE_HANDSHAKE || header[1] != 3 {
            return Err(if handshake.is_empty() {
                ClientHelloError::NotTls
            } else {
                ClientHelloError::Malformed("record after the first is not a handshake record")
            });
        }
        let record_length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_length == 0 || record_length > 1 << 14 {
            return Err(ClientHelloError::Malformed("record length out of range"));
        }
        if after_header.len() < record_length {
            // Check what is there already, so garbage is refused without waiting for more.
            let first_byte = after_header.first();
            if handshake.is_empty()
                && first_byte.is_some_and(|&kind| kind != HANDSHAKE_CLIENT_HELLO)
            {
                return Err(ClientHelloError::NotTls);
            }
            return Ok(Parsed::Incomplete);
        }
        let (payload, after_record) = after_header.split_at(record_length);
        if handshake.is_empty() && payload[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(ClientHelloError::NotTls);
        }
        handshake.extend_from_slice(payload);
        rest = after_record;
    }
}

/// Refuses a partial record header early when its first bytes already cannot be TLS.
fn check_record_prefix(prefix: &[u8], first: bool) -> Result<Parsed, ClientHelloError> {
    let bad_type = prefix
        .first()
        .is_some_and(|&kind| kind != CONTENT_TYPE_HANDSHAKE);
    let bad_version = prefix.get(1).is_some_and(|&major| major != 3);
    match (bad_type || bad_version, first) {
        (false, _) => Ok(Parsed::Incomplete),
        (true, true) => Err(ClientHelloError::NotTls),
        (true, false) => Err(ClientHelloError::Malformed(
            "record after the first is not a handshake record",
        )),
    }
}

/// The SNI host name in a ClientHello body (after the 4-byte handshake header).
fn server_name(body: &[u8]) -> Result<Option<String>, ClientHelloError> {
    let mut hello = Cursor(body);
    hello.skip(2 + 32, "version and random")?;
    let session_id = hello.u8("session id length")?;
    hello.skip(usize::from(session_id), "session id")?;
    let suites = hello.u16("cipher suites length")?;
    hello.skip(usize::from(suites), "cipher suites")?;
    let compression = hello.u8("compression methods length")?;
    hello.skip(usize::from(compression), "compression methods")?;
    if hello.0.is_empty() {
        return Ok(None);
    }
    let extensions_length = hello.u16("extensions length")?;
    let mut extensions = Cursor(hello.take(usize::from(extensions_length), "extensions")?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16("extension type")?;
        let length = extensions.u16("extension length")?;
        let data = extensions.take(usize::from(length), "extension data")?;
        if kind == EXTENSION_SERVER_NAME {
            return host_name(data).map(Some);
        }
    }
    Ok(None)
}

/// RFC 6066 §3: a list holding one `host_name` entry.
fn host_name(extension: &[u8]) -> Result<String, ClientHelloError> {
    let mut list = Cursor(extension);
    let list_length = list.u16("server name list length")?;
    let mut entries = Cursor(list.take(usize::from(list_length), "server name list")?);
    while !entries.0.is_empty() {
        let name_type = entries.u8("server name type")?;
        let length = entries.u16("server name length")?;
        let name = entries.take(usize::from(length), "server name")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        let valid = !name.is_empty()
            && name.len() <= MAX_HOST_NAME
            && name
                .iter()
                .all(|&byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b'_'));
        if !valid {
            return Err(ClientHelloError::Malformed(
                "server name is not a host name",
            ));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        return Ok(name);
    }
    Err(ClientHelloError::Malformed(
        "server name list has no host name",
    ))
}

/// Big-endian reads that fail, naming the field, instead of running past the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize, field: &'static str) -> Result<&'a [u8], ClientHelloError> {
        if self.0.len() < length {
            return Err(ClientHelloError::Malformed(field));
        }
        let (taken, rest) = self.0.split_at(length);
        self.0 = rest;
        Ok(taken)
    }

    fn skip(&mut self, length: usize, field: &'static str) -> Result<(), ClientHelloError> {
        self.take(length, field).map(drop)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ClientHelloError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ClientHelloError> {
        let bytes = self.take(2, field)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};

    use super::*;

    /// The first flight of a real rustls client for `server_name`.
    fn rustls_client_hello(server_name: &str) -> Vec<u8> {
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        client.write_tls(&mut bytes).unwrap();
        bytes
    }

    /// The same handshake message split over records of at most `size` bytes.
    fn split_into_records(hello: &[u8], size: usize) -> Vec<u8> {
        let message = &hello[RECORD_HEADER..];
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn complete(name: &str) -> Parsed {
        Parsed::Complete {
            server_name: Some(name.to_owned()),
        }
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let hello = rustls_client_hello("App.Example.org");
        assert_eq!(parse(&hello), Ok(complete("app.example.org")));
    }

    #[test]
    fn every_truncation_is_incomplete_never_an_error() {
        let hello = rustls_client_hello("a.example.org");
        for end in 0..hello.len() {
            assert_eq!(parse(&hello[..end]), Ok(Parsed::Incomplete), "{end}");
        }
    }

    #[test]
    fn a_client_hello_spread_over_several_records_is_joined() {
        let hello = split_into_records(&rustls_client_hello("b.example.org"), 50);
        assert_eq!(parse(&hello), Ok(complete("b.example.org")));
        for end in 0..hello.len() {
            assert_eq!(parse(&hello[..end]), Ok(Parsed::Incomplete), "{end}");
        }
    }

    #[test]
    fn a_client_hello_without_sni_has_no_server_name() {
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        let address = ServerName::try_from("127.0.0.1").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), address).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        assert_eq!(parse(&hello), Ok(Parsed::Complete { server_name: None }));
    }

    #[test]
    fn plain_http_and_garbage_are_not_tls() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(ClientHelloError::NotTls)
        );
        assert_eq!(parse(b"G"), Err(ClientHelloError::NotTls));
        assert_eq!(parse(&[22, 2]), Err(ClientHelloError::NotTls));
        // A handshake record holding a ServerHello.
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(ClientHelloError::NotTls)
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 0]),
            Err(ClientHelloError::Malformed("record length out of range"))
        );
    }

    #[test]
    fn lengths_that_lie_are_malformed_or_too_large() {
        let hello = rustls_client_hello("c.example.org");
        // Handshake length claiming 16 MiB.
        let mut huge = hello.clone();
        huge[6..9].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ClientHelloError::TooLarge));
        // Session id length running past the message.
        let mut lying = hello.clone();
        let handshake_length = usize::from(lying[7]) << 8 | usize::from(lying[8]);
        lying[RECORD_HEADER + 4 + 34] = 0xff;
        let message_end = RECORD_HEADER + 4 + handshake_length;
        assert!(matches!(
            parse(&lying[..message_end]),
            Err(ClientHelloError::Malformed(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic, no extra crate.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let hello = rustls_client_hello("d.example.org");
        for _ in 0..20_000 {
            let mut bytes = hello.clone();
            let flips = 1 + next() % 4;
            for _ in 0..flips {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let end = (next() % (bytes.len() as u64 + 1)) as usize;
            let _ = parse(&bytes[..end]);
            let noise: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            let _ = parse(&[&[22, 3, 1][..], &noise].concat());
        }
    }

    #[tokio::test]
    async fn read_stops_at_the_end_of_the_client_hello() {
        let hello = rustls_client_hello("e.example.org");
        let mut stream = &[&hello[..], b"application data"].concat()[..];
        let read = read(&mut stream, Duration::from_secs(1)).await.unwrap();
        assert_eq!(read.server_name.as_deref(), Some("e.example.org"));
        assert!(read.bytes.starts_with(&hello));
    }

    #[tokio::test]
    async fn read_refuses_silence_and_early_close() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let silent = read(&mut server, Duration::from_millis(50)).await;
        assert_eq!(
            silent.unwrap_err(),
            ClientHelloError::Timeout(Duration::from_millis(50))
        );
        tokio::io::AsyncWriteExt::write_all(&mut client, &[22, 3, 1, 0, 40])
            .await
            .unwrap();
        drop(client);
        let closed = read(&mut server, Duration::from_secs(1)).await;
        assert_eq!(closed.unwrap_err(), ClientHelloError::Truncated);
    }
}
