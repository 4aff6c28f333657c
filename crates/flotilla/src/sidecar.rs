//! `flotilla sidecar`: one instance's outbound proxy as a process of its own, the way it will run
//! beside a pod rather than inside `flotilla up`.
//!
//! It runs the same [`flotilla_sidecar::serve`] as the in-process sidecars. What `up` hands those
//! directly it learns from the fleet's control API instead: the policies from the manifest
//! (`GET /v1/app` names its directory), the endpoints ([`ControlDiscovery`], polled from
//! `GET /v1/services`) and the injected faults (`GET /v1/faults`), both refreshed every
//! [`POLL_INTERVAL`]. When the control API is briefly away it keeps serving from the last view.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flotilla_control::{AppInfo, Faults, ServiceView};
use flotilla_proxy::resilience::FaultTable;
use flotilla_proxy::{Caller, Policies, Resilience};
use flotilla_registry::{Discovery, Endpoint, Endpoints, Resolution};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::SidecarArgs;
use crate::client::Control;
use crate::up::StopSignals;

/// How often the view is refreshed: the longest a new instance waits for traffic, or a cleared
/// fault keeps being injected, beyond what the in-process sidecars see.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A poll that takes longer than this counts as failed, so a hung control API is noticed.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// The socket address of an `http://HOST:PORT` control URL.
async fn control_address(url: &str) -> Result<std::net::SocketAddr> {
    let authority = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .filter(|a| !a.is_empty())
        .with_context(|| format!("the control URL {url:?} is not http://HOST:PORT"))?;
    let with_port = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))
}

pub async fn run(args: SidecarArgs) -> Result<ExitCode> {
    let control = Control::new(&args.control)?;
    let app: AppInfo = control.get("/v1/app").await?;
    let manifest = flotilla_manifest::load(Path::new(&app.dir)).map_err(|diagnostics| {
        anyhow::anyhow!(
            "cannot load the manifest of `{}` from {}:\n{}",
            app.app,
            app.dir,
            diagnostics.render(None)
        )
    })?;
    if !manifest.services.iter().any(|s| *s.name == args.service) {
        bail!(
            "`{}` has no service named `{}`; its services are: {}",
            app.app,
            args.service,
            manifest
                .services
                .iter()
                .map(|s| &*s.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let resilience = Resilience::new(Policies::from_manifest(&manifest));
    let discovery = Arc::new(ControlDiscovery::default());
    // The first view before the first call, so no call is refused as "unknown service" merely
    // because the sidecar has just started.
    let view = fetch(&control).await?;
    view.apply(&discovery, &resilience.faults);

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("the sidecar cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let caller: Arc<str> = match args.instance {
        Some(instance) => instance.into(),
        None => format!("{}-sidecar", args.service).into(),
    };
    let signals = StopSignals::install().context("cannot install signal handlers")?;
    {
        // The first line is the address: scripts and tests read it to find a port 0 sidecar.
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "sidecar for {} listening on http://{addr}",
            args.service
        )?;
        out.flush()?;
    }

    let stop = CancellationToken::new();
    let signals = tokio::spawn(signals.watch(stop.clone(), false));
    let refresh = tokio::spawn(keep_fresh(
        control,
        discovery.clone(),
        resilience.faults.clone(),
        stop.clone(),
    ));
    let caller = Caller {
        service: Arc::from(args.service.as_str()),
        instance: caller,
    };
    // `http://flotilla/...` (publishing events) goes to the control API this sidecar follows.
    let control_addr = control_address(&args.control).await?;
    let discovery = Arc::new(flotilla_sidecar::WithFlotilla::new(discovery, control_addr));
    let served =
        flotilla_sidecar::serve(listener, caller, discovery, resilience, stop.clone()).await;
    // Also ends the helpers when the server stops on its own.
    stop.cancel();
    let _ = tokio::join!(signals, refresh);
    served.context("the sidecar stopped")?;
    Ok(ExitCode::SUCCESS)
}

/// What one poll of the control API returned.
struct View {
    services: Vec<ServiceView>,
    faults: BTreeMap<String, Faults>,
}

impl View {
    fn apply(self, discovery: &ControlDiscovery, faults: &FaultTable) {
        discovery.replace(&self.services);
        let fresh: Vec<(Arc<str>, Faults)> = self
            .faults
            .iter()
            .map(|(service, faults)| (Arc::from(service.as_str()), faults.clone()))
            .collect();
        // Both sorted by service, so equal tables compare equal; only a change is worth a line.
        if faults.all() != fresh {
            if fresh.is_empty() {
                tracing::warn!("fault injection cleared");
            } else {
                let wire = serde_json::to_string(&self.faults).unwrap_or_default();
                tracing::warn!("fault injection now {wire}");
            }
            faults.replace(fresh);
        }
    }
}

async fn fetch(control: &Control) -> Result<View> {
    let (services, faults) = tokio::try_join!(
        control.get::<Vec<ServiceView>>("/v1/services"),
        control.get::<BTreeMap<String, Faults>>("/v1/faults"),
    )?;
    Ok(View { services, faults })
}

/// Polls the control API every [`POLL_INTERVAL`] until `stop`; keeps the last good view through
/// failures, logging once when the control API goes away and once when it is back.
async fn keep_fresh(
    control: Control,
    discovery: Arc<ControlDiscovery>,
    faults: Arc<FaultTable>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reachable = true;
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => return,
            polled = async {
                ticks.tick().await;
                tokio::time::timeout(POLL_TIMEOUT, fetch(&control)).await
            } => polled,
        };
        match polled {
            Ok(Ok(view)) => {
                if !reachable {
                    tracing::info!("the control API answers again; the view is fresh");
                    reachable = true;
                }
                view.apply(&discovery, &faults);
            }
            Ok(Err(error)) if reachable => {
                tracing::warn!("{error:#}; serving from the last view until it answers");
                reachable = false;
            }
            Err(_) if reachable => {
                tracing::warn!(
                    "the control API did not answer within {POLL_TIMEOUT:?}; serving from the last view until it does"
                );
                reachable = false;
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }
}

/// Endpoints as the control API last listed them: healthy instances with a port, on loopback
/// (the sidecar runs beside the fleet). A service the API does not list is unknown.
#[derive(Debug, Default)]
pub struct ControlDiscovery {
    services: RwLock<HashMap<Arc<str>, Endpoints>>,
}

impl ControlDiscovery {
    pub fn replace(&self, services: &[ServiceView]) {
        let fresh = services
            .iter()
            .map(|service| {
                let endpoints: Endpoints = service
                    .instances
                    .iter()
                    .filter(|i| i.health == "healthy")
                    .filter_map(|i| {
                        Some(Endpoint {
                            instance: Arc::from(i.instance.as_str()),
                            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, i.port?)),
                        })
                    })
                    .collect();
                (Arc::from(service.name.as_str()), endpoints)
            })
            .collect();
        // Replaced whole, so a poisoned lock still guards a consistent map.
        *self.services.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }
}

impl Discovery for ControlDiscovery {
    fn resolve(&self, service: &str) -> Resolution {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        match services.get(service) {
            Some(endpoints) => Resolution::Endpoints(endpoints.clone()),
            None => Resolution::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_control::InstanceView;

    fn instance(name: &str, port: Option<u16>, health: &str) -> InstanceView {
        InstanceView {
            service: "back".into(),
            instance: name.into(),
            pid: Some(1),
            port,
            state: "running".into(),
            health: health.into(),
            restarts: 0,
            version: "1.0.0".into(),
            uptime_seconds: Some(1),
            last_exit: None,
            last_error: None,
        }
    }

    fn service(name: &str, instances: Vec<InstanceView>) -> ServiceView {
        ServiceView {
            name: name.into(),
            version: "1.0.0".into(),
            replicas: 3,
            healthy: 1,
            instances,
        }
    }

    fn endpoints(discovery: &ControlDiscovery, service: &str) -> Option<Vec<Endpoint>> {
        match discovery.resolve(service) {
            Resolution::Endpoints(endpoints) => Some(endpoints.to_vec()),
            Resolution::Unknown => None,
        }
    }

    #[test]
    fn healthy_instances_with_a_port_are_endpoints() {
        let discovery = ControlDiscovery::default();
        assert!(
            endpoints(&discovery, "back").is_none(),
            "nothing before the first view"
        );
        discovery.replace(&[
            service(
                "back",
                vec![
                    instance("back-1", Some(4001), "healthy"),
                    instance("back-2", Some(4002), "unhealthy"),
                    instance("back-3", None, "healthy"),
                ],
            ),
            service("idle", vec![]),
        ]);
        assert_eq!(
            endpoints(&discovery, "back"),
            Some(vec![Endpoint {
                instance: "back-1".into(),
                addr: "127.0.0.1:4001".parse().expect("addr"),
            }])
        );
        assert_eq!(
            endpoints(&discovery, "idle"),
            Some(vec![]),
            "known, none healthy"
        );
        assert!(endpoints(&discovery, "nosuch").is_none());
        discovery.replace(&[]);
        assert!(
            endpoints(&discovery, "back").is_none(),
            "a new view replaces the old"
        );
    }

    #[test]
    fn faults_follow_the_control_api() {
        let discovery = ControlDiscovery::default();
        let table = FaultTable::new();
        table.set("stale", faults(503));
        View {
            services: vec![],
            faults: BTreeMap::from([("back".to_owned(), faults(418))]),
        }
        .apply(&discovery, &table);
        assert_eq!(table.all(), vec![(Arc::from("back"), faults(418))]);
        View {
            services: vec![],
            faults: BTreeMap::new(),
        }
        .apply(&discovery, &table);
        assert!(table.all().is_empty());
    }

    fn faults(abort: u16) -> Faults {
        Faults {
            delay: None,
            delay_percent: 100,
            abort: Some(abort),
            abort_percent: 100,
        }
    }
}
