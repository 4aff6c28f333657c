//! Error reports that point at a place in the manifest.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a manifest, located by file, line and column.
///
/// Displays as `file:line:col: error: message`, followed by `  help: ...` when there is a hint.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, counted in characters (not bytes).
    pub column: usize,
    pub message: String,
    /// A suggested fix, when one can be given.
    pub help: Option<String>,
}

impl Diagnostic {
    /// Renders like `Display`, plus the offending source line with a caret under the column
    /// (the line is left out when `source` doesn't have it).
    pub fn render(&self, source: Option<&str>) -> String {
        let mut out = format!(
            "{}:{}:{}: error: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        );
        if let Some(text) = source.and_then(|s| s.lines().nth(self.line.saturating_sub(1))) {
            let number = self.line.to_string();
            let gutter = " ".repeat(number.len());
            // Tabs would shift the caret by a terminal-dependent amount; one space keeps it aligned.
            let text = text.replace('\t', " ");
            let pad = " ".repeat(self.column.saturating_sub(1));
            out.push_str(&format!(
                "\n{gutter} |\n{number} | {text}\n{gutter} | {pad}^"
            ));
        }
        if let Some(help) = &self.help {
            out.push_str("\n  help: ");
            out.push_str(help);
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(None))
    }
}

impl std::error::Error for Diagnostic {}

/// Every problem found in a manifest, in source order; never empty when returned as an error.
#[derive(Debug)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Renders every diagnostic with its source line and a caret, one block each.
    ///
    /// `source` is the manifest text all diagnostics refer to. With `None`, each diagnostic's
    /// file is read again from disk (which is what a caller of [`crate::load`] wants); a file
    /// that can't be read just loses its source lines.
    pub fn render(&self, source: Option<&str>) -> String {
        let mut files: BTreeMap<&Path, Option<String>> = BTreeMap::new();
        let blocks: Vec<String> = self
            .0
            .iter()
            .map(|d| match source {
                Some(source) => d.render(Some(source)),
                None => {
                    let text = files
                        .entry(&d.file)
                        .or_insert_with(|| std::fs::read_to_string(&d.file).ok());
                    d.render(text.as_deref())
                }
            })
            .collect();
        blocks.join("\n\n")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl<'a> IntoIterator for &'a Diagnostics {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Turns byte offsets into 1-based line and column numbers.
pub(crate) struct LineIndex<'a> {
    source: &'a str,
    /// Byte offset of the first character of every line.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(source: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { source, starts }
    }

    pub(crate) fn line_column(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.source.len());
        // Spans from the TOML parser sit on char boundaries, but a stray offset must not panic.
        while !self.source.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts[line - 1];
        let column = self.source[start..offset].chars().count() + 1;
        (line, column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(help: Option<&str>) -> Diagnostic {
        Diagnostic {
            file: PathBuf::from("examples/shop/flotilla.toml"),
            line: 2,
            column: 11,
            message: "unknown service `ordrs` in route".into(),
            help: help.map(String::from),
        }
    }

    #[test]
    fn display_has_location_message_and_help() {
        assert_eq!(
            diag(Some("known services are: catalog, orders")).to_string(),
            "examples/shop/flotilla.toml:2:11: error: unknown service `ordrs` in route\n  \
             help: known services are: catalog, orders"
        );
        assert_eq!(
            diag(None).to_string(),
            "examples/shop/flotilla.toml:2:11: error: unknown service `ordrs` in route"
        );
    }

    #[test]
    fn render_points_a_caret_at_the_column() {
        let source = "prefix = \"/api\"\nservice = \"ordrs\"\n";
        assert_eq!(
            diag(Some("did you mean `orders`?")).render(Some(source)),
            "examples/shop/flotilla.toml:2:11: error: unknown service `ordrs` in route\n  \
             |\n\
             2 | service = \"ordrs\"\n  \
             |           ^\n  \
             help: did you mean `orders`?"
        );
    }

    #[test]
    fn diagnostics_are_separated_by_blank_lines() {
        let all = Diagnostics(vec![diag(None), diag(None)]);
        let text = all.to_string();
        assert_eq!(text.matches("error:").count(), 2);
        assert!(text.contains("route\n\nexamples/"));
    }

    #[test]
    fn line_index_counts_characters_from_one() {
        let index = LineIndex::new("ab\néx = 1\n\nz");
        assert_eq!(index.line_column(0), (1, 1));
        assert_eq!(index.line_column(2), (1, 3));
        assert_eq!(index.line_column(3), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(index.line_column(5), (2, 2));
        assert_eq!(index.line_column(11), (3, 1));
        assert_eq!(index.line_column(12), (4, 1));
        assert_eq!(index.line_column(13), (4, 2));
        assert_eq!(index.line_column(999), (4, 2));
    }
}
