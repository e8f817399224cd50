//! Self-service escalation: a denied caller presses "request access".
//!
//! The layer serves `POST {prefix}/denials/{id}/escalate` itself, before the
//! inner service. Only ids still in the recent store are accepted, only the
//! caller who was denied (same identity, else same client address) may
//! escalate, a per-client rate limit applies, and the note is bounded and
//! cleaned. The escalation event carries the denial's recorded evidence.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;

use crate::config::Config;
use crate::config::events::SelfService;
use crate::escape::clean;
use crate::events::record::{Recorder, caller_key};
use crate::events::time::rfc3339;
use crate::events::{EscalationEvent, Event, IdentityRecord, SCHEMA_VERSION};
use crate::facts::RequestFacts;
use crate::id::DenialId;
use crate::negotiate::Negotiated;
use crate::render::notice::{Notice, response};

/// Clients tracked by the rate limiter, at most.
const MAX_CLIENTS: usize = 10_000;

/// The denial id of a self-service path, if `path` is one.
pub fn escalate_target(path: &str, prefix: &str) -> Option<DenialId> {
    let rest = path.strip_prefix(prefix)?.strip_prefix("/denials/")?;
    let id = rest.strip_suffix("/escalate")?;
    DenialId::parse(id)
}

/// The link an explanation offers.
pub fn link(settings: &SelfService, id: &DenialId) -> String {
    format!("{}/denials/{id}/escalate", settings.prefix)
}

/// Escalations per client within a window.
#[derive(Debug, Default)]
pub struct ClientLimiter {
    seen: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl ClientLimiter {
    /// Whether every one of `clients` may escalate now; counts the attempt
    /// against each if so.
    fn allow(&self, clients: &[&str], count: u32, within: Duration, now: Instant) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        let new = clients.iter().filter(|c| !seen.contains_key(**c)).count();
        if new > 0 && seen.len() + new > MAX_CLIENTS {
            seen.retain(|_, hits| hits.back().is_some_and(|t| now.duration_since(*t) < within));
            if seen.len() + new > MAX_CLIENTS {
                return false;
            }
        }
        for client in clients {
            let hits = seen.entry((*client).to_owned()).or_default();
            while hits
                .front()
                .is_some_and(|t| now.duration_since(*t) >= within)
            {
                hits.pop_front();
            }
            if hits.len() >= count as usize {
                return false;
            }
        }
        for client in clients {
            if let Some(hits) = seen.get_mut(*client) {
                hits.push_back(now);
            }
        }
        true
    }
}

/// Why a note could not be read.
enum NoteError {
    TooLong,
    Unreadable,
    #[cfg(feature = "sinks")]
    TooSlow,
}

/// The request body, up to `limit` bytes.
async fn read_note<B: Body>(body: B, limit: usize) -> Result<Vec<u8>, NoteError> {
    let mut body = std::pin::pin!(body);
    let mut raw = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| NoteError::Unreadable)?;
        if let Ok(mut data) = frame.into_data() {
            if raw.len() + data.remaining() > limit {
                return Err(NoteError::TooLong);
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                raw.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(raw)
}

fn refuse(
    status: StatusCode,
    title: &str,
    detail: &str,
    id: &DenialId,
    format: Negotiated,
) -> Response<Bytes> {
    let id = id.to_string();
    response(
        &Notice {
            status,
            title,
            detail,
            escalation_id: None,
            denial_id: Some(&id),
        },
        format,
        false,
    )
}

/// Percent-decodes a form value (`+` is a space).
fn form_decode(value: &str) -> Option<String> {
    let mut out = Vec::with_capacity(value.len());
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The note from a form, JSON or text body.
fn note_of(content_type: &str, body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return Some(String::new());
    }
    let text = std::str::from_utf8(body).ok()?;
    if content_type.starts_with("application/x-www-form-urlencoded") {
        Some(
            text.split('&')
                .find_map(|pair| pair.strip_prefix("note=").map(form_decode))
                .unwrap_or(Some(String::new()))?,
        )
    } else if content_type.starts_with("application/json") {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(
            v.get("note")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_owned(),
        )
    } else {
        Some(text.to_owned())
    }
}

/// Handles one self-service request.
pub async fn handle<B>(
    config: Arc<Config>,
    recorder: Arc<Recorder>,
    facts: RequestFacts,
    identity: Option<IdentityRecord>,
    id: DenialId,
    req: Request<B>,
) -> Response<Bytes>
where
    B: Body,
    B::Error: std::fmt::Display,
{
    let format = Negotiated::from_accept_bytes(facts.accept());
    let Some(settings) = config.events().self_service.clone() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "Not found",
            "Self-service escalation is not enabled.",
            &id,
            format,
        );
    };
    let Some(recorded) = recorder.store.get(&id) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "Unknown denial",
            "This denial id is unknown or too old to escalate. Try the request again, then use the new denial's link.",
            &id,
            format,
        );
    };
    let client = caller_key(identity.as_ref(), facts.client_ip(&config));
    if client != recorded.client_key {
        return refuse(
            StatusCode::FORBIDDEN,
            "Not your denial",
            "Only the caller who was denied can request access for this denial.",
            &id,
            format,
        );
    }
    // Per caller, and per address too: an identity can be a claim of an
    // unverified token, so one client could otherwise escalate as many
    // names as it can make up.
    let address = facts.client_ip(&config).map(|ip| format!("ip:{ip}"));
    let mut keys = vec![client.as_str()];
    if let Some(address) = address.as_deref().filter(|a| *a != client) {
        keys.push(address);
    }
    if !recorder.limiter.allow(
        &keys,
        settings.per_client_count,
        settings.per_client_within,
        Instant::now(),
    ) {
        let mut res = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests for access",
            "You have sent several requests for access recently. Wait before sending another.",
            &id,
            format,
        );
        res.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(settings.per_client_within.as_secs()),
        );
        return res;
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    // A form-encoded note can be three times its text; read no more.
    let limit = settings.max_note_bytes * 3 + 16;
    let too_long = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Note too long",
            "Shorten the note and send it again.",
            &id,
            format,
        )
    };
    let read = read_note(req.into_body(), limit);
    // A client that sends its note slowly must not hold the request for
    // ever (the sidecar's own limits do not cover a body the layer reads).
    #[cfg(feature = "sinks")]
    let read = async {
        tokio::time::timeout(settings.note_timeout, read)
            .await
            .unwrap_or(Err(NoteError::TooSlow))
    };
    let raw = match read.await {
        Ok(raw) => raw,
        Err(NoteError::TooLong) => return too_long(),
        Err(NoteError::Unreadable) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Unreadable request",
                "The request body could not be read.",
                &id,
                format,
            );
        }
        #[cfg(feature = "sinks")]
        Err(NoteError::TooSlow) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "Request too slow",
                "The note did not arrive in time. Send it again.",
                &id,
                format,
            );
        }
    };
    let Some(note) = note_of(&content_type, &raw) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Unreadable note",
            "Send the note as a form field `note`, as JSON {\"note\": \"...\"} or as UTF-8 text.",
            &id,
            format,
        );
    };
    if note.len() > settings.max_note_bytes {
        return too_long();
    }
    let note = crate::events::redact::scrub_owned(clean(&note, settings.max_note_bytes));
    let denial = recorded.event;
    let who = denial
        .identity
        .as_ref()
        .map(crate::events::IdentityRecord::for_people)
        .or_else(|| denial.client_ip.map(|ip| ip.to_string()))
        .unwrap_or_else(|| "An unidentified caller".to_owned());
    let policy = denial.policy.as_ref().map(|p| p.id.clone());
    let by = policy
        .as_ref()
        .map_or_else(|| "the upstream".to_owned(), |p| format!("policy `{p}`"));
    let cause = denial
        .causes
        .first()
        .map_or("unknown", |c| c.cause.as_str());
    let summary = format!(
        "{who} asks for access to {} {}, denied by {by} at {} (denial {}). Likely cause: {cause}. \
         Check first: whether {who} should have this access; the note says: {}",
        denial.method,
        denial.url,
        denial.ts,
        denial.denial_id,
        if note.is_empty() {
            "(no note)"
        } else {
            note.as_str()
        },
    );
    let escalation_id = DenialId::random()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let event = EscalationEvent {
        schema: SCHEMA_VERSION,
        event: "escalation",
        escalation_id: escalation_id.clone(),
        ts: rfc3339(SystemTime::now()),
        rule: "self_service".to_owned(),
        policy,
        count: 1,
        window: String::new(),
        distinct_identities: 1,
        identities: vec![who],
        first_seen: denial.ts.clone(),
        last_seen: denial.ts.clone(),
        sample_denial_ids: vec![denial.denial_id.clone()],
        follow_up: false,
        summary: clean(&summary, 4000),
        note: Some(note),
        denial: Some(Box::new((*denial).clone())),
    };
    metrics::counter!("whydenied_escalations_total", "rule" => "self_service").increment(1);
    recorder.emit(
        &config,
        &settings.notify,
        Event::Escalation(Arc::new(event)),
    );
    let denial_id = id.to_string();
    response(
        &Notice {
            status: StatusCode::ACCEPTED,
            title: "Your request for access was sent",
            detail: "The owners of the policy that denied you were notified, with the evidence of the denial. Quote the escalation id if you follow up.",
            escalation_id: Some(&escalation_id),
            denial_id: Some(&denial_id),
        },
        format,
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_notes() {
        let id = DenialId::from_bytes([3; 16]);
        let path = format!("/.whydenied/denials/{id}/escalate");
        assert_eq!(escalate_target(&path, "/.whydenied"), Some(id));
        assert_eq!(
            escalate_target("/.whydenied/denials/x/escalate", "/.whydenied"),
            None
        );
        assert_eq!(escalate_target(&path, "/other"), None);
        assert_eq!(
            note_of(
                "application/x-www-form-urlencoded",
                b"note=I+need+it%21&x=1"
            )
            .as_deref(),
            Some("I need it!")
        );
        assert_eq!(
            note_of("application/json", br#"{"note":"hi"}"#).as_deref(),
            Some("hi")
        );
        assert_eq!(note_of("text/plain", b"plain").as_deref(), Some("plain"));
        assert_eq!(note_of("text/plain", b"\xff"), None);
    }

    #[test]
    fn the_limiter_counts_per_client() {
        let l = ClientLimiter::default();
        let t = Instant::now();
        let w = Duration::from_secs(60);
        assert!(l.allow(&["a"], 2, w, t));
        assert!(l.allow(&["a"], 2, w, t));
        assert!(!l.allow(&["a"], 2, w, t));
        assert!(l.allow(&["b"], 2, w, t));
        assert!(l.allow(&["a"], 2, w, t + Duration::from_secs(61)));
    }

    #[test]
    fn made_up_names_from_one_address_share_its_limit() {
        let l = ClientLimiter::default();
        let t = Instant::now();
        let w = Duration::from_secs(60);
        assert!(l.allow(&["identity:x1", "ip:192.0.2.1"], 2, w, t));
        assert!(l.allow(&["identity:x2", "ip:192.0.2.1"], 2, w, t));
        // A third name from the same address: the address's limit holds, and
        // the refused attempt is counted against nobody.
        assert!(!l.allow(&["identity:x3", "ip:192.0.2.1"], 2, w, t));
        assert!(l.allow(&["identity:x3", "ip:192.0.2.2"], 2, w, t));
        assert!(l.allow(&["identity:x3", "ip:192.0.2.3"], 2, w, t));
        assert!(!l.allow(&["identity:x3", "ip:192.0.2.4"], 2, w, t));
    }
}
