//! Config errors that say where and what: `file:line:column: message`, the
//! offending line with a caret under it, and a "did you mean" when a name is
//! close to a known one.

use std::fmt;
use std::path::PathBuf;

/// Why a config could not be loaded. Nothing of a bad config is ever used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than a config file can reasonably be.
    #[error("{name}: the config is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// The file name.
        name: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The path is not a regular file (a FIFO or a device would block or
    /// never end; a directory has no text).
    #[error("cannot read config file {}: not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The YAML is malformed or a value is wrong.
    #[error("{0}")]
    Invalid(Box<Located>),
}

impl ConfigError {
    /// Line and column (1-based) of the problem, when known.
    pub fn location(&self) -> Option<(u64, u64)> {
        match self {
            ConfigError::Invalid(l) if l.line > 0 => Some((l.line, l.column)),
            _ => None,
        }
    }

    /// What is wrong, without the location and snippet.
    pub fn message(&self) -> String {
        match self {
            ConfigError::Invalid(l) => l.message.clone(),
            other => other.to_string(),
        }
    }
}

/// A problem at a place in the config source.
#[derive(Debug)]
pub struct Located {
    /// The file name, or `<config>` for a string.
    pub source: String,
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
    /// What is wrong and what to do.
    pub message: String,
    snippet: String,
}

impl Located {
    pub(crate) fn new(source: &str, text: &str, line: u64, column: u64, message: String) -> Self {
        Self {
            source: source.to_owned(),
            line,
            column,
            message,
            snippet: snippet(text, line, column),
        }
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // No place in the file (a problem of the config as a whole).
            return write!(f, "{}: {}", self.source, self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.source, self.line, self.column, self.message
        )?;
        if !self.snippet.is_empty() {
            write!(f, "\n{}", self.snippet)?;
        }
        Ok(())
    }
}

/// The source line with a caret under the column.
fn snippet(text: &str, line: u64, column: u64) -> String {
    if line == 0 {
        return String::new();
    }
    let Some(source_line) = text.lines().nth(line.saturating_sub(1) as usize) else {
        return String::new();
    };
    let source_line = crate::escape::clean_prose(source_line, 200);
    let number = line.to_string();
    let pad = " ".repeat(number.len());
    let caret_at = " ".repeat(column.saturating_sub(1).min(200) as usize);
    format!("{pad} |\n{number} | {source_line}\n{pad} | {caret_at}^")
}

/// The known name closest to `word`, if it is close enough to be a typo.
pub fn suggest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    known
        .iter()
        .map(|k| (levenshtein(word, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Adds a "did you mean" to serde's "unknown field `x`, expected one of a, b"
/// and "unknown variant" messages.
pub(crate) fn with_suggestion(message: String) -> String {
    let Some(rest) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
    else {
        return message;
    };
    let Some((word, tail)) = rest.split_once('`') else {
        return message;
    };
    let expected = tail
        .trim_start_matches(", expected one of ")
        .trim_start_matches(", expected ")
        .trim_start_matches(", there are no fields");
    let known: Vec<&str> = expected
        .split(',')
        .map(|s| s.trim().trim_matches('`'))
        .filter(|s| !s.is_empty())
        .collect();
    match suggest(word, &known) {
        Some(s) => format!("{message} (did you mean `{s}`?)"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let known = ["title", "detail", "match", "methods"];
        assert_eq!(suggest("titel", &known), Some("title"));
        assert_eq!(suggest("metods", &known), Some("methods"));
        assert_eq!(suggest("zzzzzz", &known), None);
    }

    #[test]
    fn adds_did_you_mean_to_serde_messages() {
        let m = with_suggestion("unknown field `titel`, expected one of id, title, match".into());
        assert!(m.ends_with("(did you mean `title`?)"), "{m}");
        let m = with_suggestion("invalid u16".into());
        assert_eq!(m, "invalid u16");
    }

    #[test]
    fn display_shows_location_and_caret() {
        let l = Located::new("a.yaml", "x: 1\ny: 2\n", 2, 4, "bad value".into());
        let s = l.to_string();
        assert!(s.starts_with("a.yaml:2:4: bad value"), "{s}");
        assert!(s.contains("2 | y: 2"), "{s}");
        assert!(s.ends_with("  |    ^"), "{s:?}");
    }
}
