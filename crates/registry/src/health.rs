//! Active HTTP health checks.
//!
//! An instance turns healthy after `healthy_threshold` consecutive 2xx answers and unhealthy after
//! `unhealthy_threshold` consecutive failures (non-2xx, refused, or no answer within `timeout`).
//! Until its first verdict it is probed every [`STARTUP_PROBE_INTERVAL`] instead of every
//! `interval`, so a fleet comes up as fast as its slowest service starts, not a whole interval later.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use flotilla_manifest::HealthSettings;
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::{Health, Registry};

/// How often an instance is probed before its first verdict.
pub const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Probes instances over HTTP. Cloning shares the connection pool.
#[derive(Clone)]
pub struct HealthChecker {
    client: Client<HttpConnector, Empty<Bytes>>,
    registry: Registry,
}

impl HealthChecker {
    pub fn new(registry: Registry) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // Keep-alive across probes would hide an instance that stopped accepting connections.
            .pool_max_idle_per_host(0)
            .build(connector);
        Self { client, registry }
    }

    /// Probes once: `Ok` on a 2xx answer within the timeout, `Err(reason)` otherwise.
    pub async fn probe(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let uri: http::Uri = format!("http://{addr}{path}")
            .parse()
            .map_err(|e| format!("bad health URI: {e}"))?;
        let request = http::Request::get(uri)
            .header(http::header::USER_AGENT, "flotilla-health/1")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
            Ok(Err(e)) => Err(connect_reason(&e)),
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("{path} answered {}", response.status())),
        }
    }

    /// Probes one instance until `stop` is cancelled, recording each verdict in the registry.
    pub async fn watch_instance(
        &self,
        service: &str,
        instance: &str,
        addr: SocketAddr,
        settings: &HealthSettings,
        stop: CancellationToken,
    ) {
        let mut successes = 0u32;
        let mut failures = 0u32;
        let mut current = Health::Unknown;
        loop {
            let wait = if current == Health::Unknown {
                STARTUP_PROBE_INTERVAL.min(settings.interval)
            } else {
                settings.interval
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let verdict = tokio::select! {
                () = stop.cancelled() => return,
                verdict = self.probe(addr, &settings.path, settings.timeout) => verdict,
            };
            let (next, error) = match verdict {
                Ok(()) => {
                    successes += 1;
                    failures = 0;
                    let next = if successes >= settings.healthy_threshold.get() {
                        Health::Healthy
                    } else {
                        current
                    };
                    (next, None)
                }
                Err(reason) => {
                    failures += 1;
                    successes = 0;
                    let next = if failures >= settings.unhealthy_threshold.get() {
                        Health::Unhealthy
                    } else {
                        current
                    };
                    (next, Some(reason))
                }
            };
            match self
                .registry
                .set_health(service, instance, next, error.clone())
            {
                None => return, // deregistered: nobody wants this verdict any more
                Some(previous) if previous != next => match next {
                    Health::Healthy => tracing::info!(%service, %instance, "instance is healthy"),
                    _ => tracing::warn!(
                        %service, %instance, reason = error.as_deref().unwrap_or(""),
                        "instance is {next}"
                    ),
                },
                Some(_) => {}
            }
            current = next;
        }
    }
}

fn connect_reason(error: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    let mut last = error.to_string();
    while let Some(e) = source {
        last = e.to_string();
        source = e.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP/1.1 server answering every request with the status held in `status`.
    async fn server(status: Arc<AtomicU16>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let status = status.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn settings() -> HealthSettings {
        HealthSettings {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            unhealthy_threshold: NonZeroU32::new(2).expect("non-zero"),
            ..HealthSettings::default()
        }
    }

    async fn wait_for(registry: &Registry, want: Health) {
        let mut changes = registry.subscribe();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if registry.instance("svc", "svc-1").map(|i| i.health) == Some(want) {
                    return;
                }
                changes.changed().await.expect("registry alive");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never became {want}"));
    }

    #[tokio::test]
    async fn health_follows_the_answers() {
        let status = Arc::new(AtomicU16::new(200));
        let addr = server(status.clone()).await;
        let registry = Registry::new();
        registry.register("svc", "svc-1", addr, "1");
        let checker = HealthChecker::new(registry.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                checker
                    .watch_instance("svc", "svc-1", addr, &settings(), stop)
                    .await
            }
        });

        wait_for(&registry, Health::Healthy).await;
        status.store(503, Ordering::SeqCst);
        wait_for(&registry, Health::Unhealthy).await;
        let info = registry.instance("svc", "svc-1").expect("registered");
        assert!(info.last_error.expect("a reason").contains("503"));
        status.store(200, Ordering::SeqCst);
        wait_for(&registry, Health::Healthy).await;

        stop.cancel();
        task.await.expect("checker stops when told");
    }

    #[tokio::test]
    async fn refused_connections_are_failures() {
        let checker = HealthChecker::new(Registry::new());
        let unused = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = unused.local_addr().expect("addr");
        drop(unused);
        let reason = checker
            .probe(addr, "/healthz", Duration::from_millis(500))
            .await
            .expect_err("nothing listens");
        assert!(!reason.is_empty());
    }
}
