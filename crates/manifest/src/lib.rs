//! `flotilla.toml`: the manifest that describes a fleet of services, turned into a validated
//! [`Manifest`].
//!
//! [`load`] reads a manifest from disk and [`parse`] reads it from text. Both either return a
//! [`Manifest`] — its [`Service`]s in dependency order, its gateway [`Route`]s longest prefix
//! first, every duration and address already parsed — or [`Diagnostics`]: *every* problem found,
//! each a [`Diagnostic`] pointing at a file, line and column, with a suggested fix where one is
//! known. The rest of Flotilla only ever sees a manifest that passed all checks.
//!
//! [`parse_duration`] and [`split_command`] are the same helpers the manifest uses for durations
//! and `run` commands, exported so that the command line reads them the same way.

mod command;
mod diagnostic;
pub mod edge;
pub mod model;
mod parse;
mod suggest;
mod template;

use std::path::Path;
use std::time::Duration;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use edge::*;
pub use model::*;

/// The file [`load`] looks for when given a directory.
pub const MANIFEST_FILE: &str = "flotilla.toml";

/// Reads and validates a manifest.
///
/// `path` is either a directory (then `path/flotilla.toml` is read) or the manifest file itself.
/// The returned [`Manifest::dir`] is made absolute when possible, so services keep starting in
/// the right place whatever the current directory later becomes.
pub fn load(path: &Path) -> Result<Manifest, Diagnostics> {
    let file = if path.is_dir() {
        path.join(MANIFEST_FILE)
    } else {
        path.to_path_buf()
    };
    let source = std::fs::read_to_string(&file).map_err(|error| {
        Diagnostics(vec![Diagnostic {
            message: format!("cannot read {}: {error}", file.display()),
            file: file.clone(),
            line: 1,
            column: 1,
            help: Some(
                "run `flotilla check DIR` on a directory that holds a flotilla.toml".to_owned(),
            ),
        }])
    })?;
    let mut manifest = parse(&source, &file)?;
    if let Ok(dir) = manifest.dir.canonicalize() {
        manifest.dir = dir;
    }
    Ok(manifest)
}

/// Parses and validates manifest source text.
///
/// `path` is only used in diagnostics and to set [`Manifest::path`] and [`Manifest::dir`]
/// (its parent, or `.`); nothing is read from disk.
pub fn parse(source: &str, path: &Path) -> Result<Manifest, Diagnostics> {
    parse::parse(source, path)
}

/// Parses a duration like `"250ms"`, `"2s"`, `"1m30s"` or `"5m"` (humantime syntax).
///
/// The error is a full sentence naming the input, ready to show to a user.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse::duration(s).map_err(|reason| format!("invalid duration {s:?}: {reason}"))
}

/// Splits a command line into program and arguments like a POSIX shell would: whitespace
/// separates words, `'...'` is taken literally, `"..."` honours backslash before `$`, `` ` ``,
/// `"` and `\`, and a backslash outside quotes escapes the next character.
///
/// Nothing is expanded — `$VAR`, `~` and `*` are kept as written — and operators such as `|`
/// or `>` are ordinary words. Fails on an unterminated quote or a trailing backslash.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    Ok(command::split_words(s)?
        .into_iter()
        .map(|word| word.text)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        let error = parse_duration("5").unwrap_err();
        assert!(error.starts_with("invalid duration \"5\": "), "{error}");
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
