//! Finding a running fleet and talking to its control API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// Written by `up` to `DIR/.flotilla/fleet.json` once it listens, removed when it stops, so the
/// other commands find the fleet of a directory without being told its addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetFile {
    pub app: String,
    pub pid: u32,
    pub control: String,
    pub gateway: String,
    /// The OTLP/HTTP receiver, when one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<String>,
}

pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join(".flotilla")
}

pub fn fleet_file_path(dir: &Path) -> PathBuf {
    state_dir(dir).join("fleet.json")
}

/// The fleet running for `dir`, if its process is still alive.
pub fn running_fleet(dir: &Path) -> Option<FleetFile> {
    let text = std::fs::read_to_string(fleet_file_path(dir)).ok()?;
    let fleet: FleetFile = serde_json::from_str(&text).ok()?;
    process_alive(fleet.pid).then_some(fleet)
}

pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks for existence without signalling.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with signal 0 has no side effects and takes plain integers.
    let result = unsafe { libc::kill(pid, 0) };
    let exists = result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

/// A process that has exited but not yet been reaped by its parent runs nothing any more.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            let after_name = stat.rsplit_once(')')?.1;
            after_name
                .split_whitespace()
                .next()
                .map(|state| state == "Z")
        })
        .unwrap_or(false)
}

/// A client for one fleet's control API.
pub struct Control {
    base: String,
    http: reqwest::Client,
}

impl Control {
    pub fn new(base: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            // The control API is on loopback; a user's HTTP_PROXY must not capture it.
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// The control API of the fleet for `dir`, or the explicit `--control` URL.
    pub fn locate(dir: &Path, explicit: Option<&str>) -> Result<Self> {
        if let Some(url) = explicit {
            return Self::new(url);
        }
        match running_fleet(dir) {
            Some(fleet) => Self::new(&fleet.control),
            None => bail!(
                "no fleet is running for {}\n  help: start one with `flotilla up {} -d`, or pass --control URL",
                dir.display(),
                dir.display()
            ),
        }
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(path, self.http.get(self.url(path))).await
    }

    /// Sends `body` as JSON and reads the JSON answer.
    pub async fn put<B, T>(&self, path: &str, body: &B) -> Result<T>
    where
        B: Serialize + ?Sized,
        T: serde::de::DeserializeOwned,
    {
        self.json(path, self.http.put(self.url(path)).json(body))
            .await
    }

    /// Sends `body` with `content_type` and reads the JSON answer.
    pub async fn post_body<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<T> {
        self.post_with_headers(path, content_type, body, None).await
    }

    /// Like [`Control::post_body`], with one extra header when given.
    pub async fn post_with_headers<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        header: Option<(&str, &str)>,
    ) -> Result<T> {
        let mut request = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body);
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        self.json(path, request).await
    }

    pub async fn post(&self, path: &str) -> Result<()> {
        self.send(self.http.post(self.url(path))).await?;
        Ok(())
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.http.delete(self.url(path))).await?;
        Ok(())
    }

    /// A streaming GET, for following logs.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T> {
        self.send(request)
            .await?
            .json()
            .await
            .with_context(|| format!("unexpected answer from {}", self.url(path)))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the control API at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        // A problem's detail is written for the user and names what was wrong; the status code
        // would only repeat it. Anything else is shown with its status, as a clue.
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|problem| {
                problem
                    .get("detail")
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
            });
        match detail {
            Some(detail) => Err(anyhow!("{detail}")),
            None => Err(anyhow!("{status}: {body}")),
        }
    }
}

/// Percent-encodes a query value or a path segment (a service name as the user typed it).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
