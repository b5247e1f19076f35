//! Requests that arrived over HTTP/2, made fit for the HTTP/1.1 upstream: `:authority` becomes
//! the `Host` header, and `cookie` fields split by the client are joined again (RFC 9113
//! §8.2.3), so a task sees the same request whichever protocol the client spoke.

use http::{header, request::Parts, HeaderValue, Version};

pub fn adapt_for_http1(parts: &mut Parts) {
    if parts.version != Version::HTTP_2 {
        return;
    }
    if !parts.headers.contains_key(header::HOST) {
        let host = parts
            .uri
            .authority()
            .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok());
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
    }
    if parts.headers.get_all(header::COOKIE).iter().count() > 1 {
        let joined = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect::<Vec<_>>()
            .join(&b"; "[..]);
        if let Ok(joined) = HeaderValue::from_bytes(&joined) {
            parts.headers.insert(header::COOKIE, joined);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::Request;
    use tokio::process::Command;

    use super::*;
    use crate::{
        proxy::{
            test_support::EchoBackend,
            tls_test_support::{route, TempDir, TestCa, TlsProxy},
        },
        routes::{CertificateSecrets, Transport},
    };

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    #[test]
    fn authority_becomes_host_and_cookies_are_joined() {
        let mut h2 = parts(
            Request::get("https://app.example.org:8443/x")
                .version(Version::HTTP_2)
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(())
                .unwrap(),
        );
        adapt_for_http1(&mut h2);
        assert_eq!(h2.headers["host"], "app.example.org:8443");
        let cookies: Vec<_> = h2.headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
    }

    #[test]
    fn http1_requests_are_left_alone() {
        let mut h1 = parts(
            Request::get("/x")
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(())
                .unwrap(),
        );
        adapt_for_http1(&mut h1);
        assert!(!h1.headers.contains_key("host"));
        assert_eq!(h1.headers.get_all("cookie").iter().count(), 2);
    }

    const HOST: &str = "h2.example.org";

    /// The proxy on both ports, serving [`HOST`] with a certificate from `ca`.
    async fn h2_proxy(ca: &TestCa, secrets: &TempDir, backend: &EchoBackend) -> TlsProxy {
        secrets.write_pair("h2", &ca.issue(&[HOST]));
        let transport = Transport {
            certificate: Some(CertificateSecrets {
                cert: "h2.crt".into(),
                key: "h2.key".into(),
            }),
            ..Transport::default()
        };
        let routes = BTreeMap::from([(HOST.to_owned(), route("h2", &[backend.addr], transport))]);
        TlsProxy::start(routes, secrets.path()).await
    }

    /// Runs curl; returns the response head's lines and the body.
    async fn curl(args: &[&str]) -> (Vec<String>, serde_json::Value) {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-D", "-"])
            .args(args)
            .output()
            .await
            .expect("curl runs");
        assert!(
            output.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let lines = head.lines().map(str::to_owned).collect();
        (lines, serde_json::from_str(body).unwrap())
    }

    fn header_names(head: &[String]) -> Vec<String> {
        let mut names: Vec<String> = head[1..]
            .iter()
            .filter_map(|line| line.split_once(':'))
            .map(|(name, _)| name.to_ascii_lowercase())
            .filter(|name| name != "date")
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn curl_http2_over_tls_and_h2c_prior_knowledge_get_the_same_headers() {
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let ca_file = secrets.write("ca.pem", &ca.pem());
        let backend = EchoBackend::start().await;
        let proxy = h2_proxy(&ca, &secrets, &backend).await;

        let https = format!("{HOST}:{}", proxy.https.port());
        let (tls_head, tls_echo) = curl(&[
            "--http2",
            "--cacert",
            ca_file.to_str().unwrap(),
            "--resolve",
            &format!("{https}:127.0.0.1"),
            "-H",
            "cookie: a=1",
            &format!("https://{https}/h2?over=tls"),
        ])
        .await;
        let http = format!("{HOST}:{}", proxy.http.port());
        let (h2c_head, h2c_echo) = curl(&[
            "--http2-prior-knowledge",
            "--resolve",
            &format!("{http}:127.0.0.1"),
            "-H",
            "cookie: a=1",
            &format!("http://{http}/h2?over=h2c"),
        ])
        .await;

        assert_eq!(tls_head[0].trim(), "HTTP/2 200");
        assert_eq!(h2c_head[0].trim(), "HTTP/2 200");
        assert_eq!(header_names(&tls_head), header_names(&h2c_head));
        for name in [
            "x-request-id",
            "x-proxy-id",
            "x-server-info",
            "x-upstream-addr",
            "x-upstream-response-time",
        ] {
            assert!(
                header_names(&tls_head).iter().any(|n| n == name),
                "{name}: {tls_head:?}"
            );
        }
        assert_eq!(tls_echo["host"], https);
        assert_eq!(h2c_echo["host"], http);
        assert_eq!(tls_echo["path"], "/h2?over=tls");
        assert_eq!(h2c_echo["path"], "/h2?over=h2c");
        assert_eq!(tls_echo["header_names"], h2c_echo["header_names"]);
        assert_eq!(tls_echo["real_ip"], "127.0.0.1");
    }

    /// Runs h2load; returns (succeeded requests, 2xx responses, its whole report).
    async fn h2load(
        url: &str,
        connect_to: std::net::SocketAddr,
        requests: usize,
    ) -> (usize, usize, String) {
        let output = Command::new("h2load")
            .args([
                "-n",
                &requests.to_string(),
                "-c",
                "4",
                "-m",
                "8",
                "-T",
                "10",
            ])
            .arg(format!("--connect-to={connect_to}"))
            .arg(url)
            .output()
            .await
            .expect("h2load runs (Debian package nghttp2-client)");
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        let count_before = |line_start: &str, word: &str| -> usize {
            let line = report
                .lines()
                .find(|line| line.starts_with(line_start))
                .unwrap_or_else(|| panic!("no {line_start:?} in h2load's report:\n{report}"));
            let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            let at = words.iter().position(|w| *w == word).unwrap();
            words[at - 1].parse().unwrap()
        };
        let succeeded = count_before("requests:", "succeeded");
        let ok = count_before("status codes:", "2xx");
        (succeeded, ok, report)
    }

    #[tokio::test]
    async fn h2load_over_tls_and_h2c_gets_only_2xx() {
        const REQUESTS: usize = 400;
        let ca = TestCa::new();
        let secrets = TempDir::create("secrets");
        let backend = EchoBackend::start().await;
        let proxy = h2_proxy(&ca, &secrets, &backend).await;

        let tls_url = format!("https://{HOST}:{}/load", proxy.https.port());
        let (succeeded, ok, report) = h2load(&tls_url, proxy.https, REQUESTS).await;
        assert!(report.contains("Application protocol: h2"), "{report}");
        assert_eq!((succeeded, ok), (REQUESTS, REQUESTS), "{report}");

        let h2c_url = format!("http://{HOST}:{}/load", proxy.http.port());
        let (succeeded, ok, report) = h2load(&h2c_url, proxy.http, REQUESTS).await;
        assert!(report.contains("Application protocol: h2c"), "{report}");
        assert_eq!((succeeded, ok), (REQUESTS, REQUESTS), "{report}");
    }
}
