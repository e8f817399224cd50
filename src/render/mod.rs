//! Rendering an [`Explanation`] in the negotiated format.
//!
//! Renderers receive the caller's view of an explanation (see
//! [`Explanation::caller_view`]), so they never decide what is secret; they
//! only escape. Each is a pure function from explanation to bytes.

mod html;
mod json;
pub mod notice;
mod text;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use http::{Response, StatusCode};

use crate::explanation::{CauseKind, Explanation};
use crate::id::DenialId;
use crate::negotiate::Negotiated;

pub use html::STYLE_CSP_HASH;

/// The body of an explained response, in `format`.
pub fn render(explanation: &Explanation, format: Negotiated) -> String {
    match format {
        Negotiated::ProblemJson => json::render(explanation),
        Negotiated::Html => html::render(explanation),
        Negotiated::Text => text::render(explanation),
    }
}

/// The `Content-Security-Policy` of the HTML page: nothing but its own
/// inline style, no scripts, forms only to this origin, no framing.
pub fn html_csp() -> String {
    format!(
        "default-src 'none'; style-src '{STYLE_CSP_HASH}'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// Upstream headers that describe the body being replaced, and so are dropped
/// from an explained response. Everything else the upstream sent is kept.
const BODY_HEADERS: [HeaderName; 17] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::CONTENT_DISPOSITION,
    HeaderName::from_static("content-md5"),
    HeaderName::from_static("content-digest"),
    HeaderName::from_static("repr-digest"),
    HeaderName::from_static("digest"),
    header::ETAG,
    header::LAST_MODIFIED,
    header::TRANSFER_ENCODING,
    header::TRAILER,
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::CONTENT_SECURITY_POLICY,
    header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
];

/// Turns `headers` (the upstream's) into those of an explained response of
/// `body_len` bytes: drops what described the old body, then sets the type,
/// length, `no-store`, `nosniff`, the denial id, the CSP of the HTML page and
/// `Vary: accept`.
pub fn set_headers(
    headers: &mut HeaderMap,
    format: Negotiated,
    denial_id: &DenialId,
    body_len: usize,
) -> Result<(), InvalidHeaderValue> {
    for name in &BODY_HEADERS {
        headers.remove(name);
    }
    set_common_headers(headers, format, body_len);
    headers.insert(
        crate::DENIAL_ID_HEADER,
        HeaderValue::from_str(denial_id.as_str())?,
    );
    if format == Negotiated::Html {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_str(&html_csp())?,
        );
    }
    let varies_on_accept = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("accept"))
        })
    });
    if !varies_on_accept {
        headers.append(header::VARY, HeaderValue::from_static("accept"));
    }
    Ok(())
}

/// What every response whydenied writes carries: its type and length, and
/// that it must be neither cached nor sniffed.
pub(crate) fn set_common_headers(headers: &mut HeaderMap, format: Negotiated, body_len: usize) {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
}

/// A whole response for an explanation that whydenied makes itself (such as
/// "the upstream did not answer"), negotiated on `accept`.
pub fn response(
    explanation: &Explanation,
    accept: Option<&HeaderValue>,
    head: bool,
) -> Response<Bytes> {
    let format = Negotiated::from_accept(accept);
    let body = render(&explanation.caller_view(), format);
    let mut res = Response::new(Bytes::new());
    *res.status_mut() = explanation.status;
    if set_headers(
        res.headers_mut(),
        format,
        &explanation.denial_id,
        body.len(),
    )
    .is_err()
    {
        // Only our own constant values go into these headers; this cannot happen.
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return res;
    }
    if !head {
        *res.body_mut() = Bytes::from(body);
    }
    res
}

/// A cause named for people.
pub(crate) fn cause_label(cause: CauseKind) -> &'static str {
    match cause {
        CauseKind::Permission => "Missing permission",
        CauseKind::AuthenticationMissing => "No credentials were sent",
        CauseKind::TokenExpired => "Expired credentials",
        CauseKind::TokenInvalid => "Invalid credentials",
        CauseKind::InsufficientScope => "Token lacks a required scope",
        CauseKind::IpBlocked => "Network address not allowed",
        CauseKind::RateLimited => "Rate limit reached",
        CauseKind::WafOrBot => "Firewall or bot protection",
        CauseKind::Csrf => "Cross-site request check (CSRF)",
        CauseKind::GeoBlocked => "Regional restriction",
        CauseKind::AccountState => "Account state",
        CauseKind::PolicyExplicitDeny => "Explicit deny rule",
        CauseKind::Unknown => "Unknown",
    }
}

/// The status line text, such as "403 Forbidden".
pub(crate) fn status_line(e: &Explanation) -> String {
    match e.status.canonical_reason() {
        Some(reason) => format!("{} {reason}", e.status.as_u16()),
        None => e.status.as_u16().to_string(),
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use http::StatusCode;

    use crate::explanation::*;
    use crate::id::DenialId;

    /// An explanation whose every text field tries to inject markup.
    pub fn hostile() -> Explanation {
        let evil = "<script>alert(1)</script>\"'&";
        Explanation {
            denial_id: DenialId::from_bytes([9; 16]),
            status: StatusCode::FORBIDDEN,
            title: format!("Title {evil}"),
            detail: format!("Detail {evil}"),
            policy: Some(PolicyRef {
                id: "admin".into(),
                title: format!("Policy {evil}"),
                owner: Some(format!("owner {evil}")),
                docs: Some("https://wiki.example.com/a?b=1&c=\"2\"".into()),
            }),
            causes: vec![Cause {
                cause: CauseKind::Permission,
                likelihood: Likelihood::High,
                evidence: vec![format!("evidence {evil}")],
            }],
            remediation: vec![
                Remediation {
                    step: format!("caller step {evil}"),
                    audience: Audience::Caller,
                    effort: Effort::Easy,
                },
                Remediation {
                    step: format!("admin step {evil}"),
                    audience: Audience::Admin,
                    effort: Effort::Hard,
                },
            ],
            retry_after_seconds: Some(30),
            temporary: true,
            denied_by: DeniedBy::Proxy,
            contact: Some(format!("contact {evil}")),
            escalate: None,
            expose: Expose::Full,
            identity: Some(crate::diagnose::Identity {
                name: format!("alice {evil}"),
                unverified: true,
            }),
            client_ip: Some("192.0.2.1".parse().unwrap()),
        }
    }
}
