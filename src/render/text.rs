//! `text/plain`: the same content as the page, for terminals.

use std::fmt::Write as _;

use super::{cause_label, status_line};
use crate::explanation::{Audience, Explanation};

pub(super) fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: {}\n", status_line(e), e.title);
    let _ = writeln!(out, "{}\n", e.detail);
    if let Some(id) = &e.identity {
        let how = if id.unverified {
            " (from an unverified token)"
        } else {
            ""
        };
        let _ = writeln!(out, "You are: {}{how}\n", id.name);
    }
    if !e.causes.is_empty() {
        let _ = writeln!(out, "Why, most likely first:");
        for (n, cause) in e.causes.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {}. {} [{}, {} likelihood]",
                n + 1,
                cause_label(cause.cause),
                cause.cause,
                cause.likelihood
            );
            for evidence in &cause.evidence {
                let _ = writeln!(out, "     - {evidence}");
            }
        }
        out.push('\n');
    }
    for (audience, heading) in [
        (Audience::Caller, "What you can do:"),
        (Audience::Admin, "For the administrators:"),
    ] {
        let mut steps = e
            .remediation
            .iter()
            .filter(|r| r.audience == audience)
            .peekable();
        if steps.peek().is_some() {
            let _ = writeln!(out, "{heading}");
            for step in steps {
                let _ = writeln!(out, "  - {} ({})", step.step, step.effort);
            }
            out.push('\n');
        }
    }
    if let Some(seconds) = e.retry_after_seconds {
        let _ = writeln!(out, "This is temporary: retry after {seconds} seconds.\n");
    }
    if let Some(contact) = &e.contact {
        let _ = writeln!(out, "Contact: {contact}");
    }
    if let Some(policy) = &e.policy {
        let _ = write!(out, "Policy: {} ({})", policy.id, policy.title);
        if let Some(owner) = &policy.owner {
            let _ = write!(out, ", owned by {owner}");
        }
        out.push('\n');
        if let Some(docs) = &policy.docs {
            let _ = writeln!(out, "Docs: {docs}");
        }
    }
    if let Some(link) = &e.escalate {
        let _ = writeln!(out, "Request access: {} {}", link.method, link.href);
    }
    let _ = writeln!(
        out,
        "Denial id: {} (quote it when you ask for help)",
        e.denial_id
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::hostile;

    #[test]
    fn says_what_why_what_to_do_and_the_id() {
        let text = render(&hostile());
        assert!(text.starts_with("403 Forbidden: Title"), "{text}");
        assert!(text.contains("1. Missing permission [permission, high likelihood]"));
        assert!(text.contains("What you can do:\n  - caller step"));
        assert!(text.contains("For the administrators:\n  - admin step"));
        assert!(text.contains("retry after 30 seconds"));
        assert!(text.contains("Denial id: CQkJCQkJCQkJCQkJCQkJCQ"));
    }
}
