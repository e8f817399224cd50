//! Rendering an [`Explanation`] in the negotiated format.
//!
//! Renderers receive the caller's view of an explanation (see
//! [`Explanation::caller_view`]), so they never decide what is secret; they
//! only escape. Each is a pure function from explanation to bytes.

mod html;
mod json;
mod text;

use crate::explanation::{CauseKind, Explanation};
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
