//! How a request head frames the body that follows it, as the head guard (see
//! [`super::head_guard`]) follows it to find where the next head starts: by `Content-Length`,
//! or chunk by chunk exactly as hyper's decoder reads it, refusing the framings a server behind
//! the proxy could read differently.

use http::StatusCode;

/// How a request's body is delimited.
pub enum Framing {
    None,
    Fixed(u64),
    Chunked,
}

/// How the body of a parsed request is framed, or why the request is refused. Stricter than
/// RFC 9112 §6.3 allows, as nginx is: a request with both `Content-Length` and
/// `Transfer-Encoding`, or with `Content-Length` more than once, is refused instead of having
/// one of them win, since a server behind the proxy might pick the other (request smuggling).
pub fn body_framing(request: &httparse::Request<'_, '_>) -> Result<Framing, (StatusCode, String)> {
    let bad_request = |reason: String| (StatusCode::BAD_REQUEST, reason);
    let mut content_length = None;
    let mut content_lengths = 0;
    let mut transfer_codings = Vec::new();
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            content_lengths += 1;
            let value = header.value;
            let length = std::str::from_utf8(value)
                .ok()
                .filter(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
                .and_then(|text| text.parse::<u64>().ok())
                .ok_or_else(|| {
                    bad_request(format!(
                        "invalid Content-Length {:?}",
                        String::from_utf8_lossy(value)
                    ))
                })?;
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_codings.extend(
                header
                    .value
                    .split(|&byte| byte == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|coding| !coding.is_empty()),
            );
        }
    }
    if content_lengths > 1 {
        return Err(bad_request(
            "Content-Length given more than once".to_owned(),
        ));
    }
    if transfer_codings.is_empty() {
        return Ok(match content_length {
            None | Some(0) => Framing::None,
            Some(length) => Framing::Fixed(length),
        });
    }
    if content_lengths > 0 {
        return Err(bad_request(
            "both Content-Length and Transfer-Encoding given".to_owned(),
        ));
    }
    if request.version != Some(1) {
        return Err(bad_request(
            "Transfer-Encoding in an HTTP/1.0 request".to_owned(),
        ));
    }
    match transfer_codings.as_slice() {
        [coding] if coding.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
        codings => {
            let codings: Vec<_> = codings
                .iter()
                .map(|coding| String::from_utf8_lossy(coding))
                .collect();
            Err((
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "Transfer-Encoding {:?} is not supported",
                    codings.join(", ")
                ),
            ))
        }
    }
}

/// Whether hyper may switch the connection to another protocol after this request.
pub fn switches_protocols(request: &httparse::Request<'_, '_>) -> bool {
    request.method == Some("CONNECT")
        || (request.version == Some(1)
            && request
                .headers
                .iter()
                .any(|header| header.name.eq_ignore_ascii_case("upgrade")))
}

/// Follows a chunked body (RFC 9112 §7.1) exactly as hyper's decoder does, to find its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedFraming {
    /// Expecting the first hex digit of a chunk size.
    Start {
        size: u64,
    },
    Size {
        size: u64,
    },
    /// Whitespace after the size.
    SizeSpace {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line, or the final CRLF.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

impl ChunkedFraming {
    /// Consumes bytes of the body from the front of `bytes`: how many belong to the body, and
    /// whether the body ended with them. `Err` when the bytes are not valid chunked framing.
    pub fn advance(&mut self, bytes: &[u8]) -> Result<(usize, bool), ()> {
        let mut used = 0;
        while used < bytes.len() {
            if let Self::Data { remaining } = self {
                let length =
                    (bytes.len() - used).min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                used += length;
                *remaining -= length as u64;
                if *remaining == 0 {
                    *self = Self::DataCr;
                }
                continue;
            }
            let byte = bytes[used];
            used += 1;
            *self = match (*self, byte) {
                (Self::Start { size } | Self::Size { size }, _) if byte.is_ascii_hexdigit() => {
                    let digit = u64::from(char::from(byte).to_digit(16).unwrap_or(0));
                    let size = size
                        .checked_mul(16)
                        .and_then(|size| size.checked_add(digit));
                    Self::Size {
                        size: size.ok_or(())?,
                    }
                }
                (Self::Size { size } | Self::SizeSpace { size }, b'\t' | b' ') => {
                    Self::SizeSpace { size }
                }
                (Self::Size { size } | Self::SizeSpace { size }, b';') => Self::Extension { size },
                (
                    Self::Size { size } | Self::SizeSpace { size } | Self::Extension { size },
                    b'\r',
                ) => Self::SizeLf { size },
                (Self::Extension { .. }, b'\n') => return Err(()),
                (Self::Extension { size }, _) => Self::Extension { size },
                (Self::SizeLf { size: 0 }, b'\n') => Self::EndCr,
                (Self::SizeLf { size }, b'\n') => Self::Data { remaining: size },
                (Self::DataCr, b'\r') => Self::DataLf,
                (Self::DataLf, b'\n') => Self::Start { size: 0 },
                (Self::EndCr, b'\r') => Self::EndLf,
                (Self::Trailer, b'\r') => Self::TrailerLf,
                (Self::EndCr | Self::Trailer, _) => Self::Trailer,
                (Self::TrailerLf, b'\n') => Self::EndCr,
                (Self::EndLf, b'\n') => return Ok((used, true)),
                _ => return Err(()),
            };
        }
        Ok((used, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(request: &str) -> Result<Framing, (StatusCode, String)> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Request::new(&mut headers);
        assert!(parsed.parse(request.as_bytes()).unwrap().is_complete());
        body_framing(&parsed)
    }

    fn refusal(request: &str) -> (u16, String) {
        match framing(request) {
            Err((status, reason)) => (status.as_u16(), reason),
            Ok(_) => panic!("accepted: {request:?}"),
        }
    }

    #[test]
    fn bodies_are_framed_by_length_or_chunks() {
        assert!(matches!(
            framing("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Fixed(12))
        ));
        assert!(matches!(
            framing("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"),
            Ok(Framing::None)
        ));
        assert!(matches!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        ));
        assert!(matches!(
            framing("GET / HTTP/1.1\r\n\r\n"),
            Ok(Framing::None)
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let both = "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refusal(both).0, 400);
        let both_reversed =
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(refusal(both_reversed).0, 400);
        let twice = "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            refusal(twice),
            (400, "Content-Length given more than once".into())
        );
        let conflicting = "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(refusal(conflicting).0, 400);
        for value in ["5, 5", "-5", "+5", "0x5", "", "5 5", "99999999999999999999"] {
            let request = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(refusal(&request).0, 400, "{value:?}");
        }
        let http10_chunked = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refusal(http10_chunked).0, 400);
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_not_implemented() {
        for value in ["gzip, chunked", "chunked, chunked", "identity", "gzip"] {
            let request = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {value}\r\n\r\n");
            assert_eq!(refusal(&request).0, 501, "{value:?}");
        }
        let split =
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refusal(split).0, 501);
    }

    /// Feeds `body` to a fresh framing one byte at a time and all at once; both must agree.
    fn chunked_end(body: &[u8]) -> Result<Option<usize>, ()> {
        let mut whole = ChunkedFraming::Start { size: 0 };
        let at_once = match whole.advance(body)? {
            (used, true) => Some(used),
            (_, false) => None,
        };
        let mut bytewise = ChunkedFraming::Start { size: 0 };
        let mut one_by_one = None;
        for (index, byte) in body.iter().enumerate() {
            if let (1, true) = bytewise.advance(std::slice::from_ref(byte))? {
                one_by_one = Some(index + 1);
                break;
            }
        }
        assert_eq!(at_once, one_by_one);
        Ok(at_once)
    }

    #[test]
    fn chunked_framing_finds_the_end_of_the_body() {
        let body =
            b"5\r\nhello\r\n1A;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nGET / HTTP/1.1";
        assert_eq!(chunked_end(body), Ok(Some(body.len() - 14)));
        let with_trailers = b"3\r\nabc\r\n0\r\nx-sum: 1\r\nx-more: 2\r\n\r\nnext";
        assert_eq!(
            chunked_end(with_trailers),
            Ok(Some(with_trailers.len() - 4))
        );
        let size_space = b"3 \r\nabc\r\n0 \r\n\r\n";
        assert_eq!(chunked_end(size_space), Ok(Some(size_space.len())));
        assert_eq!(chunked_end(b"5\r\nhel"), Ok(None));
    }

    #[test]
    fn malformed_chunked_framing_is_an_error() {
        for body in [
            b"z\r\n".as_slice(),
            b"5\nhello",
            b"5\r\nhello\n0\r\n\r\n",
            b"5;a\nb\r\n",
            b"10000000000000000\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                chunked_end(body),
                Err(()),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
