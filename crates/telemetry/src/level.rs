//! What a log line says about itself: its severity and the trace it belongs to.
//!
//! Services log in every format there is; these are read without configuration:
//! JSON lines (`{"level":"warn","trace_id":"…"}`, also `severity`, `lvl`, `traceId`, `trace.id`),
//! logfmt (`level=warn trace_id=…`), and text with the level as a word near the start
//! (`2026-01-01T00:00:00Z ERROR …`, `[warn] …`, `W0101 …` is not guessed). A W3C `traceparent`
//! anywhere in the line also gives the trace id.

use serde::{Deserialize, Serialize};

use crate::TraceId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    /// Reads the usual spellings, case-insensitively: `warn`/`warning`, `err`/`error`/`fatal`/
    /// `critical`/`panic`, `information`.
    pub fn parse(word: &str) -> Option<Self> {
        let word = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        if word.len() > 11 {
            return None;
        }
        Some(match word.to_ascii_lowercase().as_str() {
            "trace" | "trc" => Level::Trace,
            "debug" | "dbg" => Level::Debug,
            "info" | "information" | "notice" | "inf" => Level::Info,
            "warn" | "warning" | "wrn" => Level::Warn,
            "error" | "err" | "fatal" | "critical" | "crit" | "panic" | "alert" | "emerg" => {
                Level::Error
            }
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const LEVEL_KEYS: [&str; 4] = ["level", "severity", "lvl", "loglevel"];
const TRACE_KEYS: [&str; 4] = ["trace_id", "traceid", "trace.id", "trace-id"];

/// The level and trace id a line carries, when it carries them.
pub fn classify(line: &str) -> (Option<Level>, Option<TraceId>) {
    let trimmed = line.trim_start();
    if trimmed.starts_with('{') {
        if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(trimmed) {
            let text = |keys: &[&str]| {
                fields.iter().find_map(|(key, value)| {
                    keys.iter()
                        .any(|k| key.eq_ignore_ascii_case(k))
                        .then(|| value.as_str())
                        .flatten()
                })
            };
            let level = text(&LEVEL_KEYS).and_then(Level::parse);
            let trace = text(&TRACE_KEYS).and_then(TraceId::parse);
            return (level, trace.or_else(|| traceparent_in(line)));
        }
    }
    let mut level = None;
    let mut trace = None;
    for (position, word) in line.split_ascii_whitespace().enumerate() {
        match word.split_once('=') {
            Some((key, value)) => {
                let value = value.trim_matches('"');
                if level.is_none() && LEVEL_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k)) {
                    level = Level::parse(value);
                } else if trace.is_none() && TRACE_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k))
                {
                    trace = TraceId::parse(value);
                }
            }
            // A bare level word counts only near the start, where loggers put it, so "no error"
            // in a message is not an error.
            None if level.is_none() && position < 3 => level = Level::parse(word),
            None => {}
        }
    }
    (level, trace.or_else(|| traceparent_in(line)))
}

/// The trace id of a `00-<trace>-<span>-<flags>` anywhere in the line.
fn traceparent_in(line: &str) -> Option<TraceId> {
    let at = line.find("00-")?;
    let rest = &line[at + 3..];
    let candidate = rest.get(..32)?;
    (rest.as_bytes().get(32) == Some(&b'-'))
        .then(|| TraceId::parse(candidate))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn json_lines() {
        let (level, trace) = classify(&format!(
            r#"{{"level":"WARNING","msg":"slow","trace_id":"{ID}"}}"#
        ));
        assert_eq!(level, Some(Level::Warn));
        assert_eq!(trace.map(|t| t.to_string()).as_deref(), Some(ID));
        let (level, trace) = classify(r#"{"severity":"error","traceId":"nope"}"#);
        assert_eq!((level, trace), (Some(Level::Error), None));
    }

    #[test]
    fn logfmt_and_text() {
        let (level, trace) = classify(&format!("time=1 level=debug msg=\"x\" trace_id={ID}"));
        assert_eq!(level, Some(Level::Debug));
        assert!(trace.is_some());
        assert_eq!(
            classify("2026-11-29T10:00:00Z ERROR payments down").0,
            Some(Level::Error)
        );
        assert_eq!(classify("[warn] disk almost full").0, Some(Level::Warn));
        assert_eq!(classify("INFO: started").0, Some(Level::Info));
        assert_eq!(classify("POST /orders 201 3ms").0, None);
        assert_eq!(
            classify("request finished without error or warning, all good").0,
            None,
            "level words late in a message are prose"
        );
        let (_, trace) = classify(&format!("GET /x 200 1ms trace_id={ID}"));
        assert_eq!(trace.map(|t| t.to_string()).as_deref(), Some(ID));
    }

    #[test]
    fn a_traceparent_anywhere() {
        let (_, trace) = classify(&format!(
            "calling inventory with traceparent 00-{ID}-00f067aa0ba902b7-01"
        ));
        assert_eq!(trace.map(|t| t.to_string()).as_deref(), Some(ID));
        assert_eq!(classify("00-short-00f067aa0ba902b7-01").1, None);
    }
}
