//! `flotilla status`: every service and instance of a running fleet, then its circuit breakers.

use std::process::ExitCode;

use anyhow::Result;
use flotilla_control::{AppInfo, BreakerState, BreakerView, InstanceView, ServiceView};

use crate::cli::StatusArgs;
use crate::client::Control;
use crate::output;

pub async fn run(args: StatusArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    let (services, breakers) = tokio::try_join!(
        control.get::<Vec<ServiceView>>("/v1/services"),
        control.get::<Vec<BreakerView>>("/v1/breakers"),
    )?;
    if args.json {
        let instances: Vec<&InstanceView> = services.iter().flat_map(|s| &s.instances).collect();
        let status = serde_json::json!({ "instances": instances, "breakers": breakers });
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let app: AppInfo = control.get("/v1/app").await?;
    println!(
        "app {}  gateway {}  control {}",
        app.app, app.gateway, app.control
    );
    print!("{}", instance_table(&services));
    print!("\n{}", breaker_section(&breakers));
    Ok(ExitCode::SUCCESS)
}

/// The breakers worth a look — not closed, or failing lately — one line each, service breakers
/// with their instances' outlier records under them; the quiet rest as one count, so a fleet of
/// many services still fits a screen.
pub fn breaker_section(breakers: &[BreakerView]) -> String {
    let troubled = |b: &&BreakerView| {
        b.state != BreakerState::Closed || b.consecutive_failures > 0 || b.window_failures > 0
    };
    let rows: Vec<Vec<String>> = breakers
        .iter()
        .filter(troubled)
        .map(|b| {
            let (target, window) = match &b.instance {
                None => (
                    b.service.clone(),
                    format!("{}/{} failed", b.window_failures, b.window_calls),
                ),
                Some(instance) => (format!("{}/{instance}", b.service), "-".into()),
            };
            vec![
                b.caller.clone(),
                target,
                breaker_state(b),
                b.consecutive_failures.to_string(),
                window,
                b.in_flight.to_string(),
                b.times_opened.to_string(),
            ]
        })
        .collect();
    let quiet = breakers
        .iter()
        .filter(|b| b.instance.is_none() && !troubled(b))
        .count();
    let mut out = String::new();
    if !rows.is_empty() {
        out.push_str(&output::table(
            &[
                "CALLER",
                "BREAKER",
                "STATE",
                "FAILURES IN A ROW",
                "WINDOW",
                "IN FLIGHT",
                "OPENED",
            ],
            &rows,
        ));
    }
    match (quiet, rows.is_empty()) {
        (0, true) => out.push_str("no breakers yet: each appears with its caller's first call\n"),
        (0, false) => {}
        (1, _) => out.push_str("1 breaker closed, no recent failures\n"),
        (n, _) => out.push_str(&format!("{n} breakers closed, no recent failures\n")),
    }
    out
}

/// `open, half-open in 4s` for a service breaker, `ejected, back in 9s` for an instance.
fn breaker_state(b: &BreakerView) -> String {
    let (open, next) = match b.instance {
        None => ("open", "half-open"),
        Some(_) => ("ejected", "back"),
    };
    match (b.state, b.retry_in_ms) {
        // The move to half-open happens on the next call, which may be a while coming.
        (BreakerState::Open, Some(0)) if b.instance.is_none() => {
            format!("{open}, {next} on the next call")
        }
        (BreakerState::Open, Some(ms)) => {
            format!("{open}, {next} in {}", output::uptime(ms.div_ceil(1000)))
        }
        (BreakerState::Open, None) => open.to_owned(),
        (state, _) => state.to_string(),
    }
}

pub fn instance_table(services: &[ServiceView]) -> String {
    let rows: Vec<Vec<String>> = services
        .iter()
        .flat_map(|s| &s.instances)
        .map(|i| {
            vec![
                i.service.clone(),
                i.instance.clone(),
                i.state.clone(),
                i.health.clone(),
                i.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                i.port.map_or_else(|| "-".into(), |p| p.to_string()),
                i.restarts.to_string(),
                i.version.clone(),
                i.uptime_seconds.map_or_else(|| "-".into(), output::uptime),
            ]
        })
        .collect();
    output::table(
        &[
            "SERVICE", "INSTANCE", "STATE", "HEALTH", "PID", "PORT", "RESTARTS", "VERSION",
            "UPTIME",
        ],
        &rows,
    )
}

/// One line per service, as `up` prints once the fleet is ready.
pub fn service_lines(services: &[ServiceView]) -> String {
    let width = services.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for s in services {
        let ports: Vec<String> = s
            .instances
            .iter()
            .filter_map(|i| i.port.map(|p| format!(":{p}")))
            .collect();
        out.push_str(&format!(
            "  {:<width$}  v{:<8} {}/{} healthy  {}\n",
            s.name,
            s.version,
            s.healthy,
            s.replicas,
            ports.join(" ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(caller: &str, service: &str, instance: Option<&str>) -> BreakerView {
        BreakerView {
            caller: caller.into(),
            service: service.into(),
            instance: instance.map(Into::into),
            state: BreakerState::Closed,
            state_for_ms: 0,
            consecutive_failures: 0,
            window_calls: 12,
            window_failures: 0,
            in_flight: 0,
            times_opened: 0,
            retry_in_ms: None,
        }
    }

    #[test]
    fn troubled_breakers_get_a_line_and_the_rest_a_count() {
        let open = BreakerView {
            state: BreakerState::Open,
            consecutive_failures: 5,
            window_failures: 6,
            window_calls: 9,
            times_opened: 1,
            retry_in_ms: Some(3_200),
            ..breaker("gateway", "payments", None)
        };
        let ejected = BreakerView {
            state: BreakerState::Open,
            consecutive_failures: 5,
            times_opened: 2,
            retry_in_ms: Some(19_000),
            ..breaker("gateway", "payments", Some("payments-2"))
        };
        let failing = BreakerView {
            consecutive_failures: 2,
            in_flight: 3,
            ..breaker("orders-1", "inventory", None)
        };
        let breakers = [
            open,
            ejected,
            breaker("gateway", "payments", Some("payments-1")),
            breaker("gateway", "catalog", None),
            failing,
            breaker("orders-1", "payments", None),
        ];
        assert_eq!(
            breaker_section(&breakers),
            "CALLER    BREAKER              STATE                  FAILURES IN A ROW  WINDOW       IN FLIGHT  OPENED\n\
             gateway   payments             open, half-open in 4s  5                  6/9 failed   0          1\n\
             gateway   payments/payments-2  ejected, back in 19s   5                  -            0          2\n\
             orders-1  inventory            closed                 2                  0/12 failed  3          0\n\
             2 breakers closed, no recent failures\n"
        );
    }

    #[test]
    fn a_quiet_fleet_is_one_line() {
        assert_eq!(
            breaker_section(&[breaker("gateway", "catalog", None)]),
            "1 breaker closed, no recent failures\n"
        );
        assert!(breaker_section(&[]).starts_with("no breakers yet"));
    }
}
