//! `flotilla status`: every service and instance of a running fleet.

use std::process::ExitCode;

use anyhow::Result;
use flotilla_control::{AppInfo, InstanceView, ServiceView};

use crate::cli::StatusArgs;
use crate::client::Control;
use crate::output;

pub async fn run(args: StatusArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    let services: Vec<ServiceView> = control.get("/v1/services").await?;
    if args.json {
        let instances: Vec<&InstanceView> = services.iter().flat_map(|s| &s.instances).collect();
        println!("{}", serde_json::to_string_pretty(&instances)?);
        return Ok(ExitCode::SUCCESS);
    }
    let app: AppInfo = control.get("/v1/app").await?;
    println!(
        "app {}  gateway {}  control {}",
        app.app, app.gateway, app.control
    );
    print!("{}", instance_table(&services));
    Ok(ExitCode::SUCCESS)
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
