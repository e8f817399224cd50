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

/// Redaction settings: the built-in lists plus what the config adds
/// (borrowed from the config).
#[derive(Clone, Copy, Debug, Default)]
pub struct Redactor<'a> {
    /// Extra header names (lowercase) never to record.
    pub extra_headers: &'a [String],
    /// Extra query words to treat as secret.
    pub extra_query_words: &'a [String],
}

impl Redactor<'_> {
    /// Whether a header's value must never be recorded.
    pub fn is_secret_header(&self, name: &str) -> bool {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.is_secret_lowercase_header(&name.to_ascii_lowercase());
        }
        self.is_secret_lowercase_header(name)
    }

    fn is_secret_lowercase_header(&self, name: &str) -> bool {
        SECRET_HEADERS.contains(&name) || self.extra_headers.iter().any(|h| h == name)
    }

    fn is_secret_key(&self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        SECRET_QUERY_WORDS.iter().any(|w| key.contains(w))
            || self
                .extra_query_words
                .iter()
                .any(|w| key.contains(w.as_str()))
    }

    /// `path?query` with the values of secret-looking keys redacted, and
    /// token-shaped text anywhere in it (a path can carry one too:
    /// `/invite/eyJ...`, `/hooks/xoxb-...`) replaced.
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
        scrub_owned(out)
    }

    /// Headers worth keeping as evidence, never a secret one.
    pub fn headers(
        &self,
        headers: &HeaderMap,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<(String, String)> {
        headers
            .iter()
            // Header names are lowercase in a `HeaderMap`.
            .filter(|(name, _)| {
                keep(name.as_str()) && !self.is_secret_lowercase_header(name.as_str())
            })
            .take(32)
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes());
                (name.as_str().to_owned(), scrub_owned(clean(&value, 512)))
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

/// [`scrub`] on a string we own: returned as it is when it holds no token.
pub fn scrub_owned(text: String) -> String {
    let replaced = match token_patterns().replace_all(&text, REDACTED) {
        std::borrow::Cow::Owned(replaced) => Some(replaced),
        std::borrow::Cow::Borrowed(_) => None,
    };
    replaced.unwrap_or(text)
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
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        assert_eq!(
            r.url(&format!("/invite/{jwt}/accept"), None),
            "/invite/[redacted]/accept"
        );
        let slack = "xoxb-123456789012-abcdefghijkl";
        assert!(!r.url(&format!("/hooks/{slack}"), None).contains("xoxb"));
        let words = ["tenant".to_owned()];
        let r = Redactor {
            extra_query_words: &words,
            ..Redactor::default()
        };
        assert_eq!(r.url("/a", Some("tenant=acme")), "/a?tenant=[redacted]");
    }

    #[test]
    fn secret_headers_are_known_in_any_case() {
        let extra = ["x-tenant-key".to_owned()];
        let r = Redactor {
            extra_headers: &extra,
            ..Redactor::default()
        };
        for name in [
            "authorization",
            "Authorization",
            "SET-COOKIE",
            "x-tenant-key",
            "X-Tenant-Key",
        ] {
            assert!(r.is_secret_header(name), "{name}");
        }
        assert!(!r.is_secret_header("www-authenticate"));
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant-key", "k".parse().unwrap());
        headers.insert("x-request-id", "r1".parse().unwrap());
        let kept = r.headers(&headers, |_| true);
        assert_eq!(kept, vec![("x-request-id".to_owned(), "r1".to_owned())]);
    }

    #[test]
    fn tokens_are_scrubbed_from_text() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        let text = format!("invalid token {jwt} for Authorization: Bearer abcdefgh12345678");
        let out = scrub(&text);
        assert!(!out.contains("eyJ"), "{out}");
        assert!(!out.contains("abcdefgh12345678"), "{out}");
        assert!(scrub("key AKIAIOSFODNN7EXAMPLE").contains(REDACTED));
        assert_eq!(scrub_owned(text.clone()), out);
        assert_eq!(scrub_owned("nothing secret".to_owned()), "nothing secret");
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
