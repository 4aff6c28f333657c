//! `flotilla check`: the manifest's validation, without starting anything.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::CheckArgs;
use crate::output;

pub fn run(args: CheckArgs) -> Result<ExitCode> {
    match flotilla_manifest::load(&args.dir) {
        Ok(manifest) => {
            println!(
                "{}: ok: app `{}`, {} services, {} routes, {} topics, {} sagas",
                manifest.path.display(),
                manifest.app,
                manifest.services.len(),
                manifest.gateway.routes.len(),
                manifest.topics.len(),
                manifest.sagas.sagas.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            eprintln!("{}", diagnostics.render(None));
            output::error(&format!(
                "the manifest has {} error{}",
                diagnostics.0.len(),
                if diagnostics.0.len() == 1 { "" } else { "s" }
            ));
            Ok(ExitCode::from(2))
        }
    }
}
