//! Diagnosis: from the request facts and the upstream's answer to an
//! [`Explanation`].
//!
//! The first matching policy is authoritative: it names who denied and why.
//! Built-in detectors then add causes with their evidence (below the policy's
//! cause when one matched). With no policy and no detector firing, the
//! explanation says honestly that the cause is unknown.

use std::net::IpAddr;
use std::time::SystemTime;

use http::StatusCode;

use crate::causes::cause_text;
use crate::config::Config;
use crate::detect;
use crate::escape::{MAX_REFLECTED_CHARS, clean, clean_into};
use crate::explanation::{
    Audience, Cause, CauseKind, DeniedBy, Effort, Explanation, Likelihood, PolicyRef, Remediation,
};
use crate::facts::RequestFacts;
use crate::id::DenialId;
use crate::policy::{Policy, Upstream};
use crate::template::{Var, Vars};
use crate::token;

/// Who the caller is, as far as whydenied can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The name, cleaned for display.
    pub name: String,
    /// True when read from an unverified token claim.
    pub unverified: bool,
}

/// Explains one denial.
pub fn explain(
    config: &Config,
    facts: &RequestFacts,
    upstream: &Upstream<'_>,
    denial_id: DenialId,
    now: SystemTime,
) -> Explanation {
    let client_ip = facts.client_ip(config);
    let identity = identity(config, facts);
    let policy = config.policies().first_match(facts, client_ip, upstream);

    let mut causes = Vec::new();
    if let Some(policy) = policy {
        let mut evidence = String::with_capacity(128);
        clean_into(&mut evidence, facts.method().as_str(), 32);
        evidence.push(' ');
        clean_into(&mut evidence, facts.path(), MAX_REFLECTED_CHARS);
        evidence.push_str(" matched policy `");
        evidence.push_str(&policy.id);
        evidence.push('`');
        for (i, described) in policy.conditions.described.iter().enumerate() {
            evidence.push_str(if i == 0 { ": " } else { "; " });
            evidence.push_str(described);
        }
        evidence.push('.');
        causes.push(Cause {
            cause: policy.cause,
            likelihood: Likelihood::High,
            evidence: vec![evidence],
        });
    }
    // A signature: the upstream's answer looks like a known product's denial.
    let signature = config
        .signatures()
        .find_map(|set| set.first_match(facts, client_ip, upstream));
    if let Some(sig) = signature {
        let mut evidence = vec![format!(
            "The response looks like {} (signature `{}`).",
            sig.title_text(),
            sig.id
        )];
        evidence.extend(extracted(sig, upstream.body));
        causes.push(Cause {
            cause: sig.cause,
            likelihood: if policy.is_some() {
                Likelihood::Medium
            } else {
                sig.likelihood
            },
            evidence,
        });
    }
    detect::authentication(facts, upstream, &mut causes);
    detect::token(facts, now, &mut causes);
    let limits = detect::rate_limit(upstream, now);
    if limits.limited || limits.retry_after.is_some() {
        let likelihood = if limits.limited {
            Likelihood::High
        } else {
            Likelihood::Medium
        };
        causes.push(Cause {
            cause: CauseKind::RateLimited,
            likelihood,
            evidence: limits.evidence.clone(),
        });
    }
    detect::status(upstream, &mut causes);
    // A caller named by the identity header was authenticated upstream of us,
    // even if it sent nothing we recognise as credentials.
    if facts.credentials_known
        && !facts.has_credentials()
        && identity.as_ref().is_none_or(|i| i.unverified)
    {
        // The likely reason only where a status is about access (401, 403);
        // a 429, 451 or 503 says something else by itself.
        let about_access = matches!(
            upstream.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        );
        let likelihood = if !about_access || causes.iter().any(|c| c.likelihood == Likelihood::High)
        {
            Likelihood::Medium
        } else {
            Likelihood::High
        };
        causes.push(Cause {
            cause: CauseKind::AuthenticationMissing,
            likelihood,
            evidence: vec![
                "The request carried no Authorization header, no cookie and no API key.".into(),
            ],
        });
    }
    if causes.is_empty() {
        causes.push(Cause {
            cause: CauseKind::Unknown,
            likelihood: Likelihood::Low,
            evidence: vec![format!(
                "The upstream answered {} without a reason whydenied recognises.",
                upstream.status.as_u16()
            )],
        });
    }

    let mut explanation = Explanation {
        denial_id,
        status: upstream.status,
        title: String::new(),
        detail: String::new(),
        policy: None,
        causes,
        remediation: Vec::new(),
        retry_after_seconds: None,
        temporary: false,
        denied_by: match (policy, signature) {
            (Some(_), _) => DeniedBy::Proxy,
            (None, Some(sig)) => sig.denied_by.unwrap_or(DeniedBy::Upstream),
            (None, None) => DeniedBy::Upstream,
        },
        contact: policy.and_then(|p| p.contact.clone()),
        escalate: None,
        expose: policy.map_or(config.expose, |p| p.expose),
        identity: identity.clone(),
        client_ip,
    };
    explanation.rank_causes();
    let top = explanation.top_cause();
    // Temporary: a signature or policy may say; otherwise a rate limit or a
    // 503 is, and nothing else (a 429 for a billing quota or a bot challenge
    // is named so by its signature and is not).
    explanation.temporary = policy
        .and_then(|p| p.temporary)
        .or_else(|| {
            signature
                .filter(|s| s.cause == top)
                .and_then(|s| s.temporary)
        })
        .unwrap_or(
            top == CauseKind::RateLimited || upstream.status == StatusCode::SERVICE_UNAVAILABLE,
        );
    if explanation.temporary {
        explanation.retry_after_seconds = limits.retry_after;
    }
    let text = cause_text(top, upstream.status);

    let mut vars = DenialVars {
        facts,
        status: upstream.status,
        policy,
        policy_title: String::new(),
        identity: identity.as_ref(),
        client_ip,
        denial_id: &denial_id,
    };
    match policy {
        Some(p) => {
            let title = p
                .title
                .as_ref()
                .map(|t| t.render(&vars))
                .unwrap_or_else(|| text.title.to_owned());
            vars.policy_title = title.clone();
            explanation.title = title;
            explanation.detail = p
                .detail
                .as_ref()
                .map(|t| t.render(&vars))
                .unwrap_or_else(|| text.detail.to_owned());
            explanation.remediation = steps(&p.remediation, &vars);
            explanation.policy = Some(PolicyRef {
                id: p.id.clone(),
                title: explanation.title.clone(),
                owner: p.owner.clone(),
                docs: p.docs.clone(),
            });
        }
        None => {
            explanation.title = text.title.to_owned();
            explanation.detail = signature
                .filter(|sig| sig.cause == top)
                .and_then(|sig| sig.detail.as_ref())
                .map(|t| t.render(&vars))
                .unwrap_or_else(|| text.detail.to_owned());
            if let Some(sig) = signature.filter(|sig| sig.cause == top) {
                explanation.remediation = steps(&sig.remediation, &vars);
            }
        }
    }
    if explanation.remediation.is_empty() {
        explanation.remediation = text
            .steps
            .iter()
            .map(|(step, audience, effort)| Remediation {
                step: (*step).to_owned(),
                audience: *audience,
                effort: *effort,
            })
            .collect();
    }
    // Caller steps first, then admin steps, each in their given order.
    explanation
        .remediation
        .sort_by_key(|r| r.audience == Audience::Admin);
    explanation
}

/// An explanation of a failure of the proxy itself (the upstream did not
/// answer, a request over a limit): not a denial, so no policy and no cause,
/// and nothing internal such as the upstream's address.
pub fn proxy_failure(
    status: StatusCode,
    denial_id: DenialId,
    title: &str,
    detail: &str,
    caller_step: &str,
    admin_step: Option<&str>,
) -> Explanation {
    let mut remediation = vec![Remediation {
        step: caller_step.to_owned(),
        audience: Audience::Caller,
        effort: Effort::Easy,
    }];
    if let Some(step) = admin_step {
        remediation.push(Remediation {
            step: step.to_owned(),
            audience: Audience::Admin,
            effort: Effort::Medium,
        });
    }
    Explanation {
        denial_id,
        status,
        title: title.to_owned(),
        detail: detail.to_owned(),
        policy: None,
        causes: Vec::new(),
        remediation,
        retry_after_seconds: None,
        contact: None,
        escalate: None,
        expose: crate::explanation::Expose::Full,
        identity: None,
        client_ip: None,
        // The caller is told to try again in a moment.
        temporary: matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ),
        denied_by: DeniedBy::Proxy,
    }
}

/// The caller's identity as an event records it.
pub fn identity_record(
    config: &Config,
    facts: &RequestFacts,
) -> Option<crate::events::IdentityRecord> {
    identity(config, facts).map(|i| crate::events::IdentityRecord {
        name: i.name,
        source: if i.unverified {
            "jwt_unverified"
        } else {
            "header"
        },
    })
}

/// The caller's identity: the configured header, else the configured claim of
/// the bearer token (unverified).
fn identity(config: &Config, facts: &RequestFacts) -> Option<Identity> {
    if let Some(value) = facts.identity_header() {
        let name = clean(&String::from_utf8_lossy(value), MAX_REFLECTED_CHARS);
        if !name.trim().is_empty() {
            return Some(Identity {
                name,
                unverified: false,
            });
        }
    }
    let claim = config.identity_claim.as_deref()?;
    let bearer = token::bearer(facts.authorization.as_ref()?)?;
    let claims = token::unverified_claims(bearer)?;
    let name = token::claim_text(&claims, claim)?;
    Some(Identity {
        name: clean(&name, MAX_REFLECTED_CHARS),
        unverified: true,
    })
}

/// A policy's or signature's remediation steps, rendered for this denial.
fn steps(steps: &[crate::policy::Step], vars: &DenialVars<'_>) -> Vec<Remediation> {
    steps
        .iter()
        .map(|s| Remediation {
            step: s.text.render(vars),
            audience: s.audience,
            effort: s.effort,
        })
        .collect()
}

/// Evidence pulled from the body by a signature's `extract`.
fn extracted(sig: &Policy, body: &[u8]) -> Option<String> {
    let (re, text) = sig.extract.as_ref()?;
    let caps = re.captures(body)?;
    let mut out = text.clone();
    for name in re.capture_names().flatten() {
        let value = caps
            .name(name)
            .map(|m| clean(&String::from_utf8_lossy(m.as_bytes()), 120))
            .unwrap_or_default();
        out = out.replace(&format!("{{{name}}}"), &value);
    }
    Some(out)
}

struct DenialVars<'a> {
    facts: &'a RequestFacts,
    status: StatusCode,
    policy: Option<&'a Policy>,
    policy_title: String,
    identity: Option<&'a Identity>,
    client_ip: Option<IpAddr>,
    denial_id: &'a DenialId,
}

impl Vars for DenialVars<'_> {
    fn write(&self, var: Var, out: &mut String) {
        match var {
            Var::Method => clean_into(out, self.facts.method().as_str(), 32),
            Var::Path => clean_into(out, self.facts.path(), MAX_REFLECTED_CHARS),
            Var::Host => clean_into(out, self.facts.host().unwrap_or(""), MAX_REFLECTED_CHARS),
            Var::Status => out.push_str(self.status.as_str()),
            Var::Policy => out.push_str(self.policy.map_or("", |p| p.id.as_str())),
            Var::PolicyTitle => out.push_str(&self.policy_title),
            Var::Identity => out.push_str(self.identity.map_or("anonymous", |i| i.name.as_str())),
            Var::ClientIp => {
                if let Some(ip) = self.client_ip {
                    out.push_str(&ip.to_string());
                }
            }
            Var::DenialId => out.push_str(self.denial_id.as_str()),
            Var::Owner => out.push_str(self.policy.and_then(|p| p.owner.as_deref()).unwrap_or("")),
            Var::Contact => {
                out.push_str(self.policy.and_then(|p| p.contact.as_deref()).unwrap_or(""))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::RETRY_AFTER;
    use http::{HeaderMap, Request};
    use std::time::Duration;

    const CONFIG: &str = r##"
identity: { header: x-forwarded-user, jwt_claim: sub }
policies:
  - id: admin-console
    title: Administrators only
    match: { path: "/admin/**" }
    cause: permission
    detail: "{{ method }} {{ path }} is limited to ops-admins, {{ identity }}."
    remediation:
      - { step: "Ask your team lead to add you to ops-admins.", for: caller }
      - { step: "Add the user in the directory.", for: admin, effort: medium }
    owner: platform-team
    contact: "#platform-help"
"##;

    fn run(req: Request<()>, status: u16, headers: HeaderMap) -> Explanation {
        let config = Config::from_yaml_str(CONFIG).unwrap();
        let facts = RequestFacts::capture(&req, &config);
        let upstream = Upstream {
            status: StatusCode::from_u16(status).unwrap(),
            headers: &headers,
            body: b"",
            reason: None,
        };
        explain(
            &config,
            &facts,
            &upstream,
            DenialId::from_bytes([1; 16]),
            SystemTime::now(),
        )
    }

    #[test]
    fn a_matching_policy_is_authoritative() {
        let req = Request::get("/admin/users")
            .header("x-forwarded-user", "alice")
            .header("cookie", "s=1")
            .body(())
            .unwrap();
        let e = run(req, 403, HeaderMap::new());
        assert_eq!(e.policy.as_ref().unwrap().id, "admin-console");
        assert_eq!(e.top_cause(), CauseKind::Permission);
        assert_eq!(
            e.detail,
            "GET /admin/users is limited to ops-admins, alice."
        );
        assert_eq!(e.contact.as_deref(), Some("#platform-help"));
        assert_eq!(e.remediation[0].audience, Audience::Caller);
        assert_eq!(e.remediation[1].audience, Audience::Admin);
    }

    #[test]
    fn no_credentials_is_detected_without_a_policy() {
        let e = run(Request::get("/x").body(()).unwrap(), 403, HeaderMap::new());
        assert!(e.policy.is_none());
        assert_eq!(e.top_cause(), CauseKind::AuthenticationMissing);
        assert_eq!(e.causes[0].likelihood, Likelihood::High);
        assert_eq!(e.title, "Sign-in required");
    }

    #[test]
    fn no_credentials_does_not_outrank_what_a_451_or_503_says() {
        let e = run(Request::get("/x").body(()).unwrap(), 451, HeaderMap::new());
        assert_eq!(e.top_cause(), CauseKind::GeoBlocked);
        assert_eq!(e.causes[0].likelihood, Likelihood::High);
        assert_eq!(e.causes[1].cause, CauseKind::AuthenticationMissing);
        assert_eq!(e.causes[1].likelihood, Likelihood::Medium);

        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "30".parse().unwrap());
        let e = run(Request::get("/x").body(()).unwrap(), 503, h);
        assert_eq!(e.top_cause(), CauseKind::RateLimited);
        assert!(e.temporary);
        let missing = e
            .causes
            .iter()
            .find(|c| c.cause == CauseKind::AuthenticationMissing);
        assert_eq!(missing.unwrap().likelihood, Likelihood::Medium);
    }

    #[test]
    fn no_credentials_ranks_below_a_policy() {
        let e = run(
            Request::get("/admin").body(()).unwrap(),
            403,
            HeaderMap::new(),
        );
        assert_eq!(e.top_cause(), CauseKind::Permission);
        assert_eq!(e.causes[1].cause, CauseKind::AuthenticationMissing);
        assert_eq!(e.causes[1].likelihood, Likelihood::Medium);
    }

    #[test]
    fn retry_after_makes_it_temporary() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "30".parse().unwrap());
        let req = Request::get("/api")
            .header("authorization", "Bearer x")
            .body(())
            .unwrap();
        let e = run(req, 403, h);
        assert_eq!(e.retry_after_seconds, Some(30));
        assert_eq!(e.top_cause(), CauseKind::RateLimited);

        let mut h = HeaderMap::new();
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let req = Request::get("/api")
            .header("authorization", "Bearer x")
            .body(())
            .unwrap();
        let secs = run(req, 403, h).retry_after_seconds.unwrap();
        assert!((100..=120).contains(&secs), "{secs}");
    }

    #[test]
    fn unknown_when_nothing_is_known() {
        let req = Request::get("/x").header("cookie", "a=b").body(()).unwrap();
        let e = run(req, 403, HeaderMap::new());
        assert_eq!(e.top_cause(), CauseKind::Unknown);
        assert_eq!(e.causes[0].likelihood, Likelihood::Low);
    }

    #[test]
    fn identity_from_an_unverified_jwt_claim() {
        let jwt = token::make_jwt(r#"{"sub":"bob\r\nInjected: yes"}"#);
        let req = Request::get("/admin")
            .header("authorization", format!("Bearer {jwt}"))
            .body(())
            .unwrap();
        let e = run(req, 403, HeaderMap::new());
        let id = e.identity.unwrap();
        assert!(id.unverified);
        assert_eq!(id.name, "bob\\u{d}\\u{a}Injected: yes");
    }
}
