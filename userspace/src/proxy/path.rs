//! Request paths as nginx sees them when it picks a `location`, which is how Interlock's
//! generated config routed: context roots and `websocket_endpoints` are matched against the
//! normalised path, never the bytes the client sent, so that `//api/x`, `/%61pi/x` and
//! `/web/../api/x` all reach the service at `/api`, and a `..` cannot carry a request out of
//! the context root that `context_root_rewrite` strips.
//!
//! The normalisation is nginx's (`ngx_http_parse_complex_uri`, `merge_slashes on`):
//!
//! - every `%XX` is decoded, `%2F` to a `/` that separates segments and `%2E` to a `.` that can
//!   form a dot segment; a decoded `%`, `?` or `#` is an ordinary byte of its segment;
//! - a `%` not followed by two hex digits, and `%00`, make the request a 400;
//! - repeated slashes are merged; `.` segments are dropped and `..` segments drop the segment
//!   before them; a `..` above the root makes the request a 400;
//! - a trailing slash (or a trailing `.` or `..` segment) leaves the path ending with `/`.
//!
//! Hand-written: the `http` crate keeps targets as sent; `url` resolves dot segments (`%2E`
//! included) but decodes nothing else, clamps `..` at the root instead of refusing it and keeps
//! repeated slashes; `percent-encoding` decodes an invalid escape as its literal text and `%00`
//! as a NUL, where nginx refuses both.
//!
//! One prefix rule serves both context roots and WebSocket endpoints: [`NormalPath::is_under`].

use std::borrow::Cow;

/// A request path normalised as nginx normalises it before matching `location`s: decoded, its
/// slashes merged, its dot segments resolved. Bytes, since a decoded path need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath<'a>(Cow<'a, [u8]>);

/// Why a request path has no normal form; nginx answers such a request 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("it does not start with /")]
    NotAbsolute,
    #[error("a % is not followed by two hex digits")]
    BadEscape,
    #[error("it encodes a NUL byte (%00)")]
    EncodedNul,
    #[error("a .. segment climbs above the root")]
    AboveRoot,
}

impl<'a> NormalPath<'a> {
    /// The root, `/`.
    pub const ROOT: NormalPath<'static> = NormalPath(Cow::Borrowed(b"/"));

    /// The normal form of `path` (a request target's path, or a context root or WebSocket
    /// endpoint as a label gives it); borrowed when `path` is normal already, as nearly every
    /// request's is.
    pub fn parse(path: &'a str) -> Result<Self, PathError> {
        let bytes = path.as_bytes();
        if bytes.first() != Some(&b'/') {
            return Err(PathError::NotAbsolute);
        }
        if is_normal(bytes) {
            return Ok(Self(Cow::Borrowed(bytes)));
        }
        Ok(Self(Cow::Owned(resolve_segments(&decode(bytes)?)?)))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether `prefix` (a context root or WebSocket endpoint) holds this path: it is the
    /// prefix, or it continues the prefix with a `/` (or the prefix ends with one). So `/app`
    /// holds `/app` and `/app/x` but not `/apple`, and `/ws/` holds `/ws/x` but not `/ws`.
    ///
    /// The prefix is normalised too, so a label's `/caf%C3%A9` holds a request's `/café`
    /// however the client encodes it. (nginx compares a `location`'s text with the decoded path
    /// literally, so such a label would only have held requests that encode its `%`.) A prefix
    /// with no normal form holds nothing.
    pub fn is_under(&self, prefix: &str) -> bool {
        self.rest_under(prefix).is_some()
    }

    /// The request target path for this path below `prefix`, when `prefix` holds it: the rest
    /// after the prefix, percent-encoded where a path may not hold the byte as it is (`/app/x`
    /// below `/app` → `/x`, `/app` → `/`). A decoded `%2F` stays a `/`, as nginx sends it when
    /// `proxy_pass` replaces the `location`'s part.
    pub fn below(&self, prefix: &str) -> Option<String> {
        let rest = self.rest_under(prefix)?;
        let mut target = String::with_capacity(rest.len() + 1);
        if rest.first() != Some(&b'/') {
            target.push('/');
        }
        for &byte in rest {
            if is_path_byte(byte) {
                target.push(char::from(byte));
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                target.push('%');
                target.push(char::from(HEX[usize::from(byte >> 4)]));
                target.push(char::from(HEX[usize::from(byte & 0xF)]));
            }
        }
        Some(target)
    }

    /// What follows `prefix` in this path, when `prefix` holds it.
    fn rest_under(&self, prefix: &str) -> Option<&[u8]> {
        let prefix = NormalPath::parse(prefix).ok()?;
        let prefix = prefix.as_bytes();
        let rest = self.0.strip_prefix(prefix)?;
        let on_boundary = rest.is_empty() || rest[0] == b'/' || prefix.ends_with(b"/");
        on_boundary.then_some(rest)
    }
}

/// A path with no escape, no repeated slash and no segment starting with a dot is its own
/// normal form (paths with a `.well-known` segment take the long way, unchanged).
fn is_normal(path: &[u8]) -> bool {
    !path.contains(&b'%')
        && !path
            .windows(2)
            .any(|pair| pair[0] == b'/' && matches!(pair[1], b'/' | b'.'))
}

/// Every `%XX` decoded.
fn decode(path: &[u8]) -> Result<Vec<u8>, PathError> {
    let hex = |digit: Option<&u8>| {
        digit
            .and_then(|&digit| char::from(digit).to_digit(16))
            .map(|value| value as u8)
    };
    let mut decoded = Vec::with_capacity(path.len());
    let mut rest = path;
    while let Some((&byte, after)) = rest.split_first() {
        if byte != b'%' {
            decoded.push(byte);
            rest = after;
            continue;
        }
        let (Some(high), Some(low)) = (hex(after.first()), hex(after.get(1))) else {
            return Err(PathError::BadEscape);
        };
        match (high << 4) | low {
            0 => return Err(PathError::EncodedNul),
            byte => decoded.push(byte),
        }
        rest = &after[2..];
    }
    Ok(decoded)
}

/// Repeated slashes merged and dot segments resolved, in a decoded path starting with `/`.
fn resolve_segments(path: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut resolved = Vec::with_capacity(path.len());
    resolved.push(b'/');
    // After the leading `/`; `resolved` ends with `/` but after a last ordinary segment.
    let mut segments = path[1..].split(|&byte| byte == b'/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            b"" | b"." => {}
            b".." => {
                if resolved.len() == 1 {
                    return Err(PathError::AboveRoot);
                }
                resolved.pop();
                let parent_end = resolved.iter().rposition(|&byte| byte == b'/');
                resolved.truncate(parent_end.map_or(1, |slash| slash + 1));
            }
            segment => {
                resolved.extend_from_slice(segment);
                if segments.peek().is_some() {
                    resolved.push(b'/');
                }
            }
        }
    }
    Ok(resolved)
}

/// RFC 3986 `pchar` (unreserved, sub-delims, `:`, `@`) and `/`: what a path holds unencoded.
fn is_path_byte(byte: u8) -> bool {
    is_unreserved_or_sub_delim(byte) || matches!(byte, b':' | b'@' | b'/')
}

/// RFC 3986's unreserved characters and sub-delimiters: what both a path and a host name
/// (`reg-name`) hold unencoded.
pub fn is_unreserved_or_sub_delim(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> Result<String, PathError> {
        NormalPath::parse(path).map(|path| String::from_utf8_lossy(path.as_bytes()).into_owned())
    }

    #[test]
    fn paths_normalise_as_nginx_normalises_them_for_locations() {
        let cases = [
            // Already normal: borrowed, unchanged.
            ("/", "/"),
            ("/api/x", "/api/x"),
            ("/api/x/", "/api/x/"),
            ("/a.b/c..d/...", "/a.b/c..d/..."),
            // Repeated slashes merged.
            ("//api/x", "/api/x"),
            ("/api//x///", "/api/x/"),
            ("///", "/"),
            // Dot segments resolved; a trailing one leaves a trailing slash.
            ("/api/../web", "/web"),
            ("/api/x/../../web/", "/web/"),
            ("/./api/./x", "/api/x"),
            ("/api/.", "/api/"),
            ("/api/..", "/"),
            ("/api/x/..", "/api/"),
            ("/api//..", "/"),
            ("/.well-known/acme", "/.well-known/acme"),
            ("/..a/.b/a..", "/..a/.b/a.."),
            // Escapes decoded, either case, before slashes and dot segments are looked at.
            ("/%61pi/x", "/api/x"),
            ("/%61%50%69", "/aPi"),
            ("/api%2Fx", "/api/x"),
            ("/api%2f%2F..%2Fweb", "/web"),
            ("/api/%2e%2E/web", "/web"),
            ("/api/.%2e/web", "/web"),
            ("/%2Fapi", "/api"),
            // A decoded %, ? or # is an ordinary byte, never an escape, query or fragment.
            ("/a%252e%252e", "/a%2e%2e"),
            ("/a%3Fb%23c", "/a?b#c"),
            ("/caf%C3%A9", "/café"),
        ];
        for (path, expected) in cases {
            assert_eq!(normal(path).as_deref(), Ok(expected), "{path}");
        }
        assert!(matches!(
            NormalPath::parse("/api/x").unwrap().0,
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn paths_nginx_refuses_have_no_normal_form() {
        let cases = [
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("api/x", PathError::NotAbsolute),
            ("/..", PathError::AboveRoot),
            ("/../admin", PathError::AboveRoot),
            ("/api/../../admin", PathError::AboveRoot),
            ("//..//admin", PathError::AboveRoot),
            ("/%2e%2e/admin", PathError::AboveRoot),
            ("/api%2F..%2F..%2Fadmin", PathError::AboveRoot),
            ("/%", PathError::BadEscape),
            ("/%4", PathError::BadEscape),
            ("/%zz", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/%%41", PathError::BadEscape),
            ("/a%00b", PathError::EncodedNul),
        ];
        for (path, error) in cases {
            assert_eq!(normal(path), Err(error), "{path}");
        }
    }

    #[test]
    fn a_prefix_holds_itself_and_what_continues_it_past_a_slash() {
        let holds = |prefix: &str, path: &str| NormalPath::parse(path).unwrap().is_under(prefix);
        for (prefix, path) in [
            ("/", "/"),
            ("/", "/anything"),
            ("/app", "/app"),
            ("/app", "/app/"),
            ("/app", "/app/x"),
            ("/app/", "/app/x"),
            ("/ws", "/ws"),
            ("/ws", "/ws/chat"),
            ("/app", "//app/x"),
            ("/app", "/%61pp/x"),
            ("/app", "/web/../app"),
            ("/a%2Fb", "/a/b/c"),
            ("/caf%C3%A9", "/caf%c3%a9/menu"),
            ("//app/./x", "/app/x"),
        ] {
            assert!(holds(prefix, path), "{prefix} should hold {path}");
        }
        for (prefix, path) in [
            ("/app", "/apple"),
            ("/app", "/ap"),
            ("/app", "/"),
            ("/app/", "/app"),
            ("/ws", "/wsx"),
            ("/ws", "/ws%78"),
            ("/app", "/app/../web"),
            ("/app", "/%2561pp"),
            // A prefix without a normal form holds nothing.
            ("/%2e%2e", "/"),
            ("/%zz", "/%25zz"),
            ("ws", "/ws"),
        ] {
            assert!(!holds(prefix, path), "{prefix} should not hold {path}");
        }
    }

    #[test]
    fn below_a_prefix_is_the_rest_re_encoded_as_a_target() {
        let below = |prefix: &str, path: &str| NormalPath::parse(path).unwrap().below(prefix);
        let cases = [
            ("/app", "/app", "/"),
            ("/app", "/app/", "/"),
            ("/app", "/app/x/y", "/x/y"),
            ("/app/", "/app/x", "/x"),
            ("/app", "//app//x", "/x"),
            ("/app", "/app/x/../../app/y", "/y"),
            ("/app", "/%61pp/%78", "/x"),
            // Decoded slashes separate segments upstream too, as nginx sends them.
            ("/app", "/app/a%2Fb", "/a/b"),
            // What a path may not hold as it is goes back to an escape.
            ("/app", "/app/a%20b%3Fc%23d%25e", "/a%20b%3Fc%23d%25e"),
            ("/app", "/app/caf%c3%a9", "/caf%C3%A9"),
            ("/app", "/app/%22q%22%7B%7D", "/%22q%22%7B%7D"),
            ("/app", "/app/;a=b,c:d@e!$&'()*+~", "/;a=b,c:d@e!$&'()*+~"),
        ];
        for (prefix, path, expected) in cases {
            assert_eq!(below(prefix, path).as_deref(), Some(expected), "{path}");
        }
        assert_eq!(below("/app", "/apple"), None);
        assert_eq!(below("/app", "/app/../x"), None);
    }
}
