//! Header decoration, as pure functions: hop-by-hop stripping, what the upstream learns about
//! the client (`X-Request-Id`, `X-Real-IP`, `X-Forwarded-For`, `X-Forwarded-Proto`), nginx's
//! `underscores_in_headers off`, and the Interlock-compatible
//! headers stamped on every response (`x-request-id`, `x-proxy-id`, `x-server-info`,
//! `x-upstream-addr`, `x-upstream-response-time`).

use std::{net::IpAddr, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{
    header::{self, InvalidHeaderValue},
    HeaderMap, HeaderName, HeaderValue,
};

use super::ascii::Ascii;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_PROXY_ID: HeaderName = HeaderName::from_static("x-proxy-id");
pub const X_SERVER_INFO: HeaderName = HeaderName::from_static("x-server-info");
pub const X_UPSTREAM_ADDR: HeaderName = HeaderName::from_static("x-upstream-addr");
pub const X_UPSTREAM_RESPONSE_TIME: HeaderName =
    HeaderName::from_static("x-upstream-response-time");

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1), so they
/// never cross the proxy. Transfer-Encoding is re-derived by hyper from the body it streams.
/// A `static`: a `const` array is built, and its names dropped, at every use.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A request's id: 32 lower-case hex digits, sent upstream and back to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// 122 random bits from a thread-local generator (uuid's `fast-rng`): a `getrandom`
    /// syscall per request would cost more than the rest of the id.
    pub fn fresh() -> Self {
        let mut hex = [0u8; uuid::fmt::Simple::LENGTH];
        let text = uuid::Uuid::new_v4().simple().encode_lower(&mut hex);
        Self(HeaderValue::from_str(text).expect("hex digits are a valid header value"))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    #[cfg(test)]
    pub fn from_static(id: &'static str) -> Self {
        Self(HeaderValue::from_static(id))
    }
}

/// Who answered: this proxy's identity headers, fixed for the life of `serve`.
#[derive(Debug, Clone)]
pub struct ProxyIdentity {
    proxy_id: HeaderValue,
    server_info: HeaderValue,
}

impl ProxyIdentity {
    pub fn new(proxy_id: &str, server_info: &str) -> Result<Self, InvalidHeaderValue> {
        Ok(Self {
            proxy_id: HeaderValue::from_str(proxy_id)?,
            server_info: HeaderValue::from_str(server_info)?,
        })
    }

    /// The headers [`stamp_identity`] sets, for answers written without a `HeaderMap`.
    pub fn headers(&self, request_id: &RequestId) -> [(HeaderName, HeaderValue); 3] {
        [
            (X_REQUEST_ID, request_id.0.clone()),
            (X_PROXY_ID, self.proxy_id.clone()),
            (X_SERVER_INFO, self.server_info.clone()),
        ]
    }
}

/// What the upstream is told about the client's request.
#[derive(Debug, Clone, Copy)]
pub struct ClientFacts<'a> {
    pub request_id: &'a RequestId,
    /// The client's address.
    pub addr: IpAddr,
    /// `http` or `https`: how the client reached the proxy.
    pub scheme: &'static str,
    /// nginx's `underscores_in_headers`: when off, headers with `_` in their name are dropped.
    pub underscores_in_headers: bool,
}

/// The upstream that produced a response and how long its response head took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamAnswer {
    pub addr: SocketAddr,
    pub response_time: Duration,
}

/// Removes the hop-by-hop headers ([`HOP_BY_HOP`]). Headers the `Connection` header names are
/// kept, as nginx keeps them: a client could otherwise strip what the upstream relies on
/// (`Connection: host` leaves a request without Host, `Connection: x-forwarded-for` drops a
/// trusted front proxy's chain), and a proxy that strips on a client's word is the classic
/// hop-by-hop abuse.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // What to remove is found in one pass over the few names present, and only those are
    // removed: each removal hashes its name, and nearly every upstream response carries one of
    // them (`Connection: keep-alive`), so removing all seven cost 2.3k instructions per response.
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    for name in &found {
        headers.remove(name);
    }
}

/// Turns the client's request headers into the upstream's: hop-by-hop (and, unless allowed,
/// underscored) headers removed, the request id and what the proxy knows about the client set.
/// `Host` stays as the client sent it.
pub fn prepare_upstream_request(headers: &mut HeaderMap, client: ClientFacts<'_>) {
    remove_hop_by_hop(headers);
    // The proxy meets the client's expectation itself (hyper answers 100 Continue when the body
    // is first read), as nginx does: the upstream gets the body, not an expectation to answer.
    headers.remove(header::EXPECT);
    if !client.underscores_in_headers {
        remove_underscored(headers);
    }
    headers.insert(X_REQUEST_ID, client.request_id.0.clone());
    headers.insert(X_REAL_IP, Ascii::ip(client.addr).header_value());
    let forwarded_for = forwarded_for_with(headers, client.addr);
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme));
}

/// nginx ignores header names containing `_` unless `underscores_in_headers` is on, because
/// CGI-style servers cannot tell `X_Real_IP` from `X-Real-IP`.
fn remove_underscored(headers: &mut HeaderMap) {
    let underscored: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in underscored {
        headers.remove(name);
    }
}

/// The `X-Forwarded-For` chain with `client` appended; several incoming headers are joined
/// into one list, as RFC 9110 allows for comma-separated fields.
fn forwarded_for_with(headers: &HeaderMap, client: IpAddr) -> HeaderValue {
    let mut chain: Vec<u8> = Vec::with_capacity(64);
    for earlier in headers.get_all(X_FORWARDED_FOR) {
        chain.extend_from_slice(earlier.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(Ascii::ip(client).as_str().as_bytes());
    // The chain's own buffer becomes the value: no second copy.
    HeaderValue::from_maybe_shared(Bytes::from(chain))
        .unwrap_or_else(|_| Ascii::ip(client).header_value())
}

/// Turns the upstream's response headers into the client's: hop-by-hop removed, then stamped.
pub fn prepare_client_response(
    headers: &mut HeaderMap,
    request_id: &RequestId,
    identity: &ProxyIdentity,
    upstream: UpstreamAnswer,
) {
    // A body sent with Transfer-Encoding was framed by it, not by its Content-Length (RFC 9112
    // §6.3), and reaches the client re-framed by hyper: a Content-Length kept beside it would
    // frame the client's copy wrongly.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(headers);
    stamp_identity(headers, request_id, identity);
    headers.insert(
        X_UPSTREAM_ADDR,
        Ascii::socket_addr(upstream.addr).header_value(),
    );
    headers.insert(
        X_UPSTREAM_RESPONSE_TIME,
        Ascii::seconds_with_millis(upstream.response_time).header_value(),
    );
}

/// The headers every answer carries, including the proxy's own error answers.
pub fn stamp_identity(headers: &mut HeaderMap, request_id: &RequestId, identity: &ProxyIdentity) {
    headers.insert(X_REQUEST_ID, request_id.0.clone());
    headers.insert(X_PROXY_ID, identity.proxy_id.clone());
    headers.insert(X_SERVER_INFO, identity.server_info.clone());
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn request_id_is_32_lowercase_hex_digits_and_fresh() {
        let id = RequestId::fresh();
        assert_eq!(id.as_str().len(), 32);
        assert!(id
            .as_str()
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_ne!(id, RequestId::fresh());
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_those_connection_names_kept() {
        let mut map = headers(&[
            ("connection", "keep-alive, Host, X-Forwarded-For"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-forwarded-for", "192.0.2.7"),
            ("x-other", "1"),
            ("accept", "*/*"),
            ("host", "app.example.com"),
        ]);
        remove_hop_by_hop(&mut map);
        assert_eq!(
            names(&map),
            ["accept", "host", "x-forwarded-for", "x-other"]
        );
    }

    fn facts(request_id: &RequestId) -> ClientFacts<'_> {
        ClientFacts {
            request_id,
            addr: CLIENT,
            scheme: "http",
            underscores_in_headers: false,
        }
    }

    #[test]
    fn upstream_request_gets_request_id_and_client_address() {
        let id = RequestId::fresh();
        let mut map = headers(&[
            ("host", "App.Example.com:8080"),
            ("connection", "close"),
            ("x-forwarded-proto", "gopher"),
        ]);
        prepare_upstream_request(&mut map, facts(&id));
        assert_eq!(map["host"], "App.Example.com:8080");
        assert_eq!(map["x-request-id"], id.as_str());
        assert_eq!(map["x-real-ip"], "192.0.2.7");
        assert_eq!(map["x-forwarded-for"], "192.0.2.7");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map.get_all("x-forwarded-proto").iter().count(), 1);
        assert!(!map.contains_key("connection"));

        let mut tls = headers(&[("host", "a")]);
        let over_tls = ClientFacts {
            scheme: "https",
            ..facts(&id)
        };
        prepare_upstream_request(&mut tls, over_tls);
        assert_eq!(tls["x-forwarded-proto"], "https");
    }

    #[test]
    fn underscored_headers_are_dropped_unless_allowed() {
        let id = RequestId::fresh();
        let original = headers(&[("host", "a"), ("x_api_key", "k"), ("x-api-key", "k2")]);
        let mut dropped = original.clone();
        prepare_upstream_request(&mut dropped, facts(&id));
        assert!(!dropped.contains_key("x_api_key"));
        assert_eq!(dropped["x-api-key"], "k2");

        let mut kept = original;
        let allowed = ClientFacts {
            underscores_in_headers: true,
            ..facts(&id)
        };
        prepare_upstream_request(&mut kept, allowed);
        assert_eq!(kept["x_api_key"], "k");
    }

    #[test]
    fn forwarded_for_is_appended_to_every_earlier_hop() {
        let mut map = headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "198.51.100.2, 10.0.0.3"),
        ]);
        prepare_upstream_request(&mut map, facts(&RequestId::fresh()));
        let chain: Vec<_> = map.get_all("x-forwarded-for").iter().collect();
        assert_eq!(chain, ["203.0.113.1, 198.51.100.2, 10.0.0.3, 192.0.2.7"]);
    }

    #[test]
    fn client_response_is_stamped_and_replaces_upstream_spoofs() {
        let id = RequestId::fresh();
        let identity = ProxyIdentity::new("lb-1", "xlb/0.1.0 (abc) linux/amd64").unwrap();
        let upstream = UpstreamAnswer {
            addr: "10.0.0.5:8080".parse().unwrap(),
            response_time: Duration::from_micros(4_400),
        };
        let mut map = headers(&[
            ("x-proxy-id", "spoofed"),
            ("connection", "keep-alive"),
            ("content-type", "text/plain"),
        ]);
        prepare_client_response(&mut map, &id, &identity, upstream);
        assert_eq!(map["x-request-id"], id.as_str());
        assert_eq!(map["x-proxy-id"], "lb-1");
        assert_eq!(map["x-server-info"], "xlb/0.1.0 (abc) linux/amd64");
        assert_eq!(map["x-upstream-addr"], "10.0.0.5:8080");
        assert_eq!(map["x-upstream-response-time"], "0.004");
        assert_eq!(map.get_all("x-proxy-id").iter().count(), 1);
        assert!(!map.contains_key("connection"));
    }

    #[test]
    fn a_chunked_upstream_response_loses_its_content_length() {
        let upstream = UpstreamAnswer {
            addr: "10.0.0.5:8080".parse().unwrap(),
            response_time: Duration::ZERO,
        };
        let identity = ProxyIdentity::new("lb-1", "xlb").unwrap();
        let mut both = headers(&[("transfer-encoding", "chunked"), ("content-length", "5")]);
        prepare_client_response(&mut both, &RequestId::fresh(), &identity, upstream);
        assert!(!both.contains_key("content-length"), "{both:?}");
        assert!(!both.contains_key("transfer-encoding"), "{both:?}");

        let mut length_only = headers(&[("content-length", "5")]);
        prepare_client_response(&mut length_only, &RequestId::fresh(), &identity, upstream);
        assert_eq!(length_only["content-length"], "5");
    }

    #[test]
    fn identity_rejects_values_that_cannot_be_headers() {
        assert!(ProxyIdentity::new("bad\nid", "xlb").is_err());
    }
}
