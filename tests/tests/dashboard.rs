//! The dashboard at `/` on the admin address, loaded in headless Chromium (Debian's
//! `chromium`) in the client's namespace against the seed scenario's running xlb: it shows the
//! seed's route with its endpoint, and its counters move in place as traffic flows, without a
//! reload. The page is read through the DevTools protocol (`Runtime.evaluate`).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use xlb_testbed::{
    in_netns,
    seed::{xlb_binary, SeedScenario, ADMIN_PORT, HOST},
    wait_until, Process, ScratchDir,
};

const CHROMIUM: &str = "/usr/bin/chromium";
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

fn seed_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config.toml")
}

/// Headless Chromium with a DevTools endpoint on an ephemeral port of the client namespace's
/// loopback, its profile in a fresh directory; stopped by its PID when dropped.
struct Browser {
    _process: Process,
    profile: ScratchDir,
}

impl Browser {
    fn open(scenario: &SeedScenario, url: &str) -> Result<Browser> {
        let profile = ScratchDir::create("chromium")?;
        let mut command = scenario.topology.client.command(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Process::spawn(command)?;
        Ok(Browser {
            _process: process,
            profile,
        })
    }

    /// The DevTools port, which Chromium writes to its profile once it listens.
    fn devtools_port(&self) -> Result<u16> {
        let file = self.profile.path().join("DevToolsActivePort");
        wait_until("Chromium's DevTools port", PAGE_TIMEOUT, || {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            Ok(text.lines().next().and_then(|port| port.parse().ok()))
        })
    }

    /// `expression`'s value in the page, evaluated through the DevTools protocol (from inside
    /// the client namespace, where the endpoint listens).
    fn evaluate(&self, scenario: &SeedScenario, expression: &str) -> Result<Value> {
        let port = self.devtools_port()?;
        in_netns(&scenario.topology.client, || {
            evaluate_in_page(port, expression)
        })?
    }
}

/// GET `/json/list` of the DevTools endpoint: the page's WebSocket URL. (Its server keeps the
/// connection open whatever the request says, so the body is read by its length.)
fn page_websocket(port: u16) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let body = loop {
        let read = stream.read(&mut buf)?;
        if read == 0 {
            bail!("DevTools closed the connection before answering /json/list");
        }
        received.extend_from_slice(&buf[..read]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(&received)? {
            let length: usize = response
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case("content-length"))
                .and_then(|header| std::str::from_utf8(header.value).ok()?.parse().ok())
                .context("no Content-Length in DevTools' answer")?;
            if received.len() >= head + length {
                break received[head..head + length].to_vec();
            }
        }
    };
    let targets: Vec<Value> = serde_json::from_slice(&body)?;
    targets
        .iter()
        .find(|target| target["type"] == "page")
        .and_then(|target| target["webSocketDebuggerUrl"].as_str())
        .map(str::to_owned)
        .context("no page target in DevTools' /json/list")
}

fn evaluate_in_page(port: u16, expression: &str) -> Result<Value> {
    let (mut socket, _) = tungstenite::connect(page_websocket(port)?)?;
    let call = json!({
        "id": 1,
        "method": "Runtime.evaluate",
        "params": { "expression": expression, "returnByValue": true },
    });
    socket.send(tungstenite::Message::text(call.to_string()))?;
    loop {
        let message = socket.read()?;
        let Ok(text) = message.to_text() else {
            continue;
        };
        let answer: Value = serde_json::from_str(text)?;
        if answer["id"] == 1 {
            if let Some(exception) = answer["result"].get("exceptionDetails") {
                bail!("{expression} threw: {exception}");
            }
            return Ok(answer["result"]["result"]["value"].clone());
        }
    }
}

/// A number the page shows in the element with id `id`, once it shows one.
fn shown_number(browser: &Browser, scenario: &SeedScenario, id: &str) -> Result<u64> {
    let expression = format!("document.getElementById('{id}').textContent");
    wait_until(&format!("#{id} to show a number"), PAGE_TIMEOUT, || {
        let shown = browser.evaluate(scenario, &expression)?;
        Ok(shown.as_str().and_then(|text| text.parse().ok()))
    })
}

#[test]
fn the_dashboard_shows_the_routes_and_its_counters_move_in_place() {
    let scenario = SeedScenario::start(&xlb_binary(), &seed_config()).expect("seed scenario up");
    let endpoints = scenario.routed_endpoints().unwrap();
    let url = format!("http://{}:{ADMIN_PORT}/", scenario.lb_addr());
    let browser = Browser::open(&scenario, &url).unwrap();

    // The seed's route, with its one task's endpoint.
    let route_row =
        format!("document.querySelector('#routes tr[data-host=\"{HOST}\"]')?.textContent ?? ''");
    let row = wait_until(
        "the dashboard to show the seed's route",
        PAGE_TIMEOUT,
        || {
            let row = browser.evaluate(&scenario, &route_row)?;
            let row = row.as_str().unwrap_or_default().to_owned();
            Ok((!row.is_empty()).then_some(row))
        },
    )
    .unwrap_or_else(|error| panic!("{error:#}\n{}", scenario.xlb_log()));
    assert!(row.contains("demo"), "{row}");
    for endpoint in &endpoints {
        assert!(
            row.contains(&endpoint.to_string()),
            "{endpoint} not in {row}"
        );
    }

    // Traffic moves the XDP counter on the page that stays open.
    let seen = shown_number(&browser, &scenario, "xdp-received").unwrap();
    for _ in 0..5 {
        assert_eq!(scenario.get(HOST, "/ping").unwrap().status, 200);
    }
    wait_until("the XDP counter to move on the page", PAGE_TIMEOUT, || {
        let now = shown_number(&browser, &scenario, "xdp-received")?;
        Ok((now > seen).then_some(()))
    })
    .unwrap();
    let requests = format!(
        "document.querySelector('#routes tr[data-host=\"{HOST}\"] td:nth-child(5)').textContent"
    );
    wait_until(
        "the route's request count to show the requests",
        PAGE_TIMEOUT,
        || {
            let count = browser.evaluate(&scenario, &requests)?;
            let count: u64 = count.as_str().and_then(|c| c.parse().ok()).unwrap_or(0);
            Ok((count >= 5).then_some(()))
        },
    )
    .unwrap();
}
