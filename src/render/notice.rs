//! Short answers that are not explanations: "your request for access was
//! sent", and the refusals of a self-service escalation. Same formats, same
//! escaping, same security headers as an explanation.

use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::escape::html as esc;
use crate::negotiate::Negotiated;

/// A notice to render.
pub struct Notice<'a> {
    /// The status.
    pub status: StatusCode,
    /// A short title.
    pub title: &'a str,
    /// One or two sentences.
    pub detail: &'a str,
    /// The escalation id, when one was made.
    pub escalation_id: Option<&'a str>,
    /// The denial concerned.
    pub denial_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Json<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    escalation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    denial_id: Option<&'a str>,
}

/// The notice as a response in the negotiated format.
pub fn response(notice: &Notice<'_>, format: Negotiated, head: bool) -> Response<Bytes> {
    let body = match format {
        Negotiated::ProblemJson => serde_json::to_string_pretty(&Json {
            kind: if notice.status.is_success() {
                "urn:whydenied:escalation:accepted"
            } else {
                "urn:whydenied:escalation:refused"
            },
            title: notice.title,
            status: notice.status.as_u16(),
            detail: notice.detail,
            escalation_id: notice.escalation_id,
            denial_id: notice.denial_id,
        })
        .unwrap_or_default(),
        Negotiated::Text => {
            let mut t = format!(
                "{} {}\n\n{}\n",
                notice.status.as_u16(),
                notice.title,
                notice.detail
            );
            if let Some(id) = notice.escalation_id {
                let _ = writeln!(t, "\nEscalation id: {id}");
            }
            if let Some(id) = notice.denial_id {
                let _ = writeln!(t, "Denial id: {id}");
            }
            t
        }
        Negotiated::Html => {
            let mut p = String::from(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
                 <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>",
            );
            esc(notice.title, &mut p);
            p.push_str("</title></head><body><main><h1>");
            esc(notice.title, &mut p);
            p.push_str("</h1><p>");
            esc(notice.detail, &mut p);
            p.push_str("</p>");
            if let Some(id) = notice.escalation_id {
                p.push_str("<p>Escalation id: <code>");
                esc(id, &mut p);
                p.push_str("</code></p>");
            }
            if let Some(id) = notice.denial_id {
                p.push_str("<p>Denial id: <code>");
                esc(id, &mut p);
                p.push_str("</code></p>");
            }
            p.push_str("</main></body></html>\n");
            p
        }
    };
    let mut res = Response::new(if head {
        Bytes::new()
    } else {
        Bytes::from(body.clone())
    });
    *res.status_mut() = notice.status;
    let h = res.headers_mut();
    super::set_common_headers(h, format, body.len());
    h.insert(header::VARY, HeaderValue::from_static("accept"));
    if format == Negotiated::Html {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
        );
    }
    if let Some(id) = notice
        .escalation_id
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        h.insert("x-escalation-id", id);
    }
    res
}
