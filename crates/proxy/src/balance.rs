//! Load balancing: resolve the target service through [`Discovery`], pick one healthy instance.
//!
//! The layer does the resolving and the refusing (unknown service, nothing healthy); which
//! instance wins is a [`Policy`]. Round-robin is the one today; P2C over peak-EWMA is another
//! `Policy` plugged into the same layer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use flotilla_registry::{Discovery, Endpoint, Resolution};
use http::Request;
use tower::{Layer, Service};

use crate::future::Checked;
use crate::{BoxError, Error, Target};

/// Chooses which of a service's healthy endpoints gets the next request.
pub trait Policy: Send + Sync + 'static {
    /// An index into `endpoints`, which is never empty. An out-of-range answer means the first.
    fn pick(&self, service: &str, endpoints: &[Endpoint]) -> usize;
}

/// Each service's instances in turn.
///
/// The turn is counted per service: one shared counter would let two services that alternate
/// always land on the same instance of each.
#[derive(Debug, Default)]
pub struct RoundRobin {
    turns: RwLock<HashMap<Arc<str>, AtomicUsize>>,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self::default()
    }

    fn next_turn(&self, service: &str) -> usize {
        // The map only grows by one entry per known service, so after warm-up every request
        // takes the read lock only. A poisoned lock still holds valid counters.
        {
            let turns = self.turns.read().unwrap_or_else(|e| e.into_inner());
            if let Some(turn) = turns.get(service) {
                return turn.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut turns = self.turns.write().unwrap_or_else(|e| e.into_inner());
        turns
            .entry(Arc::from(service))
            .or_default()
            .fetch_add(1, Ordering::Relaxed)
    }
}

impl Policy for RoundRobin {
    fn pick(&self, service: &str, endpoints: &[Endpoint]) -> usize {
        match endpoints.len() {
            0 | 1 => 0,
            n => self.next_turn(service) % n,
        }
    }
}

/// The endpoint the balancer picked, as a request extension for the upstream client.
#[derive(Clone, Debug)]
pub struct Picked(pub Endpoint);

/// Resolves the request's [`Target`] and picks an endpoint with a [`Policy`].
pub struct BalanceLayer<D, P> {
    discovery: Arc<D>,
    policy: Arc<P>,
}

impl<D, P> BalanceLayer<D, P> {
    pub fn new(discovery: Arc<D>, policy: P) -> Self {
        Self {
            discovery,
            policy: Arc::new(policy),
        }
    }
}

impl<D, P> Clone for BalanceLayer<D, P> {
    fn clone(&self) -> Self {
        Self {
            discovery: self.discovery.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S, D, P> Layer<S> for BalanceLayer<D, P> {
    type Service = Balance<S, D, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            inner,
            discovery: self.discovery.clone(),
            policy: self.policy.clone(),
        }
    }
}

pub struct Balance<S, D, P> {
    inner: S,
    discovery: Arc<D>,
    policy: Arc<P>,
}

impl<S: Clone, D, P> Clone for Balance<S, D, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            discovery: self.discovery.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S, D, P, B> Service<Request<B>> for Balance<S, D, P>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    D: Discovery,
    P: Policy,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match self.pick(&request) {
            Ok(endpoint) => {
                request.extensions_mut().insert(Picked(endpoint));
                Checked::called(self.inner.call(request))
            }
            Err(error) => Checked::rejected(error),
        }
    }
}

impl<S, D: Discovery, P: Policy> Balance<S, D, P> {
    fn pick<B>(&self, request: &Request<B>) -> Result<Endpoint, Error> {
        let target = request
            .extensions()
            .get::<Target>()
            .ok_or(Error::NoTarget)?;
        let endpoints = match self.discovery.resolve(&target.service) {
            Resolution::Unknown => return Err(Error::UnknownService(target.service.clone())),
            Resolution::Endpoints(endpoints) => endpoints,
        };
        let index = self.policy.pick(&target.service, &endpoints);
        endpoints
            .get(index)
            .or_else(|| endpoints.first())
            .cloned()
            .ok_or_else(|| Error::NoHealthyInstance(target.service.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn endpoints(n: u16) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| Endpoint {
                instance: format!("svc-{i}").into(),
                addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
            })
            .collect()
    }

    #[test]
    fn round_robin_cycles_per_service() {
        let rr = RoundRobin::new();
        let three = endpoints(3);
        let two = endpoints(2);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..6 {
            a.push(rr.pick("a", &three));
            b.push(rr.pick("b", &two));
        }
        assert_eq!(a, [0, 1, 2, 0, 1, 2]);
        assert_eq!(b, [0, 1, 0, 1, 0, 1]);
        assert_eq!(rr.pick("c", &endpoints(1)), 0);
    }
}
