//! What whydenied says about each cause when no policy says it: a title, a
//! sentence, and remediation steps for the caller and the admins (from the
//! seed article's causes and fixes, in our words).

use http::StatusCode;

use crate::explanation::{Audience, CauseKind, Effort};

/// What to say about a cause when no policy says it.
pub(crate) struct CauseText {
    pub(crate) title: &'static str,
    pub(crate) detail: &'static str,
    pub(crate) steps: &'static [(&'static str, Audience, Effort)],
}

pub(crate) fn cause_text(cause: CauseKind, status: StatusCode) -> CauseText {
    use Audience::{Admin, Caller};
    use Effort::{Easy, Medium};
    match cause {
        CauseKind::Permission => CauseText {
            title: "You do not have permission for this",
            detail: "You were identified, but your account or role is not allowed to do this.",
            steps: &[
                (
                    "Check that you are signed in with the right account.",
                    Caller,
                    Easy,
                ),
                (
                    "Ask the resource's owner to grant you access.",
                    Caller,
                    Easy,
                ),
                (
                    "Review the role and permission assignments for this resource.",
                    Admin,
                    Medium,
                ),
            ],
        },
        CauseKind::AuthenticationMissing => CauseText {
            title: "Sign-in required",
            detail: "The request carried no credentials, so the service could not tell who you are.",
            steps: &[
                (
                    "Sign in, or send your credentials (an Authorization header, a session cookie or an API key) and try again.",
                    Caller,
                    Easy,
                ),
                (
                    "If you did send credentials, check that nothing between you and the service strips them.",
                    Admin,
                    Medium,
                ),
            ],
        },
        CauseKind::TokenExpired => CauseText {
            title: "Your credentials have expired",
            detail: "The token or session you sent is no longer valid.",
            steps: &[(
                "Sign in again or refresh your token, then retry.",
                Caller,
                Easy,
            )],
        },
        CauseKind::TokenInvalid => CauseText {
            title: "Your credentials were not accepted",
            detail: "The token or key you sent was malformed, revoked or issued for another service.",
            steps: &[
                (
                    "Get a new token or key for this service and retry.",
                    Caller,
                    Easy,
                ),
                (
                    "Check the token's issuer and audience settings.",
                    Admin,
                    Medium,
                ),
            ],
        },
        CauseKind::InsufficientScope => CauseText {
            title: "Your token lacks a required scope",
            detail: "You are signed in, but your token was not granted the scope this request needs.",
            steps: &[
                (
                    "Request a token with the required scope and retry.",
                    Caller,
                    Easy,
                ),
                (
                    "Grant the scope to the client or user if it should have it.",
                    Admin,
                    Medium,
                ),
            ],
        },
        CauseKind::IpBlocked => CauseText {
            title: "Your network is not allowed",
            detail: "Requests from your network address are not accepted here.",
            steps: &[
                (
                    "Connect from an allowed network (for example the office network or VPN) and retry.",
                    Caller,
                    Easy,
                ),
                ("Review the IP allow and deny lists.", Admin, Medium),
            ],
        },
        CauseKind::RateLimited => CauseText {
            title: "Too many requests",
            detail: "You sent more requests than allowed in a period of time. This is temporary.",
            steps: &[
                (
                    "Wait before retrying, and slow down or back off between requests.",
                    Caller,
                    Easy,
                ),
                (
                    "Check the rate-limit thresholds if legitimate traffic is being limited.",
                    Admin,
                    Medium,
                ),
            ],
        },
        CauseKind::WafOrBot => CauseText {
            title: "Blocked by a security filter",
            detail: "A firewall or bot protection in front of the service blocked this request.",
            steps: &[
                (
                    "Retry from a normal browser session; if it persists, contact support with the denial id.",
                    Caller,
                    Easy,
                ),
                (
                    "Look up the firewall rule that fired for this request and add an exception if it is a false positive.",
                    Admin,
                    Medium,
                ),
            ],
        },
        CauseKind::Csrf => CauseText {
            title: "The request failed a cross-site check",
            detail: "The request lacked a valid CSRF token or came from an unexpected origin.",
            steps: &[
                ("Reload the page and submit the form again.", Caller, Easy),
                (
                    "Check that the client sends the CSRF token and that the origin is trusted.",
                    Admin,
                    Medium,
                ),
            ],
        },
        CauseKind::GeoBlocked => CauseText {
            title: "Not available in your region",
            detail: "Access from your location is restricted.",
            steps: &[(
                "Contact the service owner if you believe you should have access.",
                Caller,
                Easy,
            )],
        },
        CauseKind::AccountState => CauseText {
            title: "Your account cannot do this right now",
            detail: "Your account's state (for example billing, verification or two-factor setup) blocks this request.",
            steps: &[(
                "Check your account settings or billing, then retry.",
                Caller,
                Easy,
            )],
        },
        CauseKind::PolicyExplicitDeny => CauseText {
            title: "Denied by an explicit rule",
            detail: "A rule explicitly denies this request, whatever else would allow it.",
            steps: &[
                (
                    "Ask the policy's owner whether the rule should apply to you.",
                    Caller,
                    Easy,
                ),
                ("Review the deny rule and its conditions.", Admin, Medium),
            ],
        },
        CauseKind::Unknown => CauseText {
            title: crate::explanation::generic_title(status),
            detail: "The service denied the request without saying why.",
            steps: &[
                (
                    "Check that you are using the right URL and account.",
                    Caller,
                    Easy,
                ),
                (
                    "Quote the denial id when you contact the service's owners.",
                    Caller,
                    Easy,
                ),
                (
                    "Search the service's logs for the denial id's time and path to find the rule that fired.",
                    Admin,
                    Medium,
                ),
            ],
        },
    }
}
