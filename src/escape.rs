//! Making reflected values inert.
//!
//! Two steps, applied in this order wherever a value that came from a request,
//! a response or a config file is shown to anyone:
//!
//! 1. [`clean`]: when the value is captured, control characters (CR, LF, NUL,
//!    ESC, DEL, …) and bidirectional overrides are replaced and the length is
//!    capped, so that one value is always one line of bounded size in every
//!    output, log and event.
//! 2. Per output format at render time: [`html`] for the HTML page; JSON
//!    escaping comes from `serde_json`; text needs nothing more than step 1.

use std::fmt::Write as _;

/// The most characters of a reflected value that are ever shown.
pub const MAX_REFLECTED_CHARS: usize = 256;

/// Replaces characters that could break a line, a terminal or a reader's
/// understanding of the text, and caps the length at `max_chars` characters
/// (an ellipsis marks the cut).
pub fn clean(value: &str, max_chars: usize) -> String {
    let mut out = String::new();
    clean_into(&mut out, value, max_chars);
    out
}

/// [`clean`], appending to `out`.
pub fn clean_into(out: &mut String, value: &str, max_chars: usize) {
    // The usual value: printable ASCII within the cap, nothing to replace.
    if value.len() <= max_chars && value.bytes().all(|b| matches!(b, b' '..=b'~')) {
        out.push_str(value);
        return;
    }
    out.reserve(value.len().min(max_chars.saturating_mul(4)));
    for (n, c) in value.chars().enumerate() {
        if n == max_chars {
            out.push('…');
            break;
        }
        if c.is_control() || is_bidi_control(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
}

/// Like [`clean`] for prose such as a body excerpt or a line of a file,
/// where line breaks and tabs are ordinary: each becomes one space (so a
/// caret under the text stays aligned); other control characters are still
/// shown escaped.
pub fn clean_prose(value: &str, max_chars: usize) -> String {
    if !value.contains(['\n', '\r', '\t']) {
        return clean(value, max_chars);
    }
    let spaced: String = value
        .chars()
        .map(|c| {
            if matches!(c, '\n' | '\r' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect();
    clean(&spaced, max_chars)
}

/// Like [`clean`] for raw bytes (headers, bodies): invalid UTF-8 becomes U+FFFD.
pub fn clean_bytes(value: &[u8], max_chars: usize) -> String {
    clean(&String::from_utf8_lossy(value), max_chars)
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

/// Escapes text for HTML element content and double-quoted attribute values.
pub fn html(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_makes_one_bounded_line() {
        assert_eq!(clean("a\r\nb", 10), "a\\u{d}\\u{a}b");
        assert_eq!(clean("x\u{1b}[31m", 10), "x\\u{1b}[31m");
        assert_eq!(clean("evil\u{202E}txt", 10), "evil\\u{202e}txt");
        assert_eq!(clean("abcdef", 3), "abc…");
        assert_eq!(clean("héllo", 256), "héllo");
        assert_eq!(clean("plain ascii ~", 13), "plain ascii ~");
        assert_eq!(clean("plain ascii ~", 12), "plain ascii …");
        assert_eq!(clean("tab\there", 20), "tab\\u{9}here");
        assert_eq!(
            clean_prose("Forbidden\r\n\tby\u{1b}", 40),
            "Forbidden   by\\u{1b}"
        );
        assert_eq!(clean("del\u{7f}", 20), "del\\u{7f}");
        let mut out = String::from("a: ");
        clean_into(&mut out, "b\nc", 10);
        assert_eq!(out, "a: b\\u{a}c");
    }

    #[test]
    fn clean_bytes_survives_invalid_utf8() {
        assert_eq!(clean_bytes(b"ok\xff", 10), "ok\u{fffd}");
    }

    #[test]
    fn html_escapes_every_markup_character() {
        let mut out = String::new();
        html("<script>alert('x' & \"y\")</script>", &mut out);
        assert_eq!(
            out,
            "&lt;script&gt;alert(&#39;x&#39; &amp; &quot;y&quot;)&lt;/script&gt;"
        );
    }
}
