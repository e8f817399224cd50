//! The `events`, `sinks` and `escalation` sections: raw types and their
//! compilation. (Kept apart from the policy config they do not touch.)

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

#[cfg(feature = "schema")]
use schemars::JsonSchema;

use super::raw::S;

/// Where denial events go, and what is kept of them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawEvents {
    /// Sinks (names under `sinks`) that receive every denial event.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub sinks: Vec<S<String>>,
    /// How many recent denials are kept for lookup and self-service
    /// escalation (about 2 KiB each). Default 1000.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub recent_max: Option<S<u32>>,
    /// How long they are kept. Default `1h`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub recent_max_age: Option<S<String>>,
    /// Extra headers never to record (besides Authorization, Cookie, ...).
    #[serde(default)]
    pub redact_headers: Vec<String>,
    /// Extra query keys (substrings) whose values are redacted.
    #[serde(default)]
    pub redact_query_keys: Vec<String>,
    /// How many bytes of the upstream body an event keeps. Default 512.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub body_excerpt_bytes: Option<S<u32>>,
}

/// A sink: exactly one of `stdout`, `stderr`, `file`, `webhook`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawSink {
    /// JSON lines on standard output.
    #[serde(default)]
    pub stdout: Option<RawEmpty>,
    /// JSON lines on standard error.
    #[serde(default)]
    pub stderr: Option<RawEmpty>,
    /// JSON lines appended to a file, rotated by size.
    #[serde(default)]
    pub file: Option<RawFileSink>,
    /// An HTTP POST of each event.
    #[serde(default)]
    pub webhook: Option<RawWebhookSink>,
    /// Events that may wait for this sink; more are dropped and counted.
    /// Default 1024.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub queue: Option<S<u32>>,
}

/// No settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawEmpty {}

/// A file sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawFileSink {
    /// The file; its directory must exist.
    pub path: String,
    /// Rotate when the file would grow past this many bytes. Default 10 MiB.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u64>"))]
    pub max_bytes: Option<S<u64>>,
    /// Rotated files kept (`FILE.1` newest). Default 5.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub keep: Option<S<u32>>,
}

/// A webhook sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawWebhookSink {
    /// Where to POST: http://, or https:// with the `tls` feature.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub url: S<String>,
    /// Time for one attempt. Default `2s`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub timeout: Option<S<String>>,
    /// Attempts after the first, with exponential backoff and jitter. Default 3.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub retries: Option<S<u32>>,
    /// An environment variable holding the HMAC-SHA256 key; the signature of
    /// the body is sent as `x-whydenied-signature: sha256=HEX`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub secret_env: Option<S<String>>,
    /// The key itself (prefer `secret_env`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "BTreeMap<String, String>"))]
    pub headers: BTreeMap<String, S<String>>,
    /// For https: a PEM file of CA certificates trusted besides Mozilla's roots.
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// Escalation rules and self-service.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawEscalation {
    /// Rules evaluated on every denial.
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// "Request access" from the explanation.
    #[serde(default)]
    pub self_service: Option<RawSelfService>,
    /// Most (rule, key) pairs tracked at once; the oldest are evicted and
    /// counted. Default 100000.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub max_tracked_keys: Option<S<u32>>,
}

/// An escalation rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawRule {
    /// A unique id.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub id: S<String>,
    /// What must be the same among the counted denials: any of `identity`,
    /// `policy`, `client_ip`, `path`.
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub same: Vec<S<String>>,
    /// Count distinct values of this (`identity`) instead of denials: many
    /// callers newly denied by one policy, a likely regression.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub distinct: Option<S<String>>,
    /// How many (denials, or distinct values) make an incident.
    #[cfg_attr(feature = "schema", schemars(with = "u32"))]
    pub count: S<u32>,
    /// Within this window, such as `10m`.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub within: S<String>,
    /// At most one follow-up per cooldown while the incident goes on.
    /// Default `30m`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub cooldown: Option<S<String>>,
    /// Sinks to notify.
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub notify: Vec<S<String>>,
}

/// Self-service escalation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawSelfService {
    /// Offer "request access" in explanations.
    #[serde(default)]
    pub enabled: bool,
    /// Sinks to notify.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub notify: Vec<S<String>>,
    /// Path prefix served by whydenied itself. Default `/.whydenied`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub prefix: Option<S<String>>,
    /// Longest note, in bytes. Default 1000.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub max_note_bytes: Option<S<u32>>,
    /// Escalations one client may send per `per_client_within`. Default 3.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub per_client_count: Option<S<u32>>,
    /// Default `10m`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub per_client_within: Option<S<String>>,
    /// Longest a note may take to arrive (then 408). Default `10s`. Applies
    /// where whydenied has a timer (the sidecar, or the layer with the
    /// `sinks` feature); the lean layer relies on the server's timeouts.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub note_timeout: Option<S<String>>,
}

/// A compiled sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkSpec {
    /// Its name in the config.
    pub name: String,
    /// What it is.
    pub kind: SinkKind,
    /// Its queue length.
    pub queue: usize,
}

/// The kinds of sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A rotated file.
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Rotation size.
        max_bytes: u64,
        /// Rotated files kept.
        keep: u32,
    },
    /// An HTTP POST.
    Webhook(WebhookSpec),
}

/// A compiled webhook sink. Its `Debug` shows neither the secret nor the
/// extra headers' values (they usually carry a token).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSpec {
    /// Where.
    pub url: Uri,
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// HMAC key.
    pub secret: Option<Vec<u8>>,
    /// Extra headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// CA file for https.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("url", &format_args!("{}", self.url))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(name, _)| (name.as_str(), "<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// What an escalation rule keys on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    /// The caller (identity, else client address).
    Identity,
    /// The matched policy.
    Policy,
    /// The client address.
    ClientIp,
    /// The request path.
    Path,
}

/// A compiled escalation rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its id.
    pub id: String,
    /// What must be the same.
    pub same: Vec<Dimension>,
    /// Count distinct callers instead of denials.
    pub distinct_identity: bool,
    /// The threshold.
    pub count: u32,
    /// The window.
    pub within: Duration,
    /// Between follow-ups.
    pub cooldown: Duration,
    /// Sinks to notify.
    pub notify: Vec<String>,
}

/// Compiled self-service settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfService {
    /// Sinks to notify.
    pub notify: Vec<String>,
    /// The path prefix.
    pub prefix: String,
    /// Longest note.
    pub max_note_bytes: usize,
    /// Per-client limit.
    pub per_client_count: u32,
    /// Per-client window.
    pub per_client_within: Duration,
    /// Longest a note may take to arrive.
    pub note_timeout: Duration,
}

/// Everything about events, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSettings {
    /// Sinks for every denial.
    pub denial_sinks: Vec<String>,
    /// All sinks by name.
    pub sinks: Vec<SinkSpec>,
    /// Recent store size.
    pub recent_max: usize,
    /// Recent store age.
    pub recent_max_age: Duration,
    /// Extra redacted headers.
    pub redact_headers: Vec<String>,
    /// Extra redacted query words.
    pub redact_query_keys: Vec<String>,
    /// Body excerpt length.
    pub body_excerpt_bytes: usize,
    /// Escalation rules.
    pub rules: Vec<Rule>,
    /// Self-service, when enabled.
    pub self_service: Option<SelfService>,
    /// Key cap for the escalation state.
    pub max_tracked_keys: usize,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            denial_sinks: Vec::new(),
            sinks: Vec::new(),
            recent_max: 1_000,
            recent_max_age: Duration::from_secs(3600),
            redact_headers: Vec::new(),
            redact_query_keys: Vec::new(),
            body_excerpt_bytes: 512,
            rules: Vec::new(),
            self_service: None,
            max_tracked_keys: 100_000,
        }
    }
}

/// Reports a problem at a place.
pub(crate) type Err<'a> = &'a dyn Fn(&Location, String) -> super::ConfigError;

fn duration(
    v: &Option<S<String>>,
    field: &str,
    default: Duration,
    err: Err<'_>,
) -> Result<Duration, super::ConfigError> {
    match v {
        None => Ok(default),
        Some(v) => super::compile::parse_duration(&v.value).ok_or_else(|| {
            err(
                &v.referenced,
                format!("`{field}` must be a duration such as 30s, 10m or 1h"),
            )
        }),
    }
}

fn sink_names(
    list: &[Spanned<String>],
    sinks: &BTreeMap<String, RawSink>,
    err: Err<'_>,
) -> Result<Vec<String>, super::ConfigError> {
    list.iter()
        .map(|n| {
            if sinks.contains_key(&n.value) {
                Ok(n.value.clone())
            } else {
                let known: Vec<&str> = sinks.keys().map(String::as_str).collect();
                let mut msg = format!("unknown sink `{}`", crate::escape::clean(&n.value, 64));
                if let Some(s) = super::suggest(&n.value, &known) {
                    msg.push_str(&format!(" (did you mean `{s}`?)"));
                }
                msg.push_str("; define it under `sinks`");
                Err(err(&n.referenced, msg))
            }
        })
        .collect()
}

/// The most denials kept for lookup, and the most keys escalation rules
/// track: bounds on memory whatever the config says.
const MAX_KEPT: u32 = 1_000_000;

/// Compiles the three sections.
pub(crate) fn compile(
    events: Option<&RawEvents>,
    sinks: &BTreeMap<String, RawSink>,
    escalation: Option<&RawEscalation>,
    err: Err<'_>,
) -> Result<EventSettings, super::ConfigError> {
    let mut out = EventSettings::default();
    #[cfg(not(feature = "sinks"))]
    if let Some(name) = sinks.keys().next() {
        return Err(err(
            &Location::UNKNOWN,
            format!(
                "sink `{name}`: the built-in sinks need whydenied's `sinks` cargo feature (or use ExplainLayer::with_event_sink)"
            ),
        ));
    }
    for (name, raw) in sinks {
        let at = raw
            .queue
            .as_ref()
            .map(|q| q.referenced)
            .unwrap_or(Location::UNKNOWN);
        // Names reach metric labels and thread names.
        if !super::compile::is_id(name) || name.len() > 64 {
            return Err(err(
                &at,
                format!(
                    "sink name `{}` must be 1 to 64 of A-Z, a-z, 0-9, -, _ and .",
                    crate::escape::clean(name, 64)
                ),
            ));
        }
        let given = [
            raw.stdout.is_some(),
            raw.stderr.is_some(),
            raw.file.is_some(),
            raw.webhook.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(err(
                &at,
                format!("sink `{name}` takes exactly one of `stdout`, `stderr`, `file`, `webhook`"),
            ));
        }
        let kind = if raw.stdout.is_some() {
            SinkKind::Stdout
        } else if raw.stderr.is_some() {
            SinkKind::Stderr
        } else if let Some(f) = &raw.file {
            SinkKind::File {
                path: f.path.clone().into(),
                max_bytes: f
                    .max_bytes
                    .as_ref()
                    .map_or(10 * 1024 * 1024, |m| m.value.max(4096)),
                keep: f.keep.as_ref().map_or(5, |k| k.value.min(100)),
            }
        } else if let Some(w) = &raw.webhook {
            let url: Uri = w
                .url
                .value
                .parse()
                .map_err(|_| err(&w.url.referenced, "`url` is not a URL".into()))?;
            let scheme_ok = crate::config::scheme_supported(url.scheme_str());
            if !scheme_ok || url.authority().is_none() {
                let message = if cfg!(feature = "tls") {
                    "webhook `url` must be http:// or https://host[:port]/path"
                } else {
                    "webhook `url` must be http://host[:port]/path (https needs the `tls` feature)"
                };
                return Err(err(&w.url.referenced, message.into()));
            }
            let secret = match (&w.secret_env, &w.secret) {
                (Some(var), _) => Some(
                    std::env::var(&var.value)
                        .map_err(|_| {
                            err(
                                &var.referenced,
                                format!("environment variable `{}` is not set", var.value),
                            )
                        })?
                        .into_bytes(),
                ),
                (None, Some(s)) => Some(s.clone().into_bytes()),
                (None, None) => None,
            };
            if secret.as_ref().is_some_and(Vec::is_empty) {
                let at = w
                    .secret_env
                    .as_ref()
                    .map_or(w.url.referenced, |v| v.referenced);
                return Err(err(
                    &at,
                    "the webhook secret is empty: an empty key signs nothing a receiver can trust"
                        .into(),
                ));
            }
            let mut headers = Vec::new();
            for (k, v) in &w.headers {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| err(&v.referenced, format!("`{k}` is not a header name")))?;
                let value = HeaderValue::from_str(&v.value).map_err(|_| {
                    err(
                        &v.referenced,
                        format!("the value of `{k}` is not a valid header value"),
                    )
                })?;
                headers.push((name, value));
            }
            SinkKind::Webhook(WebhookSpec {
                url,
                timeout: duration(&w.timeout, "timeout", Duration::from_secs(2), err)?,
                retries: w.retries.as_ref().map_or(3, |r| r.value.min(10)),
                secret,
                headers,
                ca_file: w.ca_file.as_ref().map(std::path::PathBuf::from),
            })
        } else {
            SinkKind::Stdout
        };
        out.sinks.push(SinkSpec {
            name: name.clone(),
            kind,
            queue: raw
                .queue
                .as_ref()
                .map_or(1024, |q| q.value.clamp(1, 1 << 20) as usize),
        });
    }
    if let Some(e) = events {
        out.denial_sinks = sink_names(&e.sinks, sinks, err)?;
        if let Some(m) = &e.recent_max {
            if m.value > MAX_KEPT {
                return Err(err(
                    &m.referenced,
                    format!(
                        "`recent_max` is at most {MAX_KEPT} (each kept denial takes a few KiB)"
                    ),
                ));
            }
            out.recent_max = m.value as usize;
        }
        out.recent_max_age =
            duration(&e.recent_max_age, "recent_max_age", out.recent_max_age, err)?;
        out.redact_headers = e
            .redact_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        out.redact_query_keys = e
            .redact_query_keys
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        if let Some(b) = &e.body_excerpt_bytes {
            out.body_excerpt_bytes = (b.value as usize).min(4096);
        }
    }
    if let Some(esc) = escalation {
        let mut seen = std::collections::HashSet::new();
        for r in &esc.rules {
            if !super::compile::is_id(&r.id.value) || r.id.value.len() > 64 {
                return Err(err(
                    &r.id.referenced,
                    "a rule id must be 1 to 64 of A-Z, a-z, 0-9, -, _ and .".into(),
                ));
            }
            if !seen.insert(r.id.value.clone()) {
                return Err(err(
                    &r.id.referenced,
                    format!("duplicate rule id `{}`", r.id.value),
                ));
            }
            let mut same = Vec::new();
            for d in &r.same {
                same.push(dimension(d, err)?);
            }
            let distinct_identity = match &r.distinct {
                None => false,
                Some(d) if d.value == "identity" => true,
                Some(d) => {
                    return Err(err(
                        &d.referenced,
                        "`distinct` can only be `identity`".into(),
                    ));
                }
            };
            if r.count.value == 0 || r.count.value > 100_000 {
                return Err(err(
                    &r.count.referenced,
                    "`count` must be between 1 and 100000".into(),
                ));
            }
            let within = super::compile::parse_duration(&r.within.value).ok_or_else(|| {
                err(
                    &r.within.referenced,
                    "`within` must be a duration such as 10m".into(),
                )
            })?;
            out.rules.push(Rule {
                id: r.id.value.clone(),
                same,
                distinct_identity,
                count: r.count.value,
                within,
                cooldown: duration(&r.cooldown, "cooldown", Duration::from_secs(1800), err)?,
                notify: sink_names(&r.notify, sinks, err)?,
            });
        }
        if let Some(ss) = esc.self_service.as_ref().filter(|s| s.enabled) {
            let prefix = ss.prefix.as_ref().map_or_else(
                || "/.whydenied".to_owned(),
                |p| p.value.trim_end_matches('/').to_owned(),
            );
            if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains(['?', '#', '*']) {
                let at = ss
                    .prefix
                    .as_ref()
                    .map(|p| p.referenced)
                    .unwrap_or(Location::UNKNOWN);
                return Err(err(
                    &at,
                    "`prefix` must be a path such as /.whydenied".into(),
                ));
            }
            out.self_service = Some(SelfService {
                notify: sink_names(&ss.notify, sinks, err)?,
                prefix,
                max_note_bytes: ss
                    .max_note_bytes
                    .as_ref()
                    .map_or(1000, |m| (m.value as usize).min(16 * 1024)),
                per_client_count: ss.per_client_count.as_ref().map_or(3, |c| c.value.max(1)),
                per_client_within: duration(
                    &ss.per_client_within,
                    "per_client_within",
                    Duration::from_secs(600),
                    err,
                )?,
                note_timeout: duration(
                    &ss.note_timeout,
                    "note_timeout",
                    Duration::from_secs(10),
                    err,
                )?,
            });
        }
        if let Some(m) = &esc.max_tracked_keys {
            if m.value > MAX_KEPT {
                return Err(err(
                    &m.referenced,
                    format!(
                        "`max_tracked_keys` is at most {MAX_KEPT} (each key holds a window of recent denials)"
                    ),
                ));
            }
            out.max_tracked_keys = (m.value as usize).max(16);
        }
    }
    Ok(out)
}

fn dimension(d: &S<String>, err: Err<'_>) -> Result<Dimension, super::ConfigError> {
    Ok(match d.value.as_str() {
        "identity" => Dimension::Identity,
        "policy" => Dimension::Policy,
        "client_ip" => Dimension::ClientIp,
        "path" => Dimension::Path,
        other => {
            let known = ["identity", "policy", "client_ip", "path"];
            let mut msg = format!("unknown dimension `{}`", crate::escape::clean(other, 64));
            if let Some(s) = super::suggest(other, &known) {
                msg.push_str(&format!(" (did you mean `{s}`?)"));
            }
            msg.push_str("; use identity, policy, client_ip or path");
            return Err(err(&d.referenced, msg));
        }
    })
}
