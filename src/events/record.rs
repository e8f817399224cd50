//! Turning an explained denial into a [`DenialEvent`], and sending events to
//! `tracing`, the configured sinks and the app's own sinks.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::HeaderMap;

use super::redact::{Redactor, scrub_owned};
use super::store::{RecentStore, Recorded};
use super::time::rfc3339;
use super::{
    DenialEvent, Event, EventSink, IdentityRecord, PolicyRecord, SCHEMA_VERSION, UpstreamRecord,
    trace,
};
use crate::config::Config;
use crate::escalation::{Escalator, Observed};
use crate::escape::clean;
use crate::explanation::Explanation;
use crate::facts::RequestFacts;

/// The live sinks of one config. Built on the first event under that config
/// and dropped with it (their threads finish their queues and end).
#[derive(Default)]
pub struct Hub {
    sinks: HashMap<String, Arc<dyn EventSink>>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("sinks", &self.sinks.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Hub {
    /// Starts the sinks of `config`.
    pub fn start(config: &Config) -> Self {
        #[cfg_attr(not(feature = "sinks"), allow(unused_mut))]
        let mut sinks: HashMap<String, Arc<dyn EventSink>> = HashMap::new();
        #[cfg(feature = "sinks")]
        for spec in &config.events().sinks {
            sinks.insert(spec.name.clone(), super::sinks::start(spec));
        }
        #[cfg(not(feature = "sinks"))]
        let _ = config;
        Self { sinks }
    }

    fn send(&self, names: &[String], event: &Event, line: &Arc<str>) {
        for name in names {
            if let Some(sink) = self.sinks.get(name) {
                sink.emit(event, line);
            }
        }
    }
}

/// Why a request is in the store: who may escalate it.
pub fn caller_key(identity: Option<&IdentityRecord>, client: Option<std::net::IpAddr>) -> String {
    match (identity, client) {
        (Some(id), _) => format!("identity:{}", id.name),
        (None, Some(ip)) => format!("ip:{ip}"),
        (None, None) => "unknown".to_owned(),
    }
}

/// Upstream headers kept as evidence.
fn evidence_header(name: &str) -> bool {
    matches!(
        name,
        "www-authenticate" | "retry-after" | "server" | "content-type" | "via" | "x-cache"
    ) || name.starts_with("ratelimit")
        || name.starts_with("x-ratelimit")
        || name.ends_with("request-id")
        || name.starts_with("x-amz-")
        || name.starts_with("cf-")
}

/// Builds the event of one explained denial, taking what it records from the
/// explanation (rendered already) rather than copying it.
pub fn denial_event(
    config: &Config,
    facts: &RequestFacts,
    explanation: Explanation,
    upstream_headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> DenialEvent {
    let settings = config.events();
    let redactor = Redactor {
        extra_headers: &settings.redact_headers,
        extra_query_words: &settings.redact_query_keys,
    };
    let excerpt = &body[..body.len().min(settings.body_excerpt_bytes)];
    DenialEvent {
        schema: SCHEMA_VERSION,
        event: "denial",
        denial_id: explanation.denial_id.to_string(),
        ts: rfc3339(now),
        status: explanation.status.as_u16(),
        method: clean(facts.method().as_str(), 32),
        url: redactor.url(facts.path(), facts.query()),
        host: clean(facts.host().unwrap_or(""), 256),
        client_ip: explanation.client_ip,
        identity: explanation.identity.map(|i| IdentityRecord {
            name: i.name,
            source: if i.unverified {
                "jwt_unverified"
            } else {
                "header"
            },
        }),
        user_agent: facts
            .user_agent()
            .map(|v| scrub_owned(clean(&String::from_utf8_lossy(v), 256)))
            .unwrap_or_default(),
        policy: explanation.policy.map(|p| PolicyRecord {
            id: p.id,
            title: p.title,
            owner: p.owner,
        }),
        // Evidence quotes the path (and upstream text) the caller sent: a
        // token in it must not reach the event.
        causes: explanation
            .causes
            .into_iter()
            .map(|mut c| {
                c.evidence = c.evidence.into_iter().map(scrub_owned).collect();
                c
            })
            .collect(),
        upstream: UpstreamRecord {
            status: explanation.status.as_u16(),
            headers: redactor.headers(upstream_headers, evidence_header),
            body_excerpt: scrub_owned(crate::escape::clean_prose(
                &String::from_utf8_lossy(excerpt),
                settings.body_excerpt_bytes,
            )),
        },
        config_revision: config.revision().to_owned(),
    }
}

/// What the layer keeps across configs: recent denials, escalation state and
/// the app's own sinks.
pub struct Recorder {
    /// Recent denials by id.
    pub store: RecentStore,
    escalator: Escalator,
    /// Self-service escalations per client.
    pub(crate) limiter: crate::selfservice::ClientLimiter,
    extra: std::sync::RwLock<Vec<Arc<dyn EventSink>>>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("recent", &self.store.len())
            .field("extra_sinks", &self.extra.read().map_or(0, |e| e.len()))
            .finish()
    }
}

impl Recorder {
    /// Sized from `config`.
    pub fn new(config: &Config) -> Self {
        let s = config.events();
        Self {
            store: RecentStore::new(s.recent_max, s.recent_max_age),
            escalator: Escalator::new(s.max_tracked_keys),
            limiter: crate::selfservice::ClientLimiter::default(),
            extra: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// Adds a sink that receives every event.
    pub fn add_sink(&self, sink: Arc<dyn EventSink>) {
        if let Ok(mut extra) = self.extra.write() {
            extra.push(sink);
        }
    }

    /// Sends an event to tracing, the named sinks and the app's sinks.
    pub fn emit(&self, config: &Config, names: &[String], event: Event) {
        let line: Arc<str> = Arc::from(event.to_json_line());
        trace(&event, &line);
        config.hub().send(names, &event, &line);
        if let Ok(extra) = self.extra.read() {
            for sink in extra.iter() {
                sink.emit(&event, &line);
            }
        }
    }

    /// Records one denial: event, store, escalation rules.
    pub fn denial(&self, config: &Config, event: DenialEvent, path: &str) {
        let event = Arc::new(event);
        let caller = caller_key(event.identity.as_ref(), event.client_ip);
        if let Some(id) = crate::id::DenialId::parse(&event.denial_id) {
            self.store.insert(
                id,
                Recorded {
                    event: event.clone(),
                    client_key: caller.clone(),
                    at: Instant::now(),
                },
            );
        }
        let settings = config.events();
        let display_caller = event
            .identity
            .as_ref()
            .map(IdentityRecord::for_people)
            .or_else(|| event.client_ip.map(|ip| ip.to_string()))
            .unwrap_or_else(|| "an unidentified caller".to_owned());
        let due = self.escalator.observe(
            &settings.rules,
            &Observed {
                event: &event,
                caller: &display_caller,
                path,
                policy_title: event.policy.as_ref().map(|p| p.title.as_str()),
            },
            Instant::now(),
        );
        self.emit(config, &settings.denial_sinks, Event::Denial(event));
        for (rule, escalation) in due {
            metrics::counter!("whydenied_escalations_total", "rule" => settings.rules[rule].id.clone())
                .increment(1);
            self.emit(
                config,
                &settings.rules[rule].notify,
                Event::Escalation(Arc::new(escalation)),
            );
        }
    }
}
