//! The built-in detectors: what the request and the upstream's answer say
//! about the cause, each finding with a likelihood and evidence a person can
//! check. The token is read (never verified, never echoed); so are
//! `WWW-Authenticate`, the rate-limit headers and the status.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};

use crate::escape::clean;
use crate::explanation::{Cause, CauseKind, Likelihood};
use crate::facts::RequestFacts;
use crate::policy::Upstream;
use crate::token;

/// Clock skew allowed before a token counts as expired.
const SKEW: Duration = Duration::from_secs(60);
/// The longest wait that is believed (one day).
const MAX_WAIT: u64 = 24 * 60 * 60;

fn cause(cause: CauseKind, likelihood: Likelihood, evidence: String) -> Cause {
    Cause {
        cause,
        likelihood,
        evidence: vec![evidence],
    }
}

/// A parsed `WWW-Authenticate` challenge (the first one).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Challenge {
    /// `Bearer`, `Basic`, ...
    pub scheme: String,
    /// Its parameters, names lowercased.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// A parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the first challenge of `WWW-Authenticate` (RFC 9110 §11.6.1).
pub fn challenge(headers: &HeaderMap) -> Option<Challenge> {
    let value = headers.get(http::header::WWW_AUTHENTICATE)?.to_str().ok()?;
    let value = value.trim();
    let (scheme, mut rest) = match value.split_once(' ') {
        Some((s, r)) => (s, r.trim()),
        None => (value, ""),
    };
    let mut params = Vec::new();
    while !rest.is_empty() && params.len() < 16 {
        let Some((name, after)) = rest.split_once('=') else {
            break;
        };
        let name = name
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (val, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, esc)) = chars.next() {
                            out.push(esc);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => out.push(c),
                }
            }
            (out, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.push((name, val));
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_owned(),
        params,
    })
}

/// Causes from the upstream's authentication challenge and the status.
pub fn authentication(facts: &RequestFacts, upstream: &Upstream<'_>, found: &mut Vec<Cause>) {
    let unauthorized = upstream.status == StatusCode::UNAUTHORIZED;
    let challenge = challenge(upstream.headers);
    let error = challenge.as_ref().and_then(|c| c.param("error"));
    let description = challenge
        .as_ref()
        .and_then(|c| c.param("error_description"))
        .map(|d| clean(d, 200));
    let said = |what: &str| match &description {
        Some(d) => format!("The upstream's WWW-Authenticate says error=\"{what}\": \"{d}\"."),
        None => format!("The upstream's WWW-Authenticate says error=\"{what}\"."),
    };
    match error {
        Some("invalid_token") => {
            let expired = description
                .as_deref()
                .is_some_and(|d| d.to_ascii_lowercase().contains("expired"));
            let kind = if expired {
                CauseKind::TokenExpired
            } else {
                CauseKind::TokenInvalid
            };
            found.push(cause(kind, Likelihood::High, said("invalid_token")));
        }
        Some("insufficient_scope") => {
            let mut evidence = said("insufficient_scope");
            if let Some(needed) = challenge.as_ref().and_then(|c| c.param("scope")) {
                evidence.push_str(&format!(
                    " It requires the scope(s) \"{}\".",
                    clean(needed, 200)
                ));
                if let Some(missing) = missing_scopes(facts, needed) {
                    evidence.push_str(&format!(
                        " The token (read without verifying it) lacks: {}.",
                        clean(&missing.join(" "), 200)
                    ));
                }
            }
            found.push(cause(
                CauseKind::InsufficientScope,
                Likelihood::High,
                evidence,
            ));
        }
        Some("invalid_request") => found.push(cause(
            CauseKind::AuthenticationMissing,
            Likelihood::Medium,
            said("invalid_request"),
        )),
        _ if unauthorized => {
            let scheme = challenge
                .as_ref()
                .map(|c| format!(" and asks for {} authentication", clean(&c.scheme, 32)));
            let evidence = format!(
                "The upstream answered 401{}.",
                scheme.unwrap_or_else(|| " without saying why".to_owned())
            );
            if facts.credentials_known && facts.has_credentials() {
                found.push(cause(
                    CauseKind::TokenInvalid,
                    Likelihood::Medium,
                    format!("{evidence} Credentials were sent, so they were not accepted."),
                ));
            } else {
                let likelihood = if facts.credentials_known {
                    Likelihood::High
                } else {
                    Likelihood::Medium
                };
                found.push(cause(
                    CauseKind::AuthenticationMissing,
                    likelihood,
                    evidence,
                ));
            }
        }
        _ => {}
    }
}

/// Scopes the challenge requires that the bearer token's `scope`/`scp` lacks.
fn missing_scopes(facts: &RequestFacts, needed: &str) -> Option<Vec<String>> {
    let claims = token::unverified_claims(token::bearer(facts.authorization.as_ref()?)?)?;
    let granted: Vec<String> = match claims.get("scope").or_else(|| claims.get("scp"))? {
        serde_json::Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => return None,
    };
    let missing: Vec<String> = needed
        .split_whitespace()
        .filter(|s| !granted.iter().any(|g| g == s))
        .map(str::to_owned)
        .collect();
    (!missing.is_empty()).then_some(missing)
}

/// Causes from the bearer token itself: expired, or not a well-formed JWT.
pub fn token(facts: &RequestFacts, now: SystemTime, found: &mut Vec<Cause>) {
    let Some(bearer) = facts.authorization.as_ref().and_then(token::bearer) else {
        return;
    };
    let jwt_shaped = bearer.starts_with("eyJ") && bearer.matches('.').count() == 2;
    let Some(claims) = token::unverified_claims(bearer) else {
        if jwt_shaped {
            found.push(cause(
                CauseKind::TokenInvalid,
                Likelihood::Medium,
                "The bearer token looks like a JWT but cannot be decoded.".to_owned(),
            ));
        }
        return;
    };
    let Some(exp) = claims.get("exp").and_then(|v| v.as_u64()) else {
        return;
    };
    // The claim is the caller's: a time past what `SystemTime` holds is no
    // evidence of anything (and must not overflow).
    let Some(expires) = UNIX_EPOCH.checked_add(Duration::from_secs(exp)) else {
        return;
    };
    if let Ok(ago) = now.duration_since(expires)
        && ago > SKEW
    {
        found.push(cause(
            CauseKind::TokenExpired,
            Likelihood::High,
            format!(
                "The bearer token expired at {}, {} ago (its exp claim, read without verifying the token).",
                crate::events::time::rfc3339(expires),
                human(ago)
            ),
        ));
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} seconds"),
        120..=7199 => format!("{} minutes", s / 60),
        7200..=172_799 => format!("{} hours", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

/// What the rate-limit headers and status say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// The limit is reached (429, or a remaining count of 0).
    pub limited: bool,
    /// Seconds until the identical request may succeed, when known.
    pub retry_after: Option<u64>,
    /// What was seen.
    pub evidence: Vec<String>,
}

/// Reads `Retry-After`, `RateLimit`/`RateLimit-*` (IETF draft) and
/// `X-RateLimit-*`.
pub fn rate_limit(upstream: &Upstream<'_>, now: SystemTime) -> RateLimit {
    let mut r = RateLimit::default();
    let h = upstream.headers;
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if upstream.status == StatusCode::TOO_MANY_REQUESTS {
        r.limited = true;
        r.evidence
            .push("The upstream answered 429 Too Many Requests.".to_owned());
    }
    if let Some(v) = h
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let secs = v.parse::<u64>().ok().or_else(|| {
            httpdate::parse_http_date(v)
                .ok()
                .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO).as_secs())
        });
        if let Some(secs) = secs {
            r.retry_after = Some(secs.min(MAX_WAIT));
            r.evidence
                .push(format!("Retry-After asks to wait {secs} seconds."));
        }
    }
    let mut reset: Option<u64> = None;
    for (name, value) in h.iter().take(128) {
        let name = name.as_str();
        let Ok(value) = value.to_str() else { continue };
        let remaining_header = (name.starts_with("x-ratelimit-remaining")
            || name.starts_with("ratelimit-remaining"))
            && value.trim() == "0";
        if remaining_header {
            r.limited = true;
            r.evidence
                .push(format!("{name}: 0 (no requests left in the window)."));
        }
        if name == "ratelimit" {
            // Draft structured field: `limit=10, remaining=0, reset=30`.
            let field = |k: &str| {
                value.split([',', ';']).find_map(|p| {
                    let (pk, pv) = p.trim().split_once('=')?;
                    (pk.trim() == k).then(|| pv.trim().trim_matches('"').to_owned())
                })
            };
            if field("remaining").or_else(|| field("r")).as_deref() == Some("0") {
                r.limited = true;
                r.evidence.push(format!(
                    "RateLimit: {} (no requests left).",
                    clean(value, 100)
                ));
            }
            reset = reset.or_else(|| {
                field("reset")
                    .or_else(|| field("t"))
                    .and_then(|v| v.parse().ok())
            });
        }
        if (name == "x-ratelimit-reset" || name == "ratelimit-reset")
            && let Ok(v) = value.trim().parse::<u64>()
        {
            // Epoch seconds (GitHub) or seconds from now (IETF draft).
            reset = Some(if v > 1_000_000_000 {
                v.saturating_sub(now_secs)
            } else {
                v
            });
        }
    }
    if r.limited
        && r.retry_after.is_none()
        && let Some(secs) = reset
    {
        r.retry_after = Some(secs.min(MAX_WAIT));
        r.evidence
            .push(format!("The limit resets in {secs} seconds."));
    }
    r
}

/// Causes from statuses that say something by themselves.
pub fn status(upstream: &Upstream<'_>, found: &mut Vec<Cause>) {
    if upstream.status == StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS {
        found.push(cause(
            CauseKind::GeoBlocked,
            Likelihood::High,
            "The upstream answered 451 Unavailable For Legal Reasons.".to_owned(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn parses_challenges() {
        let h = headers(&[(
            "www-authenticate",
            r#"Bearer realm="api", error="insufficient_scope", scope="reports:read admin", error_description="needs \"more\""#,
        )]);
        let c = challenge(&h).unwrap();
        assert_eq!(c.scheme, "Bearer");
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        assert_eq!(c.param("scope"), Some("reports:read admin"));
        assert_eq!(c.param("error_description"), Some("needs \"more\""));
        let c = challenge(&headers(&[("www-authenticate", "Basic realm=x")])).unwrap();
        assert_eq!(c.scheme, "Basic");
        assert_eq!(c.param("realm"), Some("x"));
    }

    #[test]
    fn reads_rate_limit_headers() {
        let now = SystemTime::now();
        let epoch = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 120;
        let h = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", &epoch.to_string()),
        ]);
        let up = Upstream {
            status: StatusCode::FORBIDDEN,
            headers: &h,
            body: b"",
            reason: None,
        };
        let r = rate_limit(&up, now);
        assert!(r.limited);
        assert!((118..=120).contains(&r.retry_after.unwrap()));
        let h = headers(&[("ratelimit", "limit=10, remaining=0, reset=30")]);
        let up = Upstream {
            status: StatusCode::FORBIDDEN,
            headers: &h,
            body: b"",
            reason: None,
        };
        assert_eq!(rate_limit(&up, now).retry_after, Some(30));
        let h = headers(&[("x-ratelimit-remaining", "4999")]);
        let up = Upstream {
            status: StatusCode::FORBIDDEN,
            headers: &h,
            body: b"",
            reason: None,
        };
        assert!(!rate_limit(&up, now).limited);
    }
}
