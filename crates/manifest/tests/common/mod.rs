//! What every manifest test file needs: parse valid text, or find exactly where it is wrong.

#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;

use flotilla_manifest::{Diagnostic, Diagnostics, Manifest, parse};

pub fn ok(source: &str) -> Manifest {
    match parse(source, Path::new("flotilla.toml")) {
        Ok(manifest) => manifest,
        Err(diagnostics) => panic!("expected a valid manifest, got:\n{diagnostics}"),
    }
}

pub fn errors(source: &str) -> Vec<Diagnostic> {
    match parse(source, Path::new("flotilla.toml")) {
        Ok(manifest) => panic!("expected errors, got {manifest:#?}"),
        Err(diagnostics) => {
            assert!(!diagnostics.is_empty());
            diagnostics.0
        }
    }
}

/// The one error `source` has, checked to be at `line`:`column` with `message`.
#[track_caller]
pub fn single_error(source: &str, line: usize, column: usize, message: &str) -> Diagnostic {
    let found = errors(source);
    assert_eq!(
        found.len(),
        1,
        "expected one error, got:\n{}",
        Diagnostics(found)
    );
    let error = found.into_iter().next().expect("one error");
    assert_eq!(
        (error.line, error.column, error.message.as_str()),
        (line, column, message),
        "\n{error}"
    );
    assert_eq!(error.file, Path::new("flotilla.toml"));
    error
}

pub fn help(error: &Diagnostic) -> &str {
    error.help.as_deref().unwrap_or("")
}
