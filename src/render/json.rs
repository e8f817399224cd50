//! `application/problem+json` (RFC 9457) with whydenied's extension members.

use serde::Serialize;

use crate::explanation::{Cause, EscalateLink, Explanation, PolicyRef, Remediation};

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    instance: String,
    denial_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a PolicyRef>,
    causes: &'a [Cause],
    remediation: &'a [Remediation],
    temporary: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
    denied_by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    contact: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    escalate: Option<&'a EscalateLink>,
}

pub(super) fn render(e: &Explanation) -> String {
    let kind = match e.causes.first() {
        Some(c) => format!("urn:whydenied:cause:{}", c.cause),
        None => "urn:whydenied:denied".to_owned(),
    };
    let problem = Problem {
        kind,
        title: &e.title,
        status: e.status.as_u16(),
        detail: &e.detail,
        instance: format!("urn:whydenied:denial:{}", e.denial_id),
        denial_id: e.denial_id.as_str(),
        policy: e.policy.as_ref(),
        causes: &e.causes,
        remediation: &e.remediation,
        temporary: e.temporary,
        retry_after_seconds: e.retry_after_seconds,
        denied_by: e.denied_by.as_str(),
        contact: e.contact.as_deref(),
        escalate: e.escalate.as_ref(),
    };
    // Serialising plain strings and numbers cannot fail; an empty object is
    // still valid JSON if it ever did.
    let mut out = Vec::with_capacity(2048);
    match serde_json::to_writer_pretty(&mut out, &problem) {
        Ok(()) => String::from_utf8(out).unwrap_or_else(|_| "{}".to_owned()),
        Err(_) => "{}".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::hostile;

    #[test]
    fn has_the_rfc_9457_members_and_extensions() {
        let v: serde_json::Value = serde_json::from_str(&render(&hostile())).unwrap();
        assert_eq!(v["status"], 403);
        assert_eq!(v["type"], "urn:whydenied:cause:permission");
        assert_eq!(v["denial_id"], "CQkJCQkJCQkJCQkJCQkJCQ");
        assert_eq!(v["instance"], "urn:whydenied:denial:CQkJCQkJCQkJCQkJCQkJCQ");
        assert_eq!(v["policy"]["id"], "admin");
        assert_eq!(v["causes"][0]["cause"], "permission");
        assert_eq!(v["causes"][0]["likelihood"], "high");
        assert_eq!(v["remediation"][1]["for"], "admin");
        assert_eq!(v["remediation"][1]["effort"], "hard");
        assert_eq!(v["retry_after_seconds"], 30);
        // The hostile text survives as data, not as markup or broken JSON.
        assert_eq!(v["title"], "Title <script>alert(1)</script>\"'&");
    }
}
