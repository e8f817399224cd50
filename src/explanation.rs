//! What an explained denial says: the vocabulary (causes, likelihoods,
//! remediation steps) and the [`Explanation`] that the diagnosis builds and
//! the renderers turn into a response.
//!
//! An `Explanation` always holds everything that is known. What the caller
//! is allowed to see is decided once, by [`Explanation::caller_view`], from
//! the matched policy's [`Expose`] level; events get the full value.

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;
use serde::Serialize;

use crate::id::DenialId;

macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $($variant:ident => $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $(#[doc = concat!("`", $text, "`")] $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used in config files, events and responses.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the name used in config files.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($text => Some($name::$variant),)+ _ => None }
            }

            /// Every name, in declaration order.
            pub fn names() -> Vec<&'static str> {
                Self::ALL.iter().map(|v| v.as_str()).collect()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary! {
    /// Why a request was denied. The same vocabulary labels `../shared/corpus`.
    pub enum CauseKind {
        Permission => "permission",
        AuthenticationMissing => "authentication_missing",
        TokenExpired => "token_expired",
        TokenInvalid => "token_invalid",
        InsufficientScope => "insufficient_scope",
        IpBlocked => "ip_blocked",
        RateLimited => "rate_limited",
        WafOrBot => "waf_or_bot",
        Csrf => "csrf",
        GeoBlocked => "geo_blocked",
        AccountState => "account_state",
        PolicyExplicitDeny => "policy_explicit_deny",
        Unknown => "unknown",
    }
}

vocabulary! {
    /// How likely a cause is, given its evidence.
    pub enum Likelihood {
        High => "high",
        Medium => "medium",
        Low => "low",
    }
}

vocabulary! {
    /// Who can carry out a remediation step.
    pub enum Audience {
        Caller => "caller",
        Admin => "admin",
    }
}

vocabulary! {
    /// How much work a remediation step is.
    pub enum Effort {
        Easy => "easy",
        Medium => "medium",
        Hard => "hard",
    }
}

vocabulary! {
    /// How much of an explanation the caller may see. Events always get all of it.
    ///
    /// - `full`: the policy, every cause with its evidence, every remediation step.
    /// - `caller`: the policy's id, title and docs, the causes without evidence,
    ///   the steps meant for the caller; no owner, no admin steps.
    /// - `minimal`: a generic title, the denial id and the contact; nothing that
    ///   tells which rule fired (for WAF-like rules that must not teach an attacker).
    pub enum Expose {
        Full => "full",
        Caller => "caller",
        Minimal => "minimal",
    }
}

vocabulary! {
    /// Who denied the request.
    pub enum DeniedBy {
        Proxy => "proxy",
        Upstream => "upstream",
        IdentityProvider => "identity_provider",
        WafOrCdn => "waf_or_cdn",
        Gateway => "gateway",
    }
}

impl DeniedBy {
    /// Who denied, for people.
    pub fn describe(self) -> &'static str {
        match self {
            DeniedBy::Proxy => "a policy of this proxy",
            DeniedBy::Upstream => "the application behind this proxy",
            DeniedBy::IdentityProvider => "the identity provider",
            DeniedBy::WafOrCdn => "a firewall or CDN in front of the application",
            DeniedBy::Gateway => "an API gateway in front of the application",
        }
    }
}

impl Likelihood {
    pub(crate) fn rank(self) -> u8 {
        match self {
            Likelihood::High => 0,
            Likelihood::Medium => 1,
            Likelihood::Low => 2,
        }
    }
}

/// One likely reason for the denial, with what points to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Cause {
    /// The cause, from the shared vocabulary.
    pub cause: CauseKind,
    /// How likely it is.
    pub likelihood: Likelihood,
    /// Human-readable facts that support it. Never a secret.
    pub evidence: Vec<String>,
}

/// Something a person can do about the denial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Remediation {
    /// What to do, in one sentence.
    pub step: String,
    /// Who can do it.
    #[serde(rename = "for")]
    pub audience: Audience,
    /// How much work it is.
    pub effort: Effort,
}

/// The policy that denied the request, as shown to callers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    /// The policy's id in the config.
    pub id: String,
    /// Its human title.
    pub title: String,
    /// The team that owns it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Where it is documented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docs: Option<String>,
}

/// Where a self-service escalation is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EscalateLink {
    /// The URL to send the request to.
    pub href: String,
    /// The HTTP method to use.
    pub method: &'static str,
}

/// Everything whydenied knows about one denial, ready to render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The id the caller quotes; also sent as `x-denial-id`.
    pub denial_id: DenialId,
    /// The status, unchanged from the upstream.
    pub status: StatusCode,
    /// A short human title.
    pub title: String,
    /// One or two sentences saying what happened.
    pub detail: String,
    /// The matched policy, if any.
    pub policy: Option<PolicyRef>,
    /// Likely causes, most likely first. Never empty.
    pub causes: Vec<Cause>,
    /// What can be done, caller steps first.
    pub remediation: Vec<Remediation>,
    /// Set when the denial is temporary and the wait is known.
    pub retry_after_seconds: Option<u64>,
    /// Whether the identical request would succeed later.
    pub temporary: bool,
    /// Who denied the request.
    pub denied_by: DeniedBy,
    /// Whom to ask.
    pub contact: Option<String>,
    /// Self-service escalation, when enabled.
    pub escalate: Option<EscalateLink>,
    /// How much of this the caller may see.
    pub expose: Expose,
    /// Who the caller is, when known (shown back to the caller only).
    pub identity: Option<crate::diagnose::Identity>,
    /// The caller's address as whydenied sees it (never shown to the caller).
    pub client_ip: Option<std::net::IpAddr>,
}

impl Explanation {
    /// Orders causes most likely first (stable: the policy's cause stays ahead
    /// of a detector's cause of the same likelihood) and merges duplicates.
    pub(crate) fn rank_causes(&mut self) {
        let mut merged: Vec<Cause> = Vec::with_capacity(self.causes.len());
        for cause in self.causes.drain(..) {
            match merged.iter_mut().find(|c| c.cause == cause.cause) {
                Some(existing) => {
                    if cause.likelihood.rank() < existing.likelihood.rank() {
                        existing.likelihood = cause.likelihood;
                    }
                    existing.evidence.extend(cause.evidence);
                }
                None => merged.push(cause),
            }
        }
        merged.sort_by_key(|c| c.likelihood.rank());
        self.causes = merged;
    }

    /// The most likely cause.
    pub fn top_cause(&self) -> CauseKind {
        self.causes
            .first()
            .map(|c| c.cause)
            .unwrap_or(CauseKind::Unknown)
    }

    /// What the caller may see of this explanation, per its [`Expose`] level.
    /// At `full` that is the explanation itself (borrowed, nothing copied);
    /// the other levels build a copy without what they hide.
    pub fn caller_view(&self) -> Cow<'_, Explanation> {
        match self.expose {
            Expose::Full => Cow::Borrowed(self),
            Expose::Caller => Cow::Owned(Explanation {
                policy: self.policy.as_ref().map(|p| PolicyRef {
                    id: p.id.clone(),
                    title: p.title.clone(),
                    owner: None,
                    docs: p.docs.clone(),
                }),
                causes: self
                    .causes
                    .iter()
                    .map(|c| Cause {
                        cause: c.cause,
                        likelihood: c.likelihood,
                        evidence: Vec::new(),
                    })
                    .collect(),
                remediation: self
                    .remediation
                    .iter()
                    .filter(|r| r.audience == Audience::Caller)
                    .cloned()
                    .collect(),
                ..self.shared_fields()
            }),
            Expose::Minimal => Cow::Owned(Explanation {
                title: generic_title(self.status).to_owned(),
                detail: "The request was denied by an access policy. Quote the denial id \
                         when you ask for help."
                    .to_owned(),
                policy: None,
                causes: Vec::new(),
                remediation: Vec::new(),
                ..self.shared_fields()
            }),
        }
    }

    /// A copy of the fields every view shows as they are.
    fn shared_fields(&self) -> Explanation {
        Explanation {
            denial_id: self.denial_id,
            status: self.status,
            title: self.title.clone(),
            detail: self.detail.clone(),
            policy: None,
            causes: Vec::new(),
            remediation: Vec::new(),
            retry_after_seconds: self.retry_after_seconds,
            temporary: self.temporary,
            denied_by: self.denied_by,
            contact: self.contact.clone(),
            escalate: self.escalate.clone(),
            expose: self.expose,
            identity: self.identity.clone(),
            client_ip: self.client_ip,
        }
    }
}

/// A title that reveals nothing but the status.
pub(crate) fn generic_title(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "Authentication required",
        429 => "Too many requests",
        451 => "Unavailable for legal reasons",
        _ => "Access denied",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(cause: CauseKind, likelihood: Likelihood, evidence: &str) -> Cause {
        Cause {
            cause,
            likelihood,
            evidence: vec![evidence.to_owned()],
        }
    }

    fn explanation(causes: Vec<Cause>, expose: Expose) -> Explanation {
        Explanation {
            denial_id: DenialId::from_bytes([7; 16]),
            status: StatusCode::FORBIDDEN,
            title: "Administrators only".into(),
            detail: "Only ops-admins.".into(),
            policy: Some(PolicyRef {
                id: "admin".into(),
                title: "Administrators only".into(),
                owner: Some("platform".into()),
                docs: None,
            }),
            causes,
            remediation: vec![
                Remediation {
                    step: "Ask your lead.".into(),
                    audience: Audience::Caller,
                    effort: Effort::Easy,
                },
                Remediation {
                    step: "Add the user to the group.".into(),
                    audience: Audience::Admin,
                    effort: Effort::Easy,
                },
            ],
            retry_after_seconds: None,
            temporary: false,
            denied_by: DeniedBy::Proxy,
            contact: Some("#help".into()),
            escalate: None,
            expose,
            identity: None,
            client_ip: None,
        }
    }

    #[test]
    fn vocabulary_round_trips_through_its_names() {
        for kind in CauseKind::ALL {
            assert_eq!(CauseKind::from_name(kind.as_str()), Some(*kind));
        }
        assert_eq!(CauseKind::from_name("Permission"), None);
        assert_eq!(CauseKind::ALL.len(), 13);
    }

    #[test]
    fn ranking_puts_most_likely_first_and_merges_duplicates() {
        let mut e = explanation(
            vec![
                cause(CauseKind::Unknown, Likelihood::Low, "a"),
                cause(CauseKind::Permission, Likelihood::High, "b"),
                cause(CauseKind::Unknown, Likelihood::Medium, "c"),
            ],
            Expose::Full,
        );
        e.rank_causes();
        assert_eq!(e.top_cause(), CauseKind::Permission);
        assert_eq!(e.causes.len(), 2);
        assert_eq!(e.causes[1].likelihood, Likelihood::Medium);
        assert_eq!(e.causes[1].evidence, vec!["a", "c"]);
    }

    #[test]
    fn full_level_shows_everything_without_a_copy() {
        let e = explanation(
            vec![cause(CauseKind::Permission, Likelihood::High, "evidence")],
            Expose::Full,
        );
        let v = e.caller_view();
        assert!(matches!(v, Cow::Borrowed(_)));
        assert_eq!(*v, e);
    }

    #[test]
    fn caller_level_keeps_what_it_does_not_hide() {
        let mut e = explanation(
            vec![cause(CauseKind::Permission, Likelihood::High, "secretish")],
            Expose::Caller,
        );
        e.policy.as_mut().unwrap().docs = Some("https://wiki/admin".into());
        e.retry_after_seconds = Some(30);
        let v = e.caller_view();
        // Everything but the hidden fields is the explanation's own.
        let mut expected = e.clone();
        expected.policy.as_mut().unwrap().owner = None;
        expected.causes[0].evidence.clear();
        expected
            .remediation
            .retain(|r| r.audience == Audience::Caller);
        assert_eq!(*v, expected);
    }

    #[test]
    fn caller_level_hides_owner_evidence_and_admin_steps() {
        let e = explanation(
            vec![cause(CauseKind::Permission, Likelihood::High, "secretish")],
            Expose::Caller,
        );
        let v = e.caller_view();
        assert_eq!(v.policy.as_ref().unwrap().owner, None);
        assert!(v.causes[0].evidence.is_empty());
        assert_eq!(v.remediation.len(), 1);
        assert_eq!(v.remediation[0].audience, Audience::Caller);
    }

    #[test]
    fn minimal_level_hides_which_rule_fired() {
        let e = explanation(
            vec![cause(CauseKind::WafOrBot, Likelihood::High, "rule 942100")],
            Expose::Minimal,
        );
        let v = e.caller_view();
        assert!(v.policy.is_none());
        assert!(v.causes.is_empty());
        assert!(v.remediation.is_empty());
        assert_eq!(v.title, "Access denied");
        assert_eq!(v.contact.as_deref(), Some("#help"));
    }
}
