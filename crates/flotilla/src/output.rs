//! Terminal output: colours only on a terminal, data on stdout, messages on stderr.

use std::io::IsTerminal;
use std::sync::OnceLock;

use flotilla_telemetry::{LogRecord, Stream};

pub fn stdout_is_terminal() -> bool {
    static TERMINAL: OnceLock<bool> = OnceLock::new();
    *TERMINAL
        .get_or_init(|| std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
}

pub fn stderr_is_terminal() -> bool {
    static TERMINAL: OnceLock<bool> = OnceLock::new();
    *TERMINAL
        .get_or_init(|| std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
}

const RESET: &str = "\x1b[0m";
const BOLD_RED: &str = "\x1b[1;31m";
const DIM: &str = "\x1b[2m";
/// Distinct, readable colours for service prefixes, assigned by a hash of the name so a service
/// keeps its colour from run to run.
const PALETTE: [&str; 6] = [
    "\x1b[36m", "\x1b[32m", "\x1b[33m", "\x1b[35m", "\x1b[34m", "\x1b[96m",
];

fn colour_of(name: &str) -> &'static str {
    let hash = name
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    PALETTE[hash % PALETTE.len()]
}

/// `error: ...` on stderr, red on a terminal.
pub fn error(message: &str) {
    if stderr_is_terminal() {
        eprintln!("{BOLD_RED}error{RESET}: {message}");
    } else {
        eprintln!("error: {message}");
    }
}

/// A progress or status message on stderr.
pub fn note(message: &str) {
    eprintln!("{message}");
}

/// One captured line as `service/instance | line`, aligned to `width`.
pub fn log_line(record: &LogRecord, width: usize, with_time: bool) -> String {
    let prefix = format!("{}/{}", record.service, record.instance);
    let time = if with_time {
        format!("{} ", humantime::format_rfc3339_millis(record.time))
    } else {
        String::new()
    };
    if stdout_is_terminal() {
        let colour = colour_of(&record.service);
        let line = match record.stream {
            Stream::System => format!("{DIM}{}{RESET}", record.line),
            _ => record.line.clone(),
        };
        format!("{DIM}{time}{RESET}{colour}{prefix:<width$}{RESET} | {line}")
    } else {
        format!("{time}{prefix:<width$} | {}", record.line)
    }
}

/// Formats seconds as `3m12s` / `2h05m` / `4d03h`.
pub fn uptime(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Left-aligned columns, each as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (cell, width) in cells.zip(&widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(&mut header.iter().copied());
    for row in rows {
        push_row(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_naturally() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(192), "3m12s");
        assert_eq!(uptime(7_500), "2h05m");
        assert_eq!(uptime(2 * 86_400 + 3 * 3600), "2d03h");
    }

    #[test]
    fn tables_align_columns() {
        let rendered = table(
            &["NAME", "STATE"],
            &[
                vec!["catalog".into(), "running".into()],
                vec!["a".into(), "x".into()],
            ],
        );
        assert_eq!(rendered, "NAME     STATE\ncatalog  running\na        x\n");
    }
}
