//! Splitting `run` commands into argv the way a POSIX shell would, without running a shell.

/// One word of a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Word {
    pub(crate) text: String,
    /// Whether any part of the word was quoted or escaped, so that `'|'` is an argument
    /// while a bare `|` is a shell operator.
    pub(crate) quoted: bool,
}

/// Splits like `sh` does for a simple command: whitespace separates words, `'...'` is literal,
/// `"..."` honours `\` before `$`, `` ` ``, `"`, `\` and newline, and an unquoted `\` escapes
/// the next character. Nothing is expanded: `$HOME`, `~` and `*` stay as written.
pub(crate) fn split_words(s: &str) -> Result<Vec<Word>, String> {
    let mut words = Vec::new();
    let mut current: Option<Word> = None;
    let mut chars = s.chars();

    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => words.extend(current.take()),
            '\'' => {
                let word = current.get_or_insert_with(Word::empty);
                word.quoted = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.text.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                let word = current.get_or_insert_with(Word::empty);
                word.quoted = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('$' | '`' | '"' | '\\')) => word.text.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.text.push('\\');
                                word.text.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => word.text.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                // A backslash-newline is a line continuation, not part of any word.
                Some('\n') => {}
                Some(c) => {
                    let word = current.get_or_insert_with(Word::empty);
                    word.quoted = true;
                    word.text.push(c);
                }
                None => return Err("trailing backslash escapes nothing".into()),
            },
            c => current.get_or_insert_with(Word::empty).text.push(c),
        }
    }
    words.extend(current);
    Ok(words)
}

impl Word {
    fn empty() -> Self {
        Self {
            text: String::new(),
            quoted: false,
        }
    }

    /// A bare word that a shell would treat as a pipe, list or redirection operator.
    pub(crate) fn is_shell_operator(&self) -> bool {
        !self.quoted
            && (self.text.starts_with(['|', '&', ';', '<', '>'])
                || self.text.starts_with("2>")
                || self.text.starts_with("1>"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split_command;

    fn split(s: &str) -> Vec<String> {
        match split_command(s) {
            Ok(words) => words,
            Err(e) => panic!("{s:?} should split, got {e}"),
        }
    }

    #[test]
    fn whitespace_separates_words() {
        assert_eq!(
            split("  python3   catalog.py\t--port 80\n"),
            ["python3", "catalog.py", "--port", "80"]
        );
        assert!(split("").is_empty());
        assert!(split("   ").is_empty());
    }

    #[test]
    fn single_quotes_are_literal() {
        assert_eq!(
            split(r#"echo 'a b' 'it''s' '$HOME \n "x"'"#),
            ["echo", "a b", "its", r#"$HOME \n "x""#]
        );
    }

    #[test]
    fn double_quotes_only_escape_special_characters() {
        assert_eq!(
            split(r#"echo "a b" "say \"hi\"" "c:\dir" "\$x\\""#),
            ["echo", "a b", r#"say "hi""#, r"c:\dir", r"$x\"]
        );
    }

    #[test]
    fn backslash_escapes_outside_quotes() {
        assert_eq!(
            split(r"touch my\ file a\'b \\"),
            ["touch", "my file", "a'b", r"\"]
        );
        assert_eq!(split("one \\\ntwo"), ["one", "two"]);
    }

    #[test]
    fn adjacent_pieces_join_into_one_word() {
        assert_eq!(split(r#"--name="a b"'c'd"#), ["--name=a bcd"]);
    }

    #[test]
    fn empty_quotes_make_an_empty_argument() {
        assert_eq!(split(r#"prog '' """#), ["prog", "", ""]);
    }

    #[test]
    fn nothing_is_expanded() {
        assert_eq!(split("ls ~ *.py $HOME"), ["ls", "~", "*.py", "$HOME"]);
    }

    #[test]
    fn unbalanced_quotes_are_errors() {
        assert_eq!(
            split_command("echo 'oops").unwrap_err(),
            "unterminated single quote"
        );
        assert_eq!(
            split_command(r#"echo "oops"#).unwrap_err(),
            "unterminated double quote"
        );
        assert_eq!(
            split_command(r#"echo "oops\"#).unwrap_err(),
            "unterminated double quote"
        );
        assert_eq!(
            split_command("echo \\").unwrap_err(),
            "trailing backslash escapes nothing"
        );
    }

    #[test]
    fn only_bare_operators_are_shell_operators() {
        let words = split_words(r"a | '|' \| >log 2>&1 x>y").expect("splits");
        let flagged: Vec<&str> = words
            .iter()
            .filter(|w| w.is_shell_operator())
            .map(|w| w.text.as_str())
            .collect();
        assert_eq!(flagged, ["|", ">log", "2>&1"]);
    }
}
