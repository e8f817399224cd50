//! Events: every explained denial becomes a [`DenialEvent`]; the denials that
//! need a human become an [`EscalationEvent`]. Both are one JSON object per
//! line with `schema` and `event`, go to `tracing` (target
//! `whydenied::events`) always, and to the configured sinks.
//!
//! Sinks are pluggable ([`EventSink`]); the `sinks` feature brings the
//! built-in ones (stdout, stderr, file with rotation, webhook), each with its
//! own bounded queue and worker, so a slow or dead sink never slows or fails a
//! request: what it cannot take is dropped and counted.

pub mod record;
pub mod redact;
#[cfg(feature = "sinks")]
pub mod sinks;
pub mod store;
pub mod time;

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::explanation::Cause;

/// The version of the event format.
pub const SCHEMA_VERSION: u32 = 1;

/// Who the caller is, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct IdentityRecord {
    /// The name.
    pub name: String,
    /// `header` (set by a trusted proxy or the app) or `jwt_unverified`.
    pub source: &'static str,
}

impl IdentityRecord {
    /// The name as a summary for people shows it: one read from a token
    /// that whydenied did not verify says so (the caller may have made it up).
    pub fn for_people(&self) -> String {
        if self.source == "jwt_unverified" {
            format!("{} (named by a token whydenied did not verify)", self.name)
        } else {
            self.name.clone()
        }
    }
}

/// The matched policy, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PolicyRecord {
    /// Its id.
    pub id: String,
    /// Its title.
    pub title: String,
    /// Its owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// What the upstream answered, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpstreamRecord {
    /// Its status.
    pub status: u16,
    /// The headers kept as evidence (never a secret one).
    pub headers: Vec<(String, String)>,
    /// The start of its body, with tokens scrubbed.
    pub body_excerpt: String,
}

/// One explained denial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DenialEvent {
    /// The event format version.
    pub schema: u32,
    /// Always `denial`.
    pub event: &'static str,
    /// The id the caller was given.
    pub denial_id: String,
    /// When, in RFC 3339.
    pub ts: String,
    /// The response status.
    pub status: u16,
    /// The request method.
    pub method: String,
    /// Path and query, with secret-looking query values redacted.
    pub url: String,
    /// The requested host.
    pub host: String,
    /// The client address as whydenied sees it.
    pub client_ip: Option<IpAddr>,
    /// The caller, when known.
    pub identity: Option<IdentityRecord>,
    /// The caller's user agent.
    pub user_agent: String,
    /// The matched policy.
    pub policy: Option<PolicyRecord>,
    /// All causes with their evidence.
    pub causes: Vec<Cause>,
    /// What the upstream answered.
    pub upstream: UpstreamRecord,
    /// The config revision that explained it.
    pub config_revision: String,
}

/// A denial (or several) that a human must look at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EscalationEvent {
    /// The event format version.
    pub schema: u32,
    /// Always `escalation`.
    pub event: &'static str,
    /// Its id.
    pub escalation_id: String,
    /// When, in RFC 3339.
    pub ts: String,
    /// The rule that fired, or `self_service`.
    pub rule: String,
    /// The policy involved, if one.
    pub policy: Option<String>,
    /// Denials counted in this incident (since the last event for a follow-up).
    pub count: u64,
    /// The rule's window, such as `10m`.
    pub window: String,
    /// How many distinct callers were denied.
    pub distinct_identities: u64,
    /// Some of them (bounded).
    pub identities: Vec<String>,
    /// The first denial of the incident.
    pub first_seen: String,
    /// The latest.
    pub last_seen: String,
    /// Some denial ids to look up.
    pub sample_denial_ids: Vec<String>,
    /// True for a follow-up of an incident already reported.
    pub follow_up: bool,
    /// What is happening, to whom, since when, which policy, the likely cause
    /// and what to check first.
    pub summary: String,
    /// Self-service: the caller's note.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Self-service: the denial's recorded evidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denial: Option<Box<DenialEvent>>,
}

/// Any event line, for the published JSON Schema (`whydenied schema events`).
#[cfg(feature = "schema")]
#[derive(schemars::JsonSchema)]
#[schemars(title = "whydenied event", untagged)]
#[allow(dead_code)]
pub enum AnyEvent {
    /// `"event": "denial"`.
    Denial(DenialEvent),
    /// `"event": "escalation"`.
    Escalation(EscalationEvent),
}

/// An event, ready to send.
#[derive(Clone, Debug)]
pub enum Event {
    /// A denial.
    Denial(Arc<DenialEvent>),
    /// An escalation.
    Escalation(Arc<EscalationEvent>),
}

impl Event {
    /// One JSON line (without the newline). Control characters are escaped by
    /// JSON, so the line never breaks.
    pub fn to_json_line(&self) -> String {
        // Sized for a typical event, so the line is not regrown as it is written.
        let mut out = Vec::with_capacity(2048);
        let written = match self {
            Event::Denial(e) => serde_json::to_writer(&mut out, &**e),
            Event::Escalation(e) => serde_json::to_writer(&mut out, &**e),
        };
        match written.map(|()| String::from_utf8(out)) {
            Ok(Ok(line)) => line,
            _ => "{\"schema\":1,\"event\":\"unserializable\"}".to_owned(),
        }
    }

    /// `denial` or `escalation`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Denial(_) => "denial",
            Event::Escalation(_) => "escalation",
        }
    }
}

/// Somewhere events go. `emit` is called on the request path: it must not
/// block (queue and return).
pub trait EventSink: Send + Sync + 'static {
    /// Takes one event.
    fn emit(&self, event: &Event, line: &Arc<str>);
}

/// The `tracing` target of events; the message is the event's JSON line.
pub const TRACE_TARGET: &str = "whydenied::events";

/// Logs the event to `tracing` at [`TRACE_TARGET`].
pub fn trace(event: &Event, line: &str) {
    tracing::info!(target: TRACE_TARGET, event = event.kind(), "{line}");
}
