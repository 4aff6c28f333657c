//! The sidecar: one service instance's outbound proxy, handed to it as `HTTP_PROXY`.
//!
//! A service calls `http://inventory/stock` with any ordinary HTTP client; because of
//! `HTTP_PROXY` the client sends the request in absolute form (`GET http://inventory/stock`) to
//! the sidecar, which reads the host name as the service to call ([`HostEdge`]) and sends the
//! request through the same [`flotilla_proxy`] stack as the gateway: request id, hop-by-hop
//! stripping, the callee's policy (deadline, retries within a budget, timeout, circuit breaker,
//! bulkhead, P2C over peak-EWMA with outlier ejection, injected faults), pooled upstream
//! connections, problem+json errors. It adds no `x-forwarded-*` headers (the traffic is internal) and rewrites no paths.
//! [`serve`] runs it on the instance's listener until shutdown.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use flotilla_proxy::resilience::ResilienceLayer;
use flotilla_proxy::{Caller, Edge, Error, ProxySettings, Resilience, Target};
use flotilla_registry::{Discovery, Endpoint, Endpoints, Resolution};
use http::{Method, Request, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The host name under which instances reach Flotilla's own API (publishing events; sagas
/// later): `POST http://flotilla/v1/topics/order.placed/events`. It goes through the same stack
/// as any call (a span, the map's edge to the broker), to the control API's address, which
/// [`WithFlotilla`] adds to the discovery.
pub const RESERVED_HOST: &str = "flotilla";

/// Set by the sidecar on every request to [`RESERVED_HOST`] (a service's own value is
/// overwritten): the calling service, which Flotilla names as an event's default `source`.
pub const CALLER_HEADER: &str = "x-flotilla-caller";

/// Interned service names kept at most; past this, names are allocated per request rather than
/// letting a caller that invents host names grow the table.
const MAX_INTERNED: usize = 1024;

/// Reads the target service from the request's host: the absolute URI's, else the Host header's,
/// port dropped, lowercased.
#[derive(Debug)]
pub struct HostEdge {
    caller: Arc<str>,
    reserved: Arc<str>,
    /// Host name → the `Arc<str>` every request for it shares, so the hot path does not allocate
    /// a service name per request.
    names: RwLock<HashMap<Box<str>, Arc<str>>>,
}

impl HostEdge {
    pub fn new(caller: Arc<str>) -> Self {
        Self {
            caller,
            reserved: Arc::from(RESERVED_HOST),
            names: RwLock::default(),
        }
    }

    fn service_name(&self, host: &str) -> Arc<str> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        // A poisoned lock still holds a valid map: entries are only ever inserted whole.
        if let Some(name) = self
            .names
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
        {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(host);
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        if names.len() < MAX_INTERNED {
            names.insert(host.into(), name.clone());
        }
        name
    }
}

impl Edge for HostEdge {
    fn target<B>(&self, request: &Request<B>) -> Result<Target, Error> {
        if request.method() == Method::CONNECT {
            tracing::debug!(caller = &*self.caller, "refused CONNECT");
            return Err(Error::MethodNotAllowed {
                allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
                reason: "the sidecar does not tunnel (CONNECT); call services with plain http:// URLs",
            });
        }
        let host = match request.uri().host() {
            Some(host) => host,
            None => request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(strip_port)
                .ok_or(Error::BadRequest(
                    "the request names no host; call services as http://<service>/…",
                ))?,
        };
        if host.is_empty() {
            return Err(Error::BadRequest(
                "the request names no host; call services as http://<service>/…",
            ));
        }
        if host.eq_ignore_ascii_case(RESERVED_HOST) {
            return Ok(Target::service(self.reserved.clone()));
        }
        Ok(Target::service(self.service_name(host)))
    }
}

/// `inventory:80` → `inventory`; `[::1]:80` → `[::1]` (no service is named like an address, so
/// those fail as unknown services, which is the right answer).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.split_once(':').map_or(host, |(name, _)| name)
}

/// Serves the sidecar of `caller` (a service instance, e.g. `orders-2`) on `listener` until
/// `shutdown` is cancelled, then gives in-flight calls [`flotilla_proxy::DEFAULT_DRAIN_TIMEOUT`].
///
/// Calls get the callee's policy from `resilience`; the breakers are the caller's own.
pub async fn serve<D: Discovery>(
    listener: TcpListener,
    caller: Caller,
    discovery: Arc<D>,
    resilience: Resilience,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::debug!(caller = &*caller.instance, addr = ?listener.local_addr().ok(), "sidecar serving");
    let edge = HostEdge::new(caller.instance.clone());
    let caller_value = http::HeaderValue::from_str(&caller.service)
        .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
    let layer = ResilienceLayer::new(discovery, resilience, caller);
    let stack = flotilla_proxy::stack_with_edge(layer, ProxySettings::sidecar(), edge);
    // Only requests to Flotilla itself carry the caller: services learn nothing new about each
    // other, and one cannot pose as another to Flotilla.
    let stack = tower::ServiceExt::map_request(stack, move |mut request: Request<_>| {
        if is_reserved(&request) {
            request
                .headers_mut()
                .insert(CALLER_HEADER, caller_value.clone());
        }
        request
    });
    flotilla_proxy::serve_connections(
        listener,
        stack,
        shutdown,
        flotilla_proxy::DEFAULT_DRAIN_TIMEOUT,
    )
    .await
}

fn is_reserved<B>(request: &Request<B>) -> bool {
    let host = match request.uri().host() {
        Some(host) => host,
        None => match request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            Some(host) => strip_port(host),
            None => return false,
        },
    };
    host.eq_ignore_ascii_case(RESERVED_HOST)
}

/// A discovery that also resolves [`RESERVED_HOST`] to Flotilla's own API.
pub struct WithFlotilla<D> {
    inner: Arc<D>,
    flotilla: Endpoints,
}

impl<D: Discovery> WithFlotilla<D> {
    pub fn new(inner: Arc<D>, control: std::net::SocketAddr) -> Self {
        Self {
            inner,
            flotilla: Arc::from([Endpoint {
                instance: Arc::from("flotilla"),
                addr: control,
            }]),
        }
    }
}

impl<D: Discovery> Discovery for WithFlotilla<D> {
    fn resolve(&self, service: &str) -> Resolution {
        if service == RESERVED_HOST {
            Resolution::Endpoints(self.flotilla.clone())
        } else {
            self.inner.resolve(service)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge() -> HostEdge {
        HostEdge::new("orders-1".into())
    }

    fn target(request: Request<()>) -> Result<Target, Error> {
        edge().target(&request)
    }

    #[test]
    fn absolute_uri_host_wins() {
        let request = Request::builder()
            .uri("http://Inventory:8080/stock?sku=TEA")
            .header(header::HOST, "other")
            .body(())
            .expect("request");
        let target = target(request).expect("target");
        assert_eq!(&*target.service, "inventory");
        assert_eq!(target.strip_prefix, None);
    }

    #[test]
    fn host_header_otherwise() {
        let request = Request::builder()
            .uri("/stock")
            .header(header::HOST, "payments:80")
            .body(())
            .expect("request");
        assert_eq!(&*target(request).expect("target").service, "payments");
    }

    #[test]
    fn names_are_shared_not_reallocated() {
        let edge = edge();
        let a = edge.service_name("catalog");
        let b = edge.service_name("CATALOG");
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn refusals() {
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("inventory:443")
            .body(())
            .expect("request");
        assert!(matches!(
            target(connect),
            Err(Error::MethodNotAllowed { .. })
        ));
        let reserved = Request::builder()
            .uri("http://flotilla/events")
            .body(())
            .expect("request");
        assert_eq!(
            target(reserved).map(|t| t.service).ok().as_deref(),
            Some(RESERVED_HOST)
        );
        let hostless = Request::builder().uri("/x").body(()).expect("request");
        assert!(matches!(target(hostless), Err(Error::BadRequest(_))));
    }

    #[test]
    fn ports_are_dropped() {
        assert_eq!(strip_port("inventory:80"), "inventory");
        assert_eq!(strip_port("inventory"), "inventory");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
