//! The labels saying how a service's traffic is carried: TLS termination with certificates from
//! Docker secrets, TLS passthrough, TLS towards the tasks, and WebSocket endpoints.
//!
//! [`parse`] is pure: a bad value becomes the reason the service is disabled.

use serde::{Deserialize, Serialize};

/// Name of the Docker secret holding the PEM certificate chain served for the service's hosts.
pub const LABEL_SSL_CERT: &str = "com.docker.lb.ssl_cert";
/// Name of the Docker secret holding the PEM private key of `ssl_cert`.
pub const LABEL_SSL_KEY: &str = "com.docker.lb.ssl_key";
/// `true`: on the SSL port, relay the TLS stream to the tasks untouched, chosen by SNI.
pub const LABEL_SSL_PASSTHROUGH: &str = "com.docker.lb.ssl_passthrough";
/// `true`: speak TLS to the tasks.
pub const LABEL_SSL_BACKEND: &str = "com.docker.lb.ssl_backend";
/// `none` (default) or `required`: whether the tasks' certificates are verified.
pub const LABEL_SSL_BACKEND_TLS_VERIFY: &str = "com.docker.lb.ssl_backend_tls_verify";
/// Comma-separated path prefixes where `Upgrade: websocket` is relayed.
pub const LABEL_WEBSOCKET_ENDPOINTS: &str = "com.docker.lb.websocket_endpoints";

/// Docker limits secret names to this length.
const MAX_SECRET_NAME: usize = 64;

/// How a service's traffic is carried, from its labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transport {
    /// Certificate and key secrets served for the service's hosts on the SSL port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateSecrets>,
    /// The SSL port relays the TLS stream untouched instead of terminating it.
    pub ssl_passthrough: bool,
    /// TLS towards the tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<BackendTls>,
    /// Path prefixes where WebSocket upgrades are relayed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub websocket_endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateSecrets {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendTls {
    pub verify: BackendTlsVerify,
    /// The name sent as SNI and, with `required`, checked against the tasks' certificates:
    /// the service's first host, without a wildcard's `*.`.
    pub server_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendTlsVerify {
    None,
    Required,
}

/// Reads the transport labels; `label` looks one up; `hosts` are the service's hosts, sorted.
pub fn parse<'a>(
    label: impl Fn(&str) -> Option<&'a str>,
    hosts: &[String],
) -> Result<Transport, String> {
    let certificate = match (label(LABEL_SSL_CERT), label(LABEL_SSL_KEY)) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(CertificateSecrets {
            cert: secret_name(LABEL_SSL_CERT, cert)?,
            key: secret_name(LABEL_SSL_KEY, key)?,
        }),
        (Some(_), None) => {
            return Err(format!(
                "label {LABEL_SSL_CERT} is set without {LABEL_SSL_KEY}"
            ))
        }
        (None, Some(_)) => {
            return Err(format!(
                "label {LABEL_SSL_KEY} is set without {LABEL_SSL_CERT}"
            ))
        }
    };
    let ssl_passthrough = boolean(LABEL_SSL_PASSTHROUGH, label(LABEL_SSL_PASSTHROUGH))?;
    let verify = match label(LABEL_SSL_BACKEND_TLS_VERIFY).map(str::trim) {
        None => BackendTlsVerify::None,
        Some(value) if value.eq_ignore_ascii_case("none") => BackendTlsVerify::None,
        Some(value) if value.eq_ignore_ascii_case("required") => BackendTlsVerify::Required,
        Some(value) => {
            return Err(format!(
                "label {LABEL_SSL_BACKEND_TLS_VERIFY} is {value:?}, not \"none\" or \"required\""
            ))
        }
    };
    let backend_tls = match boolean(LABEL_SSL_BACKEND, label(LABEL_SSL_BACKEND))? {
        false => None,
        true => Some(BackendTls {
            verify,
            server_name: backend_server_name(hosts)?,
        }),
    };
    let websocket_endpoints = match label(LABEL_WEBSOCKET_ENDPOINTS) {
        None => Vec::new(),
        Some(value) => websocket_paths(value)?,
    };
    Ok(Transport {
        certificate,
        ssl_passthrough,
        backend_tls,
        websocket_endpoints,
    })
}

/// A Docker secret name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 64 characters), which is also
/// the file name of the secret in the secrets directory, so it can never leave that directory.
fn secret_name(key: &str, value: &str) -> Result<String, String> {
    let name = value.trim();
    let valid = name.len() <= MAX_SECRET_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|first| first.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'));
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "label {key} is {value:?}, not a Docker secret name"
        ))
    }
}

/// The service's first host that is not a wildcard, else its first wildcard's parent domain.
fn backend_server_name(hosts: &[String]) -> Result<String, String> {
    let host = hosts
        .iter()
        .find(|host| !host.starts_with("*."))
        .or(hosts.first())
        .map_or("", |host| host.trim_start_matches("*."));
    match rustls_pki_types::DnsName::try_from(host) {
        Ok(_) => Ok(host.to_owned()),
        Err(_) => Err(format!(
            "label {LABEL_SSL_BACKEND}=true needs a host usable as TLS server name, not {host:?}"
        )),
    }
}

/// A boolean label, absent meaning `false`, spelled as the routing labels are.
fn boolean(key: &str, value: Option<&str>) -> Result<bool, String> {
    value.map_or(Ok(false), |value| super::parse_bool(key, value))
}

fn websocket_paths(value: &str) -> Result<Vec<String>, String> {
    let mut paths = Vec::new();
    for path in value
        .split(',')
        .map(str::trim)
        .filter(|path| !path.is_empty())
    {
        let valid = path.starts_with('/') && path.bytes().all(|byte| byte.is_ascii_graphic());
        if !valid {
            return Err(format!(
                "label {LABEL_WEBSOCKET_ENDPOINTS} holds {path:?}, not a path starting with /"
            ));
        }
        paths.push(path.to_owned());
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parsed(labels: &[(&str, &str)]) -> Result<Transport, String> {
        let labels: HashMap<&str, &str> = labels.iter().copied().collect();
        let hosts = ["*.example.org".to_owned(), "app.example.org".to_owned()];
        parse(|key| labels.get(key).copied(), &hosts)
    }

    #[test]
    fn no_labels_mean_plain_http_to_the_tasks() {
        assert_eq!(parsed(&[]).unwrap(), Transport::default());
    }

    #[test]
    fn every_label_is_read() {
        let transport = parsed(&[
            (LABEL_SSL_CERT, "app.cert"),
            (LABEL_SSL_KEY, " app_key-v2 "),
            (LABEL_SSL_PASSTHROUGH, "False"),
            (LABEL_SSL_BACKEND, "true"),
            (LABEL_SSL_BACKEND_TLS_VERIFY, "Required"),
            (LABEL_WEBSOCKET_ENDPOINTS, "/ws, /live/feed,/ws"),
        ])
        .unwrap();
        assert_eq!(
            transport,
            Transport {
                certificate: Some(CertificateSecrets {
                    cert: "app.cert".into(),
                    key: "app_key-v2".into()
                }),
                ssl_passthrough: false,
                backend_tls: Some(BackendTls {
                    verify: BackendTlsVerify::Required,
                    server_name: "app.example.org".into()
                }),
                websocket_endpoints: vec!["/live/feed".into(), "/ws".into()],
            }
        );
        assert!(
            parsed(&[(LABEL_SSL_PASSTHROUGH, "true")])
                .unwrap()
                .ssl_passthrough
        );
        let unverified = parsed(&[(LABEL_SSL_BACKEND, "TRUE")]).unwrap();
        assert_eq!(
            unverified.backend_tls.unwrap().verify,
            BackendTlsVerify::None
        );
    }

    #[test]
    fn bad_values_are_reasons() {
        let cases = [
            (
                vec![(LABEL_SSL_CERT, "c")],
                "label com.docker.lb.ssl_cert is set without com.docker.lb.ssl_key",
            ),
            (
                vec![(LABEL_SSL_KEY, "k")],
                "label com.docker.lb.ssl_key is set without com.docker.lb.ssl_cert",
            ),
            (
                vec![(LABEL_SSL_CERT, "../../etc/shadow"), (LABEL_SSL_KEY, "k")],
                "label com.docker.lb.ssl_cert is \"../../etc/shadow\", not a Docker secret name",
            ),
            (
                vec![(LABEL_SSL_CERT, "c"), (LABEL_SSL_KEY, ".hidden")],
                "label com.docker.lb.ssl_key is \".hidden\", not a Docker secret name",
            ),
            (
                vec![(LABEL_SSL_PASSTHROUGH, "yes")],
                "label com.docker.lb.ssl_passthrough is \"yes\", not true or false",
            ),
            (
                vec![(LABEL_SSL_BACKEND, "true"), (LABEL_SSL_BACKEND_TLS_VERIFY, "strict")],
                "label com.docker.lb.ssl_backend_tls_verify is \"strict\", not \"none\" or \"required\"",
            ),
            (
                vec![(LABEL_WEBSOCKET_ENDPOINTS, "/ok,ws")],
                "label com.docker.lb.websocket_endpoints holds \"ws\", not a path starting with /",
            ),
        ];
        for (labels, reason) in cases {
            assert_eq!(parsed(&labels).unwrap_err(), reason);
        }
        let labels: HashMap<&str, &str> = HashMap::from([(LABEL_SSL_BACKEND, "true")]);
        let bad_hosts = ["a..b".to_owned()];
        assert_eq!(
            parse(|key| labels.get(key).copied(), &bad_hosts).unwrap_err(),
            "label com.docker.lb.ssl_backend=true needs a host usable as TLS server name, not \"a..b\""
        );
        let long_name = "s".repeat(65);
        assert!(parsed(&[(LABEL_SSL_CERT, &long_name), (LABEL_SSL_KEY, "k")]).is_err());
    }
}
