//! Rolling instance health up to services and the app, with the reason in words.
//!
//! Pure functions of the services' views, so `GET /v1/health` and the map's nodes agree, and
//! the rules are tested without a fleet.

use crate::api::{AppHealth, HealthStatus, InstanceView, ServiceHealth, ServiceView};

/// Every service's health, and the app's.
pub(crate) fn app_health(services: &[ServiceView]) -> AppHealth {
    let services: Vec<ServiceHealth> = services.iter().map(service_health).collect();
    let down = services
        .iter()
        .filter(|s| s.status == HealthStatus::Down)
        .count();
    let status = if down > 0 && down == services.len() {
        HealthStatus::Down
    } else {
        // Some service still serves, so parts of the app work: degraded, not down.
        services
            .iter()
            .map(|s| s.status.min(HealthStatus::Degraded))
            .max()
            .unwrap_or(HealthStatus::Healthy)
    };
    AppHealth { status, services }
}

/// Healthy when every replica is, down when none is, degraded in between.
pub(crate) fn service_health(service: &ServiceView) -> ServiceHealth {
    let status = service_status(service);
    let mut reason = format!(
        "{} of {} instances healthy",
        service.healthy, service.replicas
    );
    let troubles: Vec<String> = service
        .instances
        .iter()
        .filter_map(|i| trouble(i).map(|why| format!("{}: {why}", i.instance)))
        .collect();
    if !troubles.is_empty() {
        reason.push_str(&format!(" ({})", troubles.join("; ")));
    } else if status != HealthStatus::Healthy && service.instances.is_empty() {
        // Before `up` starts a service (while building) there is no instance to blame.
        reason.push_str(" (not started)");
    }
    ServiceHealth {
        name: service.name.clone(),
        status,
        healthy: service.healthy,
        replicas: service.replicas,
        reason,
    }
}

pub(crate) fn service_status(service: &ServiceView) -> HealthStatus {
    if service.healthy == 0 {
        HealthStatus::Down
    } else if service.healthy >= service.replicas {
        HealthStatus::Healthy
    } else {
        HealthStatus::Degraded
    }
}

/// Why an instance does not serve, or `None` when it does: what the supervisor knows when the
/// process is not running, else the health check's own complaint.
fn trouble(instance: &InstanceView) -> Option<String> {
    if instance.health == "healthy" {
        return None;
    }
    let state = instance.state.as_str();
    Some(match state {
        "backoff" | "crash-loop" => match &instance.last_exit {
            Some(exit) => format!("{state}, last {exit}"),
            None => state.to_owned(),
        },
        "running" => match &instance.last_error {
            Some(error) => error.clone(),
            None if instance.health == "unhealthy" => "failing its health check".to_owned(),
            None => "not yet checked".to_owned(),
        },
        // Refused connections are expected while a process starts; they are no reason yet.
        "starting" => "starting, not yet healthy".to_owned(),
        _ => state.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, health: &str) -> InstanceView {
        InstanceView {
            service: name.split('-').next().unwrap_or(name).into(),
            instance: name.into(),
            pid: Some(42),
            port: Some(9000),
            state: "running".into(),
            health: health.into(),
            restarts: 0,
            version: "1.0.0".into(),
            uptime_seconds: Some(5),
            last_exit: None,
            last_error: None,
        }
    }

    fn service(name: &str, replicas: u32, instances: Vec<InstanceView>) -> ServiceView {
        ServiceView {
            name: name.into(),
            version: "1.0.0".into(),
            replicas,
            healthy: instances.iter().filter(|i| i.health == "healthy").count() as u32,
            instances,
        }
    }

    #[test]
    fn services_are_healthy_degraded_or_down_with_the_reason() {
        let refused = InstanceView {
            health: "unhealthy".into(),
            last_error: Some("connection refused".into()),
            ..instance("orders-1", "unhealthy")
        };
        let degraded = service_health(&service(
            "orders",
            2,
            vec![refused, instance("orders-2", "healthy")],
        ));
        assert_eq!(degraded.status, HealthStatus::Degraded);
        assert_eq!(
            degraded.reason,
            "1 of 2 instances healthy (orders-1: connection refused)"
        );

        let healthy = service_health(&service("stock", 1, vec![instance("stock-1", "healthy")]));
        assert_eq!(healthy.status, HealthStatus::Healthy);
        assert_eq!(healthy.reason, "1 of 1 instances healthy");

        let looping = InstanceView {
            state: "crash-loop".into(),
            pid: None,
            last_exit: Some("exit status 3".into()),
            last_error: Some("connection refused".into()),
            ..instance("pay-1", "unknown")
        };
        let down = service_health(&service(
            "pay",
            2,
            vec![looping, instance("pay-2", "unknown")],
        ));
        assert_eq!(down.status, HealthStatus::Down);
        assert_eq!(
            down.reason,
            "0 of 2 instances healthy (pay-1: crash-loop, last exit status 3; pay-2: not yet checked)"
        );

        let unstarted = service_health(&service("late", 1, vec![]));
        assert_eq!(unstarted.status, HealthStatus::Down);
        assert_eq!(unstarted.reason, "0 of 1 instances healthy (not started)");
    }

    #[test]
    fn the_app_is_the_worst_service_but_down_only_when_all_are() {
        let up = |name: &str| service(name, 1, vec![instance(&format!("{name}-1"), "healthy")]);
        let down = |name: &str| service(name, 1, vec![instance(&format!("{name}-1"), "unknown")]);
        let half = |name: &str| {
            service(
                name,
                2,
                vec![
                    instance(&format!("{name}-1"), "healthy"),
                    instance(&format!("{name}-2"), "unhealthy"),
                ],
            )
        };
        let status = |services: &[ServiceView]| app_health(services).status;
        assert_eq!(status(&[up("a"), up("b")]), HealthStatus::Healthy);
        assert_eq!(status(&[up("a"), half("b")]), HealthStatus::Degraded);
        assert_eq!(status(&[up("a"), down("b")]), HealthStatus::Degraded);
        assert_eq!(status(&[down("a"), down("b")]), HealthStatus::Down);
        assert_eq!(status(&[]), HealthStatus::Healthy);
        let health = app_health(&[up("a"), down("b")]);
        assert_eq!(health.services.len(), 2);
        assert_eq!(health.services[1].status, HealthStatus::Down);
    }
}
