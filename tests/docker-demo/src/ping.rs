//! The `/ping` response body: who this instance is and the JSON that says so.

/// What a `/ping` answer reports about the process, fixed at start-up.
#[derive(Clone, Debug)]
pub struct Identity {
    pub instance: String,
    pub metadata: String,
}

impl Identity {
    /// The kernel's hostname is the container ID inside Docker, which is what
    /// tells backends apart; `HOSTNAME` is the fallback where `/proc` is absent.
    pub fn from_environment() -> Self {
        let instance = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let metadata = std::env::var("METADATA").unwrap_or_default();
        Identity { instance, metadata }
    }
}

const VERSION: &str = "0.1";

/// Keys are written in the original docker-demo's order so that clients
/// comparing raw bodies see the same document.
pub fn ping_body(identity: &Identity, request_id: &str) -> String {
    format!(
        "{{\"instance\":{},\"version\":{},\"metadata\":{},\"request_id\":{}}}",
        json_string(&identity.instance),
        json_string(VERSION),
        json_string(&identity.metadata),
        json_string(request_id),
    )
}

/// A JSON string literal (RFC 8259): quotes, backslashes and control
/// characters escaped; everything else, non-ASCII included, kept as UTF-8.
pub fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for character in value.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            control if u32::from(control) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(control)));
            }
            other => out.push(other),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_strings_are_quoted() {
        assert_eq!(json_string("demo"), "\"demo\"");
        assert_eq!(json_string(""), "\"\"");
    }

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(json_string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(json_string("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(
            json_string("\u{08}\u{0c}\u{01}\u{1f}"),
            r#""\b\f\u0001\u001f""#
        );
    }

    #[test]
    fn non_ascii_is_kept() {
        assert_eq!(json_string("héllo ☃"), "\"héllo ☃\"");
    }

    #[test]
    fn body_has_the_original_key_order() {
        let identity = Identity {
            instance: "c0ffee".to_string(),
            metadata: "say \"hi\"".to_string(),
        };
        assert_eq!(
            ping_body(&identity, "abc"),
            r#"{"instance":"c0ffee","version":"0.1","metadata":"say \"hi\"","request_id":"abc"}"#
        );
    }
}
