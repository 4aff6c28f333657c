//! `flotilla chaos`: inject delays and errors into every call to a service, list and clear them.
//!
//! The faults live in the fleet's data plane, on the callee's side of every stack, so the gateway
//! and every sidecar see the same misbehaving service. The values are checked by the control API
//! alone (one set of rules, shared with `PUT /v1/services/{name}/faults`); a refusal is printed
//! as its problem detail.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;
use flotilla_control::Faults;

use crate::cli::ChaosArgs;
use crate::client::{Control, encode};
use crate::output;

pub async fn run(args: ChaosArgs) -> Result<ExitCode> {
    let control = Control::locate(&args.target.dir, args.target.control.as_deref())?;
    if let Some(service) = &args.service {
        let path = format!("/v1/services/{}/faults", encode(service));
        if args.clear {
            control.delete(&path).await?;
            output::note(&format!("stopped injecting faults into {service}"));
        } else {
            let faults = Faults {
                delay: args.delay,
                delay_percent: args.delay_percent,
                abort: args.abort,
                abort_percent: args.abort_percent,
            };
            let _: Faults = control.put(&path, &faults).await?;
        }
    }
    // Everything in force afterwards, not only this service: another service's faults may be
    // what explains the calls still failing.
    let all: BTreeMap<String, Faults> = control.get("/v1/faults").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        output::note("no faults are injected");
    } else {
        print!("{}", fault_table(&all));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fault_table(all: &BTreeMap<String, Faults>) -> String {
    let share = |what: String, percent: u32| {
        if percent >= 100 {
            format!("{what} on every call")
        } else {
            format!("{what} on {percent}% of calls")
        }
    };
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|(service, faults)| {
            vec![
                service.clone(),
                faults.delay.map_or_else(
                    || "-".into(),
                    |d| {
                        share(
                            humantime::format_duration(d).to_string(),
                            faults.delay_percent,
                        )
                    },
                ),
                faults.abort.map_or_else(
                    || "-".into(),
                    |status| share(status.to_string(), faults.abort_percent),
                ),
            ]
        })
        .collect();
    output::table(&["SERVICE", "DELAY", "ABORT"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn faults_read_as_a_table() {
        let all = BTreeMap::from([
            (
                "payments".to_owned(),
                Faults {
                    delay: Some(Duration::from_millis(300)),
                    delay_percent: 50,
                    abort: Some(503),
                    abort_percent: 100,
                },
            ),
            (
                "catalog".to_owned(),
                Faults {
                    delay: None,
                    delay_percent: 100,
                    abort: Some(418),
                    abort_percent: 20,
                },
            ),
        ]);
        assert_eq!(
            fault_table(&all),
            "SERVICE   DELAY                  ABORT\n\
             catalog   -                      418 on 20% of calls\n\
             payments  300ms on 50% of calls  503 on every call\n"
        );
    }
}
