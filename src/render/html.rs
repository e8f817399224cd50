//! `text/html`: a self-contained page for people. No scripts, no external
//! assets, readable on a phone; every reflected value is escaped.

use std::fmt::Write as _;

use super::{cause_label, status_line};
use crate::escape::html as esc;
use crate::explanation::{Audience, Explanation};

/// The page's only style sheet. Its hash is pinned in the CSP.
const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1d2330;--muted:#5b6475;--bg:#f6f7f9;--card:#fff;--line:#dde1e8;--accent:#b42318}\
@media (prefers-color-scheme:dark){:root{--fg:#e8eaee;--muted:#a3abb9;--bg:#14171c;--card:#1d2128;--line:#313743;--accent:#f97066}}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,\"Segoe UI\",Roboto,sans-serif}\
main{max-width:42rem;margin:0 auto;padding:1.5rem 1rem 3rem}\
.status{color:var(--accent);font-weight:600;letter-spacing:.02em;margin:0}\
h1{font-size:1.6rem;line-height:1.25;margin:.3rem 0 .8rem;overflow-wrap:anywhere}\
h2{font-size:1.05rem;margin:0 0 .5rem}\
section{background:var(--card);border:1px solid var(--line);border-radius:.6rem;padding:1rem 1.1rem;margin:1rem 0}\
ol,ul{margin:0;padding-left:1.3rem}li{margin:.25rem 0;overflow-wrap:anywhere}\
.lk,.effort,.muted{color:var(--muted);font-size:.9rem}\
.evidence{color:var(--muted);font-size:.92rem}\
code{font:600 .95rem ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}\
.id{font-size:1.05rem;padding:.15rem .35rem;border:1px solid var(--line);border-radius:.3rem;background:var(--bg)}\
a{color:inherit}\
button{font:inherit;padding:.5rem 1rem;border-radius:.4rem;border:1px solid var(--line);background:var(--accent);color:#fff;cursor:pointer}\
textarea{width:100%;min-height:4rem;font:inherit;margin:.5rem 0}";

/// The CSP hash of the page's style sheet (`'sha256-…'`), checked by a test.
pub const STYLE_CSP_HASH: &str = "sha256-P2GWp16lpJIce3mhAJHV8HUFuTgZjpS/oIkcGAkoqX0=";

pub(super) fn render(e: &Explanation) -> String {
    let mut p = String::with_capacity(4096 + STYLE.len());
    p.push_str(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><meta name=\"referrer\" content=\"no-referrer\"><title>",
    );
    esc(&status_line(e), &mut p);
    p.push_str(" · ");
    esc(&e.title, &mut p);
    p.push_str("</title><style>");
    p.push_str(STYLE);
    p.push_str("</style></head>\n<body><main>\n<p class=\"status\">");
    esc(&status_line(e), &mut p);
    p.push_str("</p>\n<h1>");
    esc(&e.title, &mut p);
    p.push_str("</h1>\n<p>");
    esc(&e.detail, &mut p);
    p.push_str("</p>\n");
    if let Some(seconds) = e.retry_after_seconds {
        let _ = writeln!(
            p,
            "<p><strong>This is temporary.</strong> You can try again in {seconds} seconds.</p>"
        );
    }
    if let Some(id) = &e.identity {
        p.push_str("<p class=\"muted\">You are signed in as <strong>");
        esc(&id.name, &mut p);
        p.push_str("</strong>");
        if id.unverified {
            p.push_str(" (as read from your token)");
        }
        p.push_str(".</p>\n");
    }

    if !e.causes.is_empty() {
        p.push_str("<section><h2>Why this happened</h2><ol>\n");
        for cause in &e.causes {
            p.push_str("<li><strong>");
            esc(cause_label(cause.cause), &mut p);
            let _ = write!(
                p,
                "</strong> <span class=\"lk\">({} likelihood)</span>",
                cause.likelihood
            );
            if !cause.evidence.is_empty() {
                p.push_str("<ul class=\"evidence\">");
                for evidence in &cause.evidence {
                    p.push_str("<li>");
                    esc(evidence, &mut p);
                    p.push_str("</li>");
                }
                p.push_str("</ul>");
            }
            p.push_str("</li>\n");
        }
        p.push_str("</ol></section>\n");
    }

    for (audience, heading) in [
        (Audience::Caller, "What you can do"),
        (Audience::Admin, "For the administrators"),
    ] {
        let mut steps = e
            .remediation
            .iter()
            .filter(|r| r.audience == audience)
            .peekable();
        if steps.peek().is_none() {
            continue;
        }
        let _ = writeln!(p, "<section><h2>{heading}</h2><ul>");
        for step in steps {
            p.push_str("<li>");
            esc(&step.step, &mut p);
            let _ = writeln!(p, " <span class=\"effort\">({})</span></li>", step.effort);
        }
        p.push_str("</ul></section>\n");
    }

    p.push_str("<section><h2>Getting help</h2>\n");
    if let Some(contact) = &e.contact {
        p.push_str("<p>Contact: <strong>");
        esc(contact, &mut p);
        p.push_str("</strong></p>\n");
    }
    if let Some(policy) = &e.policy {
        p.push_str("<p class=\"muted\">Denied by policy <code>");
        esc(&policy.id, &mut p);
        p.push_str("</code> (");
        esc(&policy.title, &mut p);
        p.push(')');
        if let Some(owner) = &policy.owner {
            p.push_str(", owned by ");
            esc(owner, &mut p);
        }
        p.push('.');
        if let Some(docs) = &policy.docs {
            p.push_str(" <a rel=\"noopener noreferrer\" href=\"");
            esc(docs, &mut p);
            p.push_str("\">Read the policy</a>.");
        }
        p.push_str("</p>\n");
    }
    p.push_str("<p>Quote this denial id when you ask for help: <code class=\"id\">");
    esc(e.denial_id.as_str(), &mut p);
    p.push_str("</code></p>\n");
    if let Some(link) = &e.escalate {
        p.push_str("<form method=\"post\" action=\"");
        esc(&link.href, &mut p);
        p.push_str(
            "\"><label for=\"note\">Why do you need access? (optional)</label>\
             <textarea id=\"note\" name=\"note\" maxlength=\"1000\"></textarea>\
             <button type=\"submit\">Request access</button></form>\n",
        );
    }
    p.push_str("</section>\n</main></body></html>\n");
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::hostile;
    use base64::Engine as _;
    use sha2::Digest as _;

    #[test]
    fn csp_hash_matches_the_style() {
        let digest = sha2::Sha256::digest(STYLE.as_bytes());
        let hash = format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        );
        assert_eq!(STYLE_CSP_HASH, hash);
    }

    #[test]
    fn every_reflected_value_is_escaped() {
        let page = render(&hostile());
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("Title &lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
        assert!(page.contains("href=\"https://wiki.example.com/a?b=1&amp;c=&quot;2&quot;\""));
        // Exactly one element of each kind that could run or load something.
        assert_eq!(page.matches("<style>").count(), 1);
        assert!(!page.contains("<script") && !page.contains("<img") && !page.contains("src="));
    }

    #[test]
    fn says_what_why_what_to_do_whom_to_ask_and_the_id() {
        let page = render(&hostile());
        for needle in [
            "Why this happened",
            "What you can do",
            "For the administrators",
            "Getting help",
            "Contact:",
            "CQkJCQkJCQkJCQkJCQkJCQ",
            "try again in 30 seconds",
            "width=device-width",
        ] {
            assert!(page.contains(needle), "missing {needle}");
        }
    }
}
