//! The numbers and addresses the proxy writes into every request and response (X-Real-IP,
//! X-Forwarded-For, x-upstream-addr, x-upstream-response-time, the access log), written with
//! itoa into a stack buffer. std's `Display` for addresses and `{:.3}` for a float go through
//! the formatting machinery and a heap `String`; together they were about 3% of the proxy's
//! CPU per request.

use std::{
    fmt::{self, Write as _},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use http::HeaderValue;

/// Room for the longest text written here: an IPv6 socket address with a scope id.
const CAPACITY: usize = 80;

/// ASCII text on the stack.
pub struct Ascii {
    bytes: [u8; CAPACITY],
    len: usize,
}

impl Ascii {
    fn new() -> Self {
        Self {
            bytes: [0; CAPACITY],
            len: 0,
        }
    }

    pub fn ip(ip: IpAddr) -> Self {
        let mut text = Self::new();
        text.push_ip(ip);
        text
    }

    pub fn socket_addr(addr: SocketAddr) -> Self {
        let mut text = Self::new();
        match addr {
            SocketAddr::V4(v4) => {
                text.push_ip(IpAddr::V4(*v4.ip()));
                text.push_byte(b':');
                text.push_number(u64::from(v4.port()));
            }
            SocketAddr::V6(v6) => {
                let _ = write!(text, "{v6}");
            }
        }
        text
    }

    /// Seconds with millisecond precision, like nginx's `$upstream_response_time` (`0.004`);
    /// milliseconds are truncated, as nginx counts them.
    pub fn seconds_with_millis(elapsed: Duration) -> Self {
        let mut text = Self::new();
        text.push_number(elapsed.as_secs());
        text.push_byte(b'.');
        let millis = elapsed.subsec_millis();
        let digits = [millis / 100, millis / 10 % 10, millis % 10];
        for digit in digits {
            text.push_byte(b'0' + digit as u8);
        }
        text
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever pushed.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.bytes[..self.len])
            .expect("digits, dots, colons and brackets are a valid header value")
    }

    fn push_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                for (index, octet) in v4.octets().into_iter().enumerate() {
                    if index > 0 {
                        self.push_byte(b'.');
                    }
                    self.push_octet(octet);
                }
            }
            IpAddr::V6(v6) => {
                let _ = write!(self, "{v6}");
            }
        }
    }

    /// A byte's decimal digits, one at a time: an IPv4 address is four of these, and going
    /// through itoa and a copy for each cost 300 instructions per address.
    fn push_octet(&mut self, octet: u8) {
        if octet >= 100 {
            self.push_byte(b'0' + octet / 100);
        }
        if octet >= 10 {
            self.push_byte(b'0' + octet / 10 % 10);
        }
        self.push_byte(b'0' + octet % 10);
    }

    fn push_byte(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn push_number(&mut self, number: u64) {
        self.push(itoa::Buffer::new().format(number).as_bytes());
    }

    fn push(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(CAPACITY);
        self.bytes[self.len..end].copy_from_slice(&bytes[..end - self.len]);
        self.len = end;
    }
}

impl fmt::Write for Ascii {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if self.len + text.len() > CAPACITY {
            return Err(fmt::Error);
        }
        self.push(text.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_std_writes_them() {
        let addrs = [
            "0.0.0.0:0",
            "10.0.0.5:8080",
            "255.255.255.255:65535",
            "[::1]:443",
            "[2001:db8::1]:80",
            "[fe80::1%4294967295]:65535",
            "[::ffff:192.0.2.7]:1",
        ];
        for addr in addrs {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(Ascii::socket_addr(addr).as_str(), addr.to_string());
            assert_eq!(Ascii::ip(addr.ip()).as_str(), addr.ip().to_string());
        }
    }

    #[test]
    fn response_times_have_three_decimals() {
        let cases = [
            (Duration::ZERO, "0.000"),
            (Duration::from_micros(4_400), "0.004"),
            (Duration::from_millis(1_234), "1.234"),
            (Duration::from_millis(1_050), "1.050"),
            (Duration::from_secs(61), "61.000"),
            (Duration::from_nanos(999_999), "0.000"),
        ];
        for (elapsed, text) in cases {
            assert_eq!(Ascii::seconds_with_millis(elapsed).as_str(), text);
        }
    }
}
