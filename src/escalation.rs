//! Escalation rules: which denials need a human.
//!
//! Each rule keys denials on what must be the same (caller, policy, client
//! address, path) and fires when `count` denials (or, with `distinct:
//! identity`, `count` different callers) fall within `within`. One incident
//! makes one escalation; while it goes on, at most one follow-up per
//! `cooldown` says how many more happened. The state is bounded: per key at
//! most `count` entries, and at most `max_tracked_keys` keys (the oldest are
//! evicted and counted).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::config::events::{Dimension, Rule};
use crate::events::time::rfc3339;
use crate::events::{DenialEvent, EscalationEvent, SCHEMA_VERSION};
use crate::id::DenialId;

/// Identities listed in one escalation event, at most.
const MAX_LISTED: usize = 10;
/// Denial ids sampled in one escalation event, at most.
const MAX_SAMPLES: usize = 5;

/// What the rules look at in one denial.
pub struct Observed<'a> {
    /// The recorded denial.
    pub event: &'a DenialEvent,
    /// The caller: identity, else client address.
    pub caller: &'a str,
    /// The request path without the query.
    pub path: &'a str,
    /// The matched policy's title, for summaries.
    pub policy_title: Option<&'a str>,
}

#[derive(Debug)]
struct Window {
    /// (when, caller hash) of recent denials, at most `count` (or, for
    /// distinct rules, one per caller).
    hits: VecDeque<(Instant, u64)>,
    callers: VecDeque<String>,
    samples: VecDeque<String>,
    incident: Option<Incident>,
    last_hit: Instant,
}

#[derive(Debug)]
struct Incident {
    first_seen: SystemTime,
    last_emitted: Instant,
    since_emitted: u64,
}

/// The state of all rules.
#[derive(Debug)]
pub struct Escalator {
    max_keys: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    // Keyed by the rule's id, not its place in the file: a reload that
    // reorders or inserts rules keeps each rule's windows and incidents.
    windows: HashMap<(u64, u64), Window>,
    order: VecDeque<(u64, u64)>,
}

fn hash_of(parts: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) && s > 0 {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) && s > 0 {
        format!("{}m", s / 60)
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl Escalator {
    /// A new, empty state.
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys: max_keys.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// Counts one denial against every rule; returns the escalations due.
    pub fn observe(
        &self,
        rules: &[Rule],
        seen: &Observed<'_>,
        now: Instant,
    ) -> Vec<(usize, EscalationEvent)> {
        let mut due = Vec::new();
        if rules.is_empty() {
            return due;
        }
        let Ok(mut state) = self.state.lock() else {
            return due;
        };
        let policy = seen
            .event
            .policy
            .as_ref()
            .map(|p| p.id.as_str())
            .unwrap_or("");
        let client = seen
            .event
            .client_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        let caller_hash = hash_of(&[seen.caller]);
        for (index, rule) in rules.iter().enumerate() {
            let parts: Vec<&str> = rule
                .same
                .iter()
                .map(|d| match d {
                    Dimension::Identity => seen.caller,
                    Dimension::Policy => policy,
                    Dimension::ClientIp => client.as_str(),
                    Dimension::Path => seen.path,
                })
                .collect();
            // A policy-keyed rule says nothing about denials no policy matched.
            if rule.same.contains(&Dimension::Policy) && policy.is_empty() {
                continue;
            }
            let key = (hash_of(&[rule.id.as_str()]), hash_of(&parts));
            if !state.windows.contains_key(&key) {
                while state.windows.len() >= self.max_keys {
                    let Some(old) = state.order.pop_front() else {
                        break;
                    };
                    if state.windows.remove(&old).is_some() {
                        metrics::counter!("whydenied_escalation_keys_evicted_total").increment(1);
                    }
                }
                state.order.push_back(key);
                state.windows.insert(
                    key,
                    Window {
                        hits: VecDeque::new(),
                        callers: VecDeque::new(),
                        samples: VecDeque::new(),
                        incident: None,
                        last_hit: now,
                    },
                );
            }
            let Some(w) = state.windows.get_mut(&key) else {
                continue;
            };
            // An incident is over once its window has been quiet.
            if now.duration_since(w.last_hit) > rule.within {
                w.incident = None;
            }
            w.last_hit = now;
            while w
                .hits
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > rule.within)
            {
                w.hits.pop_front();
            }
            if rule.distinct_identity {
                w.hits.retain(|(_, c)| *c != caller_hash);
            }
            w.hits.push_back((now, caller_hash));
            while w.hits.len() > rule.count as usize {
                w.hits.pop_front();
            }
            if !w.callers.iter().any(|c| c == seen.caller) {
                w.callers.push_back(seen.caller.to_owned());
                while w.callers.len() > MAX_LISTED {
                    w.callers.pop_front();
                }
            }
            w.samples.push_back(seen.event.denial_id.clone());
            while w.samples.len() > MAX_SAMPLES {
                w.samples.pop_front();
            }
            let reached = w.hits.len() >= rule.count as usize;
            let event = match &mut w.incident {
                None if reached => {
                    let first = SystemTime::now()
                        - now.duration_since(w.hits.front().map_or(now, |(t, _)| *t));
                    w.incident = Some(Incident {
                        first_seen: first,
                        last_emitted: now,
                        since_emitted: 0,
                    });
                    Some((rule.count as u64, false, first))
                }
                None => None,
                Some(incident) => {
                    incident.since_emitted += 1;
                    if now.duration_since(incident.last_emitted) >= rule.cooldown {
                        let n = incident.since_emitted;
                        incident.since_emitted = 0;
                        incident.last_emitted = now;
                        Some((n, true, incident.first_seen))
                    } else {
                        None
                    }
                }
            };
            if let Some((count, follow_up, first_seen)) = event {
                let distinct = if rule.distinct_identity {
                    w.hits.len() as u64
                } else {
                    w.callers.len() as u64
                };
                let callers: Vec<String> = w.callers.iter().cloned().collect();
                let samples: Vec<String> = w.samples.iter().cloned().collect();
                due.push((
                    index,
                    build(
                        rule, seen, count, follow_up, first_seen, distinct, callers, samples,
                    ),
                ));
            }
        }
        due
    }
}

#[allow(clippy::too_many_arguments)]
fn build(
    rule: &Rule,
    seen: &Observed<'_>,
    count: u64,
    follow_up: bool,
    first_seen: SystemTime,
    distinct: u64,
    identities: Vec<String>,
    samples: Vec<String>,
) -> EscalationEvent {
    let now = SystemTime::now();
    let window = fmt_duration(rule.within);
    let policy = seen.event.policy.as_ref().map(|p| p.id.clone());
    let cause = seen
        .event
        .causes
        .first()
        .map_or("unknown", |c| c.cause.as_str());
    let by = match (&policy, seen.policy_title) {
        (Some(id), Some(title)) => format!("policy `{id}` ({title})"),
        (Some(id), None) => format!("policy `{id}`"),
        (None, _) => "the upstream (no whydenied policy matched)".to_owned(),
    };
    let since = rfc3339(first_seen);
    let summary = if rule.distinct_identity {
        format!(
            "{}{distinct} different callers were denied by {by} within {window}, since {since}: this looks like a regression rather than one person's access. \
             Likely cause: {cause}. Check first: recent changes to that policy, to the groups or scopes it requires, and to the identity provider. \
             Sample denial ids: {}.",
            if follow_up {
                format!("Still going on: {count} more denials. ")
            } else {
                String::new()
            },
            samples.join(", ")
        )
    } else {
        let who = identities.first().map_or("one caller", String::as_str);
        format!(
            "{}{who} was denied {count} times by {by} within {window}, since {since}, on {} {}. \
             Likely cause: {cause}. Check first: whether {who} should have this access, and if so grant it; otherwise tell them why. \
             Sample denial ids: {}.",
            if follow_up { "Still going on: " } else { "" },
            seen.event.method,
            seen.event.url,
            samples.join(", ")
        )
    };
    EscalationEvent {
        schema: SCHEMA_VERSION,
        event: "escalation",
        escalation_id: DenialId::random()
            .map(|id| id.to_string())
            .unwrap_or_default(),
        ts: rfc3339(now),
        rule: rule.id.clone(),
        policy,
        count,
        window,
        distinct_identities: distinct,
        identities,
        first_seen: since,
        last_seen: seen.event.ts.clone(),
        sample_denial_ids: samples,
        follow_up,
        summary: crate::escape::clean(&summary, 2000),
        note: None,
        denial: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{PolicyRecord, UpstreamRecord};

    fn denial(id: u8, policy: &str) -> DenialEvent {
        DenialEvent {
            schema: 1,
            event: "denial",
            denial_id: format!("id{id}"),
            ts: "2026-11-27T00:00:00.000Z".into(),
            status: 403,
            method: "GET".into(),
            url: "/admin".into(),
            host: "x".into(),
            client_ip: None,
            identity: None,
            user_agent: String::new(),
            policy: Some(PolicyRecord {
                id: policy.into(),
                title: "T".into(),
                owner: None,
            }),
            causes: Vec::new(),
            upstream: UpstreamRecord {
                status: 403,
                headers: Vec::new(),
                body_excerpt: String::new(),
            },
            config_revision: String::new(),
        }
    }

    fn rule(same: Vec<Dimension>, distinct: bool, count: u32) -> Rule {
        Rule {
            id: "r".into(),
            same,
            distinct_identity: distinct,
            count,
            within: Duration::from_secs(600),
            cooldown: Duration::from_secs(60),
            notify: Vec::new(),
        }
    }

    fn observe(
        e: &Escalator,
        rules: &[Rule],
        caller: &str,
        n: u8,
        at: Instant,
    ) -> Vec<EscalationEvent> {
        let d = denial(n, "admin");
        let seen = Observed {
            event: &d,
            caller,
            path: "/admin",
            policy_title: Some("Admins only"),
        };
        e.observe(rules, &seen, at)
            .into_iter()
            .map(|(_, ev)| ev)
            .collect()
    }

    #[test]
    fn repeated_fires_once_per_incident_then_follows_up_per_cooldown() {
        let rules = [rule(vec![Dimension::Identity, Dimension::Policy], false, 3)];
        let e = Escalator::new(100);
        let t0 = Instant::now();
        let mut fired = Vec::new();
        for i in 0..10u8 {
            fired.extend(observe(
                &e,
                &rules,
                "bob",
                i,
                t0 + Duration::from_secs(u64::from(i)),
            ));
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].count, 3);
        assert!(!fired[0].follow_up);
        assert!(
            fired[0]
                .summary
                .starts_with("bob was denied 3 times by policy `admin`"),
            "{}",
            fired[0].summary
        );
        // 61 s after the first event: one follow-up with how many more.
        let later = observe(&e, &rules, "bob", 99, t0 + Duration::from_secs(63));
        assert_eq!(later.len(), 1);
        assert!(later[0].follow_up);
        assert_eq!(later[0].count, 8);
        // Another caller is another key.
        assert!(observe(&e, &rules, "carol", 1, t0 + Duration::from_secs(64)).is_empty());
    }

    #[test]
    fn a_quiet_window_ends_the_incident() {
        let rules = [rule(vec![Dimension::Identity], false, 2)];
        let e = Escalator::new(100);
        let t0 = Instant::now();
        assert!(observe(&e, &rules, "bob", 1, t0).is_empty());
        assert_eq!(observe(&e, &rules, "bob", 2, t0).len(), 1);
        let t1 = t0 + Duration::from_secs(3600);
        assert!(observe(&e, &rules, "bob", 3, t1).is_empty());
        let again = observe(&e, &rules, "bob", 4, t1);
        assert_eq!(again.len(), 1);
        assert!(!again[0].follow_up, "a new incident, not a follow-up");
    }

    #[test]
    fn widespread_counts_distinct_callers_only() {
        let rules = [rule(vec![Dimension::Policy], true, 3)];
        let e = Escalator::new(100);
        let t0 = Instant::now();
        for i in 0..20 {
            assert!(
                observe(&e, &rules, "bob", i, t0).is_empty(),
                "one caller is not a regression"
            );
        }
        assert!(observe(&e, &rules, "carol", 21, t0).is_empty());
        let fired = observe(&e, &rules, "dave", 22, t0);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].distinct_identities, 3);
        assert!(
            fired[0].summary.contains("3 different callers"),
            "{}",
            fired[0].summary
        );
    }

    #[test]
    fn tracked_keys_are_capped() {
        let rules = [rule(vec![Dimension::Identity], false, 5)];
        let e = Escalator::new(50);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            observe(&e, &rules, &format!("spoofed-{i}"), 0, t0);
        }
        assert!(e.state.lock().unwrap().windows.len() <= 50);
    }
}
