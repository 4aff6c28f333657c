//! Shared machinery for the end-to-end tests: the real `flotilla` binary, real service
//! processes, ephemeral ports only.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn flotilla() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    command.env("NO_COLOR", "1").env_remove("FLOTILLA_CONTROL");
    command
}

/// Runs `flotilla ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    flotilla().args(args).output().expect("run flotilla")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A small Python service for fleets under test: answers `/healthz` and echoes what it sees.
/// `MODE=crash` exits at once; `MODE=unhealthy` serves 503 on `/healthz`;
/// `MODE=stubborn` ignores SIGTERM.
pub const ECHO_SERVICE: &str = r#"
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode = os.environ.get("MODE", "")
print(f"{os.environ['FLOTILLA_INSTANCE']} starting in mode '{mode}'", flush=True)
if mode == "crash":
    print("giving up at once", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/healthz":
            status = 503 if mode == "unhealthy" else 200
            body = b'{"status":"ok"}'
        else:
            status = 200
            body = json.dumps({
                "service": os.environ["FLOTILLA_SERVICE"],
                "instance": os.environ["FLOTILLA_INSTANCE"],
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "proxy": os.environ.get("HTTP_PROXY"),
                "data_dir": os.environ.get("FLOTILLA_DATA_DIR"),
            }).encode()
            # Names its trace, as services should, so `flotilla logs --trace` finds the line.
            trace = self.headers.get("traceparent")
            print(f"GET {self.path} {status}" + (f" traceparent={trace}" if trace else ""), flush=True)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
if mode != "stubborn":
    # shutdown() waits for serve_forever() to return, so it must not run on the serving thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
print("stopped", flush=True)
"#;

/// A temporary app directory holding `flotilla.toml` and `echo.py`.
pub struct App {
    pub dir: tempfile::TempDir,
}

impl App {
    pub fn new(manifest: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("flotilla.toml"), manifest).expect("write manifest");
        std::fs::write(dir.path().join("echo.py"), ECHO_SERVICE).expect("write echo.py");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 temp path")
    }
}

/// A `flotilla up` in the foreground, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Fleet {
    pub child: Child,
    pub dir: PathBuf,
    pub control: String,
    pub gateway: String,
    pub log: PathBuf,
}

impl Fleet {
    /// Starts `flotilla up DIR` on free ports and waits until its control API answers.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(dir, extra, &[])
    }

    /// [`Fleet::start`] with extra environment variables for `flotilla up`.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let log = dir.join("up.log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = flotilla()
            .arg("up")
            .arg(dir)
            .args([
                "--gateway-listen",
                "127.0.0.1:0",
                "--control-listen",
                "127.0.0.1:0",
                "--otlp-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn flotilla up");
        let fleet_file = dir.join(".flotilla/fleet.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut fleet = Self {
            child,
            dir: dir.to_owned(),
            control: String::new(),
            gateway: String::new(),
            log,
        };
        loop {
            if let Ok(text) = std::fs::read_to_string(&fleet_file)
                && let Ok(file) = serde_json::from_str::<Value>(&text)
                && file["pid"].as_u64() == Some(u64::from(fleet.child.id()))
            {
                fleet.control = file["control"].as_str().expect("control").to_owned();
                fleet.gateway = file["gateway"].as_str().expect("gateway").to_owned();
                return fleet;
            }
            if let Ok(Some(status)) = fleet.child.try_wait() {
                panic!("flotilla up exited early ({status}):\n{}", fleet.output());
            }
            assert!(
                Instant::now() < deadline,
                "flotilla up never wrote its fleet file:\n{}",
                fleet.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What `up` printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn phase(&self) -> String {
        get_json(&format!("{}/v1/app", self.control))
            .map(|app| app["phase"]["state"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    }

    /// Waits for the phase to become `want` (panicking with the output otherwise).
    pub fn wait_phase(&self, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.phase() != want {
            assert!(
                Instant::now() < deadline,
                "phase never became {want}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn instances(&self) -> Vec<Value> {
        let services = get_json(&format!("{}/v1/services", self.control)).expect("services");
        services
            .as_array()
            .expect("array")
            .iter()
            .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    pub fn signal(&self, signal: i32) {
        send_signal(self.child.id(), signal);
    }

    /// Waits for `up` to exit and returns its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "flotilla up did not exit:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn send_signal(pid: u32, signal: i32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers and has no memory effects.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

pub fn alive(pid: u32) -> bool {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with signal 0 only checks for existence.
    let result = unsafe { libc::kill(pid as i32, 0) };
    if result != 0 {
        return false;
    }
    // A zombie awaiting its reaper no longer runs anything.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .trim_start()
        .starts_with('Z')
}

pub fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

pub fn get(url: &str) -> reqwest::blocking::Response {
    client()
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

pub fn get_json(url: &str) -> Option<Value> {
    client().get(url).send().ok()?.json().ok()
}

pub fn post_json(url: &str, body: &Value) -> reqwest::blocking::Response {
    client()
        .post(url)
        .json(body)
        .send()
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

pub fn post_raw(url: &str, body: &str) -> reqwest::blocking::Response {
    client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

pub fn put_raw(url: &str, body: &str) -> reqwest::blocking::Response {
    client()
        .put(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"))
}

pub fn delete(url: &str) -> reqwest::blocking::Response {
    client()
        .delete(url)
        .send()
        .unwrap_or_else(|e| panic!("DELETE {url}: {e}"))
}
