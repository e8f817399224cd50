//! What never leaves whydenied: credentials, cookies, tokens and
//! secret-looking query values are removed from everything an event carries.
//! Every value is also cleaned of control characters, so one event is always
//! one line.

use http::HeaderMap;
use regex::Regex;
use std::sync::OnceLock;

use crate::escape::clean;

/// Request and response headers that never appear anywhere.
pub const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-xsrf-token",
];

/// Query keys whose values are replaced by `[redacted]` (matched as
/// case-insensitive substrings: `access_token`, `apiKey`, `client_secret`, ...).
pub const SECRET_QUERY_WORDS: &[&str] = &[
    "token",
    "key",
    "secret",
    "password",
    "passwd",
    "pwd",
    "signature",
    "sig",
    "code",
    "auth",
    "session",
    "credential",
    "jwt",
    "assertion",
    "otp",
];

/// The replacement text.
pub const REDACTED: &str = "[redacted]";

/// Redaction settings: the built-in lists plus what the config adds.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Extra header names (lowercase) never to record.
    pub extra_headers: Vec<String>,
    /// Extra query words to treat as secret.
    pub extra_query_words: Vec<String>,
}

impl Redactor {
    /// Whether a header's value must never be recorded.
    pub fn is_secret_header(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        SECRET_HEADERS.contains(&name.as_str()) || self.extra_headers.contains(&name)
    }

    fn is_secret_key(&self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        SECRET_QUERY_WORDS.iter().any(|w| key.contains(w))
            || self
                .extra_query_words
                .iter()
                .any(|w| key.contains(w.as_str()))
    }

    /// `path?query` with the values of secret-looking keys redacted.
    pub fn url(&self, path: &str, query: Option<&str>) -> String {
        let mut out = clean(path, 2048);
        if let Some(query) = query {
            out.push('?');
            let parts: Vec<String> = query
                .split('&')
                .take(64)
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) if self.is_secret_key(k) || looks_like_token(v) => {
                        format!("{k}={REDACTED}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&clean(&parts.join("&"), 2048));
        }
        out
    }

    /// Headers worth keeping as evidence, never a secret one.
    pub fn headers(
        &self,
        headers: &HeaderMap,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<(String, String)> {
        headers
            .iter()
            .filter(|(name, _)| keep(name.as_str()) && !self.is_secret_header(name.as_str()))
            .take(32)
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes());
                (name.as_str().to_owned(), scrub(&clean(&value, 512)))
            })
            .collect()
    }
}

fn token_patterns() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(concat!(
            // Bearer / Basic / token schemes and what follows.
            r"(?i)\b(bearer|basic|token|apikey|api-key)(\s+|=|:\s*)[A-Za-z0-9\-._~+/]{8,}=*",
            // JWT-shaped: three base64url segments, the first two starting like JSON.
            r"|\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
            // Common key formats: GitHub, Slack, AWS access keys, Stripe-like.
            r"|\b(gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|sk_(live|test)_[A-Za-z0-9]{10,})",
        ))
        .expect("the token patterns compile")
    })
}

fn looks_like_token(value: &str) -> bool {
    token_patterns().is_match(value)
}

/// Removes bearer tokens, JWT-shaped strings and well-known key formats.
pub fn scrub(text: &str) -> String {
    token_patterns().replace_all(text, REDACTED).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_values_are_redacted() {
        let r = Redactor::default();
        assert_eq!(
            r.url("/cb", Some("code=abc&state=xyz&access_token=t0k3n&page=2")),
            "/cb?code=[redacted]&state=xyz&access_token=[redacted]&page=2"
        );
        assert_eq!(r.url("/a", None), "/a");
        let r = Redactor {
            extra_query_words: vec!["tenant".into()],
            ..Redactor::default()
        };
        assert_eq!(r.url("/a", Some("tenant=acme")), "/a?tenant=[redacted]");
    }

    #[test]
    fn tokens_are_scrubbed_from_text() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        let text = format!("invalid token {jwt} for Authorization: Bearer abcdefgh12345678");
        let out = scrub(&text);
        assert!(!out.contains("eyJ"), "{out}");
        assert!(!out.contains("abcdefgh12345678"), "{out}");
        assert!(scrub("key AKIAIOSFODNN7EXAMPLE").contains(REDACTED));
    }

    #[test]
    fn secret_headers_are_never_kept() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer x".parse().unwrap());
        h.insert(
            "www-authenticate",
            "Bearer error=\"invalid_token\"".parse().unwrap(),
        );
        h.insert("set-cookie", "s=1".parse().unwrap());
        let kept = Redactor::default().headers(&h, |_| true);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, "www-authenticate");
    }
}
