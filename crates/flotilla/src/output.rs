//! Terminal output: colours only on a terminal, data on stdout, messages on stderr.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
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

/// `warning: ...` on stderr, for what works but not as configured.
pub fn warn(message: &str) {
    eprintln!("warning: {message}");
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

/// Left-aligned columns under a header, each as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    columns(std::iter::once(&header).chain(rows))
}

/// Left-aligned columns, each as wide as its widest cell; cells may be coloured.
pub fn columns<'a>(rows: impl IntoIterator<Item = &'a Vec<String>> + Clone) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows.clone() {
        widths.resize(widths.len().max(row.len()), 0);
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(visible_width(cell));
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', width - visible_width(cell) + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Characters a terminal shows: colour escapes (`ESC [ ... m`) take no room.
fn visible_width(text: &str) -> usize {
    let mut width = 0;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            width += 1;
        }
    }
    width
}

/// `text` in red when `colour`, else as it is.
pub fn red(text: &str, colour: bool) -> String {
    paint(text, RED, colour)
}

/// `text` in green when `colour`.
pub fn green(text: &str, colour: bool) -> String {
    paint(text, GREEN, colour)
}

/// `text` in yellow when `colour`.
pub fn yellow(text: &str, colour: bool) -> String {
    paint(text, YELLOW, colour)
}

/// Health as a word, green, yellow or red when `colour`.
pub fn health(status: flotilla_control::HealthStatus, colour: bool) -> String {
    use flotilla_control::HealthStatus;
    let tint = match status {
        HealthStatus::Healthy => GREEN,
        HealthStatus::Degraded => YELLOW,
        HealthStatus::Down => RED,
    };
    paint(status.as_str(), tint, colour)
}

fn paint(text: &str, tint: &str, colour: bool) -> String {
    if colour {
        format!("{tint}{text}{RESET}")
    } else {
        text.to_owned()
    }
}

/// A latency in milliseconds as people read it: `850µs`, `3.2ms`, `12ms`, `1.25s`, `2m05s`.
pub fn millis(ms: f64) -> String {
    let fixed = if ms < 1.0 {
        format!("{:.0}µs", ms * 1000.0)
    } else if ms < 10.0 {
        format!("{ms:.1}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else if ms < 60_000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else {
        return uptime((ms / 1000.0) as u64);
    };
    // `3.0ms` says no more than `3ms`.
    fixed.replace(".0ms", "ms")
}

pub fn duration(d: Duration) -> String {
    millis(d.as_secs_f64() * 1000.0)
}

/// A time in the local time zone: `15:04:05.123` when it is today, else with the date.
pub fn local_time(t: SystemTime) -> String {
    let (Some(then), Some(today)) = (local(t), local(SystemTime::now())) else {
        // No time zone information: UTC, marked as such.
        return humantime::format_rfc3339_millis(t).to_string();
    };
    let millis = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_millis();
    let time = format!(
        "{:02}:{:02}:{:02}.{millis:03}",
        then.tm_hour, then.tm_min, then.tm_sec
    );
    if (then.tm_year, then.tm_yday) == (today.tm_year, today.tm_yday) {
        time
    } else {
        format!(
            "{}-{:02}-{:02} {time}",
            then.tm_year + 1900,
            then.tm_mon + 1,
            then.tm_mday
        )
    }
}

/// The broken-down local time, per the C library's time zone (`TZ`, `/etc/localtime`): the
/// standard library has no time zones, and the CLI needs this one conversion only.
fn local(t: SystemTime) -> Option<libc::tm> {
    let seconds = libc::time_t::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    #[allow(unsafe_code)]
    // SAFETY: `tm` is plain integers (and a pointer localtime_r sets to static data), for which
    // all zeros is a valid value; localtime_r writes only into the `tm` it is given and is
    // thread-safe, unlike localtime.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        (!libc::localtime_r(&seconds, &mut tm).is_null()).then_some(tm)
    }
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
    fn latencies_read_naturally() {
        assert_eq!(millis(0.85), "850µs");
        assert_eq!(millis(3.0), "3ms");
        assert_eq!(millis(3.24), "3.2ms");
        assert_eq!(millis(12.4), "12ms");
        assert_eq!(millis(1_250.0), "1.25s");
        assert_eq!(millis(125_000.0), "2m05s");
        assert_eq!(duration(Duration::from_micros(14_200)), "14ms");
    }

    #[test]
    fn local_times_are_short_today() {
        let now = local_time(SystemTime::now());
        assert_eq!(now.len(), "15:04:05.123".len(), "{now}");
        let long_ago = local_time(UNIX_EPOCH + Duration::from_secs(86_400 * 400));
        assert!(long_ago.starts_with("1971-02-"), "{long_ago}");
    }

    #[test]
    fn colour_takes_no_room_in_columns() {
        let rows = vec![
            vec![red("down", true), "x".into()],
            vec!["healthy".into(), "y".into()],
        ];
        let plain = columns(&rows).replace(RED, "").replace(RESET, "");
        assert_eq!(plain, "down     x\nhealthy  y\n");
        assert_eq!(red("down", false), "down");
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
