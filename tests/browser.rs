//! The live page in a real browser: headless Chromium driven over the
//! DevTools protocol (a WebSocket) against the real binary. The page loads
//! without console errors, a consumer parked by the test shows up within
//! 3 s and goes when it is served, and a screenshot is saved under
//! `target/browser/` for people to look at.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use crate::support::*;

/// Where Chromium is, if anywhere.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Headless Chromium, killed when dropped.
struct Browser {
    child: Child,
    port: u16,
    profile: std::path::PathBuf,
}

impl Browser {
    /// Starts `binary` with a fresh profile and the DevTools port it picks.
    fn start(binary: &str) -> Browser {
        let profile = temp_dir("chromium-profile");
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--window-size=1100,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    let port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(*STEP)
            .ok()
            .flatten()
            .expect("chromium printed its DevTools address");
        Browser {
            child,
            port,
            profile,
        }
    }

    /// A new tab, as a DevTools session on its own WebSocket.
    fn new_tab(&self) -> Tab {
        let mut http = connect(([127, 0, 0, 1], self.port).into());
        send(
            &mut http,
            b"PUT /json/new?about:blank HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        let reply = read_response(&mut http).expect("DevTools reply");
        let target: Value = serde_json::from_slice(&reply.body).expect("target JSON");
        let url = target["webSocketDebuggerUrl"]
            .as_str()
            .expect("a debugger URL")
            .to_owned();
        let stream = connect(([127, 0, 0, 1], self.port).into());
        let (socket, _) = tungstenite::client(url.as_str(), stream).expect("DevTools WebSocket");
        Tab {
            socket,
            next_id: 1,
            problems: Vec::new(),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One tab: commands, and the console errors and exceptions seen so far.
struct Tab {
    socket: WebSocket<TcpStream>,
    next_id: u64,
    problems: Vec<String>,
}

impl Tab {
    /// Sends `method` and returns its result, noting events on the way.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(command.to_string()))
            .expect("send a DevTools command");
        let deadline = Instant::now() + *STEP;
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let message = self.socket.read().expect("read from DevTools");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let value: Value = serde_json::from_str(text).expect("DevTools JSON");
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
            self.note(&value);
        }
    }

    /// Keeps console errors, exceptions and failed loads.
    fn note(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                self.problems
                    .push(format!("exception: {}", params["exceptionDetails"]));
            }
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                self.problems
                    .push(format!("console.error: {}", params["args"]));
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                self.problems.push(format!("log: {}", params["entry"]));
            }
            _ => {}
        }
    }

    /// The value of a JavaScript expression.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        result["result"]["value"].clone()
    }

    /// Waits up to `limit` for `expression` to be true; how long it took.
    fn wait_for(&mut self, expression: &str, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.eval(expression) == Value::Bool(true) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

#[test]
fn the_live_page_in_a_real_browser() {
    let Some(binary) = chromium() else {
        eprintln!(
            "\n*** SKIP the_live_page_in_a_real_browser: no Chromium found (Debian package chromium; .ci/run installs it) ***\n"
        );
        return;
    };
    let server = Server::start_with(&["--list-channels"]);
    let browser = Browser::start(binary);
    let mut tab = browser.new_tab();
    tab.call("Runtime.enable", json!({}));
    tab.call("Log.enable", json!({}));
    tab.call("Page.enable", json!({}));
    tab.call("Page.navigate", json!({"url": server.url("/")}));
    // The script took over once it says so.
    let live = "document.getElementById('state').textContent === 'Live.'";
    assert!(
        tab.wait_for(live, *STEP).is_some(),
        "the page never went live: {:?}",
        tab.eval("document.body.innerText")
    );
    // A consumer parked now appears on the page within 3 s.
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/browser/test-channel"));
    server.wait_parked(1);
    let shown = "document.getElementById('channels').textContent.includes('/browser/test-channel')";
    let limit = patience(Duration::from_secs(3));
    let took = tab.wait_for(shown, limit);
    assert!(
        took.is_some(),
        "the parked consumer did not appear within {limit:?}: {:?}",
        tab.eval("document.getElementById('channels').textContent")
    );
    assert_eq!(
        tab.eval("document.getElementById('waiters').textContent"),
        Value::String("1".into())
    );
    let screenshot = tab.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(screenshot["data"].as_str().expect("screenshot data"))
        .expect("base64");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("page.png"), &png).unwrap();
    // Served, it goes.
    assert_eq!(
        request(server.addr, &post("/browser/test-channel", b"hi")).status,
        200
    );
    assert_eq!(read_response(&mut consumer).unwrap().body, b"hi");
    let gone = "!document.getElementById('channels').textContent.includes('/browser/test-channel')";
    assert!(
        tab.wait_for(gone, limit).is_some(),
        "the served consumer stayed on the page"
    );
    // The relayed count moved with it.
    let counted = "document.getElementById('pairs').textContent === '1'";
    assert!(tab.wait_for(counted, limit).is_some());
    // Let the page poll a few more times, then look at what it logged.
    std::thread::sleep(Duration::from_millis(1200));
    tab.eval("1");
    assert!(tab.problems.is_empty(), "console: {:#?}", tab.problems);
    let _ = tab.socket.close(None);
    let _ = tab.socket.flush();
}
