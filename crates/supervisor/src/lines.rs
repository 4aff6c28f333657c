//! Reading a child's output line by line without trusting it: any bytes, any line length.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Longer lines are cut here: one runaway line (a binary blob, a minified bundle) must not eat
/// the memory the log store budgets for thousands of ordinary ones.
pub(crate) const MAX_LINE: usize = 64 * 1024;

pub(crate) struct LineReader<R> {
    reader: BufReader<R>,
    /// The line read so far; kept here (not in `next_line`) so `next_line` is cancel-safe.
    line: Vec<u8>,
    /// Bytes of the current line beyond `MAX_LINE`, skipped.
    dropped: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(reader: R) -> Self {
        Self {
            reader: BufReader::new(reader),
            line: Vec::new(),
            dropped: 0,
        }
    }

    /// The next line without its line ending, invalid UTF-8 replaced; `None` at end of input.
    ///
    /// Cancel-safe: dropping the future loses nothing, the next call carries on.
    pub(crate) async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if self.line.is_empty() && self.dropped == 0 {
                    return Ok(None);
                }
                return Ok(Some(self.take_line()));
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let content = &available[..newline.unwrap_or(available.len())];
            let room = MAX_LINE.saturating_sub(self.line.len());
            let kept = content.len().min(room);
            self.line.extend_from_slice(&content[..kept]);
            self.dropped += content.len() - kept;
            let used = newline.map_or(available.len(), |i| i + 1);
            self.reader.consume(used);
            if newline.is_some() {
                return Ok(Some(self.take_line()));
            }
        }
    }

    fn take_line(&mut self) -> String {
        if self.line.last() == Some(&b'\r') && self.dropped == 0 {
            self.line.pop();
        }
        let mut text = String::from_utf8_lossy(&self.line).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!(" [… {} more bytes]", self.dropped));
        }
        self.line.clear();
        self.dropped = 0;
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<String> {
        let mut reader = LineReader::new(input);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await.expect("in-memory read") {
            lines.push(line);
        }
        lines
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_an_unterminated_last_one() {
        assert_eq!(lines(b"a\r\nb\n\nc").await, ["a", "b", "", "c"]);
        assert!(lines(b"").await.is_empty());
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced() {
        assert_eq!(lines(b"caf\xe9\n").await, ["caf\u{fffd}"]);
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let mut input = vec![b'x'; MAX_LINE + 10];
        input.extend_from_slice(b"\nnext\n");
        let lines = lines(&input).await;
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&"x".repeat(MAX_LINE)));
        assert!(
            lines[0].ends_with(" [… 10 more bytes]"),
            "{}",
            &lines[0][MAX_LINE..]
        );
        assert_eq!(lines[1], "next");
    }
}
