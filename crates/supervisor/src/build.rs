//! Running the services' `build` commands before anything starts.

use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use flotilla_manifest::{Manifest, Service};
use tokio::process::Command;

use crate::lines::LineReader;
use crate::{BuildProgress, Error, Result, sys};

/// Each distinct build command with the services that share it, in order of first appearance.
pub(crate) fn group(services: &[Service]) -> Vec<(String, Vec<Arc<str>>)> {
    let mut groups: Vec<(String, Vec<Arc<str>>)> = Vec::new();
    for service in services {
        let Some(command) = service.build.as_deref().map(str::trim) else {
            continue;
        };
        if command.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(c, _)| c == command) {
            Some((_, names)) => names.push(service.name.clone()),
            None => groups.push((command.to_owned(), vec![service.name.clone()])),
        }
    }
    groups
}

pub(crate) async fn run_all(manifest: &Manifest, progress: &dyn BuildProgress) -> Result<()> {
    for (command, services) in group(&manifest.services) {
        progress.started(&services, &command);
        let began = tokio::time::Instant::now();
        let result = run_one(&manifest.dir, &command, &services, progress).await;
        let ok = matches!(&result, Ok((status, _)) if status.success());
        progress.finished(&services, ok, began.elapsed());
        let (status, output) = result.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run the build command `{command}`: {e}"),
            )
        })?;
        if !status.success() {
            return Err(Error::Build {
                services,
                command,
                status,
                output,
            });
        }
    }
    Ok(())
}

/// Kills the build's whole process group if the build is abandoned (its future dropped, e.g. on
/// Ctrl-C): `kill_on_drop` alone would only reach `sh`, not the compiler it started.
struct GroupGuard {
    pgid: Option<u32>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = sys::signal_group(pgid, libc::SIGKILL);
        }
    }
}

async fn run_one(
    dir: &Path,
    command: &str,
    services: &[Arc<str>],
    progress: &dyn BuildProgress,
) -> io::Result<(ExitStatus, String)> {
    let mut child = {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own group, like the services: a terminal Ctrl-C reaches Flotilla, which then
            // decides what to stop.
            .process_group(0);
        sys::die_with_parent(&mut cmd);
        cmd.spawn()?
    };
    let mut guard = GroupGuard { pgid: child.id() };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("the build's output pipes are missing"));
    };

    let mut stdout = LineReader::new(stdout);
    let mut stderr = LineReader::new(stderr);
    let (mut stdout_open, mut stderr_open) = (true, true);
    let mut output = String::new();
    while stdout_open || stderr_open {
        let (from_stdout, line) = tokio::select! {
            line = stdout.next_line(), if stdout_open => (true, line),
            line = stderr.next_line(), if stderr_open => (false, line),
        };
        match line {
            Ok(Some(line)) => {
                progress.output_line(services, &line);
                output.push_str(&line);
                output.push('\n');
            }
            // A read error is treated like the end: the exit status is what decides.
            Ok(None) | Err(_) if from_stdout => stdout_open = false,
            Ok(None) | Err(_) => stderr_open = false,
        }
    }
    let status = child.wait().await?;
    // Finished: whatever it left running on purpose (a build daemon) is not ours to kill.
    guard.pgid = None;
    Ok((status, output))
}
