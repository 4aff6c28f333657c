//! Starting services as child processes, and small HTTP helpers.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode, header};
use serde_json::Value;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running service. Dropping it kills the process, so nothing outlives a failed test.
pub struct Service {
    name: &'static str,
    port: u16,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts `name` as the platform would (`PORT`, `FLOTILLA_*`), with no proxy, plus `env`,
    /// and waits until `/healthz` answers 200.
    pub async fn start(name: &'static str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mut command = command_for(name);
        command
            .env("PORT", port.to_string())
            .env("FLOTILLA_SERVICE", name)
            .env("FLOTILLA_INSTANCE", format!("{name}-1"))
            .env("FLOTILLA_VERSION", "0.0.0-test")
            .env("FLOTILLA_DATA_DIR", data_dir)
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env("NO_PROXY", "*")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        let stdout = collect_lines(child.stdout.take().expect("piped stdout"));
        let stderr = collect_lines(child.stderr.take().expect("piped stderr"));
        let mut service = Self {
            name,
            port,
            child,
            stdout,
            stderr,
        };
        service.wait_healthy().await;
        service
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lines").clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lines").clone()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.name);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_healthy(&mut self) {
        let client = client();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for child") {
                // Let the reader threads catch the last lines before showing them.
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "{} exited during start-up: {status}\n{}",
                    self.name,
                    self.output()
                );
            }
            if let Ok(response) = client.get(self.url("/healthz")).send().await {
                if response.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} was not healthy within {STARTUP_TIMEOUT:?}\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn output(&self) -> String {
        let stdout = self.stdout.lock().map(|l| l.join("\n")).unwrap_or_default();
        let stderr = self.stderr.lock().map(|l| l.join("\n")).unwrap_or_default();
        format!("--- stdout\n{stdout}\n--- stderr\n{stderr}")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command_for(name: &str) -> Command {
    let binary = match name {
        "catalog" => {
            let mut command = Command::new("python3");
            command
                .arg("catalog/catalog.py")
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            return command;
        }
        "inventory" => env!("CARGO_BIN_EXE_inventory"),
        "payments" => env!("CARGO_BIN_EXE_payments"),
        "shipping" => env!("CARGO_BIN_EXE_shipping"),
        "orders" => env!("CARGO_BIN_EXE_orders"),
        other => panic!("no service called {other}"),
    };
    Command::new(binary)
}

fn collect_lines(stream: impl Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().expect("log lines").push(line);
        }
    });
    lines
}

/// A port nobody listens on right now. Another process could take it before the service binds
/// it, but the kernel hands out ephemeral ports in a way that makes that vanishingly rare.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temporary data directory")
}

/// A client that talks to the services directly, whatever proxy the environment names.
pub fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build HTTP client")
}

/// The status and JSON body of a response.
pub async fn json(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.json().await.expect("a JSON body");
    (status, body)
}

/// Asserts that `response` is an RFC 7807 problem with `status`, and returns its detail.
pub async fn problem(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status, "status of {}", response.url());
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("a problem body");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["type"].is_string(), "{body}");
    assert!(body["title"].is_string(), "{body}");
    body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("problem without detail: {body}"))
        .to_owned()
}

/// POSTs a raw body as JSON, so that tests can send malformed JSON too.
pub async fn post_raw(client: &Client, url: String, body: &'static str) -> Response {
    client
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .expect("POST")
}
