//! Content negotiation on `Accept`, with q-values (RFC 9110 §12.5.1).
//!
//! Three formats are offered. For each, the most specific media range that
//! matches it gives its q-value; the highest wins, and ties go to
//! problem+json, then HTML, then text. Anything else (`*/*`, no header, an
//! unparsable header, only unknown types) gets problem+json.

use http::HeaderValue;

/// The format of an explanation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// `application/problem+json` (RFC 9457).
    ProblemJson,
    /// `text/html`: a page for people.
    Html,
    /// `text/plain`.
    Text,
}

/// At most this many media ranges are read from one `Accept` header.
const MAX_RANGES: usize = 64;

impl Negotiated {
    /// The `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Negotiated::ProblemJson => "application/problem+json",
            Negotiated::Html => "text/html; charset=utf-8",
            Negotiated::Text => "text/plain; charset=utf-8",
        }
    }

    /// Chooses a format for this `Accept` header.
    pub fn from_accept(accept: Option<&HeaderValue>) -> Self {
        Self::from_accept_bytes(accept.map(HeaderValue::as_bytes))
    }

    /// Chooses a format for the raw bytes of an `Accept` header.
    pub fn from_accept_bytes(accept: Option<&[u8]>) -> Self {
        let Some(accept) = accept.and_then(|v| std::str::from_utf8(v).ok()) else {
            return Negotiated::ProblemJson;
        };
        // (q in thousandths, specificity) for json, html, text.
        let mut best = [(0u16, 0u8); 3];
        for range in accept.split(',').take(MAX_RANGES) {
            let mut params = range.split(';');
            let media = params.next().unwrap_or("").trim();
            let Some((kind, sub)) = media.split_once('/') else {
                continue;
            };
            let mut q = 1000;
            for param in params {
                if let Some((k, v)) = param.split_once('=')
                    && k.trim().eq_ignore_ascii_case("q")
                {
                    q = parse_q(v.trim()).unwrap_or(0);
                }
            }
            for (i, (want_kind, want_subs)) in [
                ("application", &["problem+json", "json"][..]),
                ("text", &["html"][..]),
                ("text", &["plain"][..]),
            ]
            .iter()
            .enumerate()
            {
                let specificity = if kind == "*" && sub == "*" {
                    1
                } else if kind.eq_ignore_ascii_case(want_kind) && sub == "*" {
                    2
                } else if kind.eq_ignore_ascii_case(want_kind)
                    && want_subs.iter().any(|s| sub.eq_ignore_ascii_case(s))
                {
                    3
                } else {
                    continue;
                };
                // The most specific range decides; among equally specific ones, the highest q.
                if specificity > best[i].1 || (specificity == best[i].1 && q > best[i].0) {
                    best[i] = (q, specificity);
                }
            }
        }
        let [json, html, text] = best.map(|(q, _)| q);
        if json >= html && json >= text {
            Negotiated::ProblemJson
        } else if html >= text {
            Negotiated::Html
        } else {
            Negotiated::Text
        }
    }
}

/// A q-value in thousandths: `0`, `0.5`, `1`, `1.000`.
fn parse_q(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u16 = match int {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    let mut thousandths = 0u16;
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    let q = int * 1000 + thousandths;
    (q <= 1000).then_some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(accept: &str) -> Negotiated {
        Negotiated::from_accept(Some(&HeaderValue::from_str(accept).unwrap()))
    }

    #[test]
    fn browsers_get_html() {
        assert_eq!(
            pick("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            Negotiated::Html
        );
    }

    #[test]
    fn apis_and_tools_get_problem_json() {
        assert_eq!(Negotiated::from_accept(None), Negotiated::ProblemJson);
        assert_eq!(pick("*/*"), Negotiated::ProblemJson);
        assert_eq!(pick("application/json"), Negotiated::ProblemJson);
        assert_eq!(pick("application/problem+json"), Negotiated::ProblemJson);
        assert_eq!(pick("image/png"), Negotiated::ProblemJson);
        assert_eq!(pick("garbage"), Negotiated::ProblemJson);
    }

    #[test]
    fn text_when_preferred() {
        assert_eq!(pick("text/plain"), Negotiated::Text);
        assert_eq!(pick("text/html;q=0.5, text/plain"), Negotiated::Text);
        assert_eq!(
            pick("application/json;q=0.1, text/plain;q=0.9"),
            Negotiated::Text
        );
    }

    #[test]
    fn q_values_and_specificity() {
        // text/html excluded explicitly although text/* is welcome.
        assert_eq!(pick("text/*, text/html;q=0"), Negotiated::Text);
        assert_eq!(
            pick("text/html;q=0.9, application/json;q=0.95"),
            Negotiated::ProblemJson
        );
        assert_eq!(pick("TEXT/HTML"), Negotiated::Html);
        assert_eq!(pick("text/html;q=2"), Negotiated::ProblemJson);
        assert_eq!(pick("text/html;q=0.1234"), Negotiated::ProblemJson);
    }

    #[test]
    fn q_parsing() {
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.125"), Some(125));
        assert_eq!(parse_q("1.0"), Some(1000));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("-1"), None);
    }
}
