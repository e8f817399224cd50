//! Compiled policies and how a denial is matched against them.
//!
//! Policies are tried in file order and the first whose conditions all hold
//! is the one that explains the denial. Path and host globs of all policies
//! are compiled into one [`GlobSet`] each, so a denial costs one glob pass for
//! all policies, not one per policy.

use std::net::IpAddr;

use globset::{GlobMatcher, GlobSet};
use http::{HeaderMap, HeaderName, Method, StatusCode};
use ipnet::IpNet;
use memchr::memmem;

use crate::explanation::{Audience, CauseKind, Effort, Expose};
use crate::facts::RequestFacts;
use crate::template::Template;

/// A remediation step of a policy.
#[derive(Debug)]
pub struct Step {
    pub(crate) text: Template,
    pub(crate) audience: Audience,
    pub(crate) effort: Effort,
}

/// One compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub(crate) id: String,
    pub(crate) title: Option<Template>,
    pub(crate) cause: CauseKind,
    pub(crate) detail: Option<Template>,
    pub(crate) remediation: Vec<Step>,
    pub(crate) owner: Option<String>,
    pub(crate) contact: Option<String>,
    pub(crate) docs: Option<String>,
    pub(crate) expose: Expose,
    pub(crate) conditions: Conditions,
    pub(crate) likelihood: crate::explanation::Likelihood,
    pub(crate) temporary: Option<bool>,
    pub(crate) denied_by: Option<crate::explanation::DeniedBy>,
    pub(crate) extract: Option<(regex::bytes::Regex, String)>,
}

impl Policy {
    /// The policy's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The policy's cause.
    pub fn cause(&self) -> CauseKind {
        self.cause
    }

    /// The title as plain text (templates shown with their variables).
    pub(crate) fn title_text(&self) -> String {
        self.title
            .as_ref()
            .map(|t| t.source().to_owned())
            .unwrap_or_else(|| self.id.clone())
    }
}

/// A condition on a header's value.
#[derive(Debug)]
pub(crate) enum HeaderCond {
    Present,
    Absent,
    Equals(Vec<u8>),
    Glob(GlobMatcher),
}

impl HeaderCond {
    fn holds(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (HeaderCond::Present, v) => v.is_some(),
            (HeaderCond::Absent, v) => v.is_none(),
            (HeaderCond::Equals(want), Some(v)) => v == want.as_slice(),
            (HeaderCond::Glob(glob), Some(v)) => glob.is_match(String::from_utf8_lossy(v).as_ref()),
            (_, None) => false,
        }
    }
}

/// A condition on the upstream body prefix.
#[derive(Debug)]
pub(crate) enum BodyCond {
    Contains(Box<memmem::Finder<'static>>),
    Regex(regex::bytes::Regex),
}

impl BodyCond {
    pub(crate) fn holds(&self, text: &[u8]) -> bool {
        match self {
            BodyCond::Contains(finder) => finder.find(text).is_some(),
            BodyCond::Regex(re) => re.is_match(text),
        }
    }
}

/// One pass over a body for the required literals of every body condition
/// of a policy set (see [`crate::literals`]).
#[derive(Debug, Default)]
pub(crate) struct BodyScan {
    /// Searchers over consecutive ranges of the literals, each with the
    /// index of its first literal.
    searchers: Vec<(aho_corasick::AhoCorasick, usize)>,
    /// For each literal, the policies of every literal it contains
    /// (itself included).
    within: Vec<Vec<usize>>,
    /// For each policy, whether the scan cannot rule it out: it has no
    /// literals (no body condition, or one without a usable literal).
    unfiltered: Vec<bool>,
}

/// Teddy, the SIMD literal search that the automaton uses to skip ahead,
/// takes at most this many literals; more are split into several searchers.
const LITERALS_PER_SEARCHER: usize = 64;

/// After this many literal occurrences in one body, the scan stops and every
/// policy is a candidate (see [`BodyScan::candidates`]).
const MAX_LITERAL_HITS: usize = 4096;

/// At most this many distinct literals over all body conditions of a config
/// (each condition has up to 16). It bounds the scan's size and build time.
pub(crate) const MAX_BODY_LITERALS: usize = 2048;

/// Why the body scan of a config could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyScanError {
    #[error(
        "the body conditions need {0} distinct literals together; the limit is {MAX_BODY_LITERALS}: merge conditions or use fewer alternatives"
    )]
    TooMany(usize),
    #[error("{0}")]
    Build(aho_corasick::BuildError),
}

impl BodyScan {
    pub(crate) fn new(
        literals: Vec<(Vec<u8>, usize)>,
        policies: usize,
    ) -> Result<Self, BodyScanError> {
        // One entry per distinct literal, with every policy that needs it.
        let mut unfiltered = vec![true; policies];
        let mut owners: std::collections::BTreeMap<Vec<u8>, Vec<usize>> = Default::default();
        for (literal, policy) in literals {
            if let Some(u) = unfiltered.get_mut(policy) {
                *u = false;
            }
            owners.entry(literal).or_default().push(policy);
        }
        if owners.len() > MAX_BODY_LITERALS {
            return Err(BodyScanError::TooMany(owners.len()));
        }
        let patterns: Vec<&Vec<u8>> = owners.keys().collect();
        let owners: Vec<Vec<usize>> = owners.values().cloned().collect();
        // A literal found also means that every literal inside it was found:
        // one automaton over all literals, run over each literal.
        let all = aho_corasick::AhoCorasick::new(&patterns).map_err(BodyScanError::Build)?;
        let within: Vec<Vec<usize>> = patterns
            .iter()
            .map(|outer| {
                let mut found: Vec<usize> = all
                    .find_overlapping_iter(outer.as_slice())
                    .flat_map(|m| owners[m.pattern().as_usize()].iter().copied())
                    .collect();
                found.sort_unstable();
                found.dedup();
                found
            })
            .collect();
        // As few searchers as Teddy allows, sharing the literals evenly (a
        // full Teddy has more false candidates than two half-full ones).
        // Past a few searchers, one automaton without Teddy is faster.
        let count = patterns.len().div_ceil(LITERALS_PER_SEARCHER).max(1);
        let per = if count > 4 {
            patterns.len()
        } else {
            patterns.len().div_ceil(count).max(1)
        };
        let mut searchers = Vec::new();
        for (n, chunk) in patterns.chunks(per).enumerate() {
            let searcher = aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(chunk)
                .map_err(BodyScanError::Build)?;
            searchers.push((searcher, n * per));
        }
        Ok(Self {
            searchers,
            within,
            unfiltered,
        })
    }

    /// For each policy, whether its body condition may hold: one of its
    /// literals occurs in `body`, or it has none.
    ///
    /// The literals are lowercase and the body is folded in a copy
    /// ([`crate::literals::fold`]), so that the search can use its SIMD
    /// prefilter. Leftmost-longest matches are searched again from one byte
    /// after each match's start; together with `within`, that finds every
    /// literal that occurs anywhere.
    ///
    /// A body made of literals over and over (`aaaa…` against `aaa`) would
    /// stop the search at every byte: past [`MAX_LITERAL_HITS`] the scan
    /// gives up and calls every policy a candidate, so their own (linear)
    /// regexes decide. Hostile bodies cost time bounded by the body size.
    pub(crate) fn candidates(&self, body: &[u8]) -> Vec<bool> {
        let mut out = self.unfiltered.clone();
        if self.searchers.is_empty() {
            return out;
        }
        let lower = crate::literals::fold(body);
        let mut hits = 0;
        for (searcher, first) in &self.searchers {
            let mut at = 0;
            while at < lower.len() {
                let input = aho_corasick::Input::new(&lower).range(at..);
                let Some(m) = searcher.find(input) else {
                    break;
                };
                hits += 1;
                if hits > MAX_LITERAL_HITS {
                    return vec![true; out.len()];
                }
                for &p in &self.within[first + m.pattern().as_usize()] {
                    out[p] = true;
                }
                at = m.start() + 1;
            }
        }
        out
    }
}

/// What must hold for a policy to match. Empty lists mean "any".
#[derive(Debug, Default)]
pub(crate) struct Conditions {
    pub(crate) has_path: bool,
    pub(crate) has_host: bool,
    pub(crate) methods: Vec<Method>,
    /// Indices into the config's captured request headers.
    pub(crate) request_headers: Vec<(usize, HeaderCond)>,
    pub(crate) client_in: Vec<IpNet>,
    pub(crate) client_not_in: Vec<IpNet>,
    pub(crate) status: Vec<u16>,
    pub(crate) response_headers: Vec<(HeaderName, HeaderCond)>,
    pub(crate) body: Option<BodyCond>,
    pub(crate) reason: Option<BodyCond>,
    /// Each condition in words, for the evidence of a match.
    pub(crate) described: Vec<String>,
}

/// The reason phrase of the upstream's status line, as a response extension
/// (the sidecar sets it; `403 Ip Forbidden` carries more than `403`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamReason(pub String);

/// The upstream's answer, as far as matching needs it.
#[derive(Clone, Copy, Debug)]
pub struct Upstream<'a> {
    /// The status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: &'a HeaderMap,
    /// The body prefix that was read (at most `max_body_kib`).
    pub body: &'a [u8],
    /// The reason phrase of the status line, when the upstream sent one.
    pub reason: Option<&'a str>,
}

/// All policies of a config, in file order.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub(crate) policies: Vec<Policy>,
    pub(crate) paths: GlobSet,
    /// For each glob in `paths`, the index of its policy.
    pub(crate) path_owner: Vec<usize>,
    pub(crate) hosts: GlobSet,
    pub(crate) host_owner: Vec<usize>,
    /// The required literals of all body conditions, searched in one pass.
    pub(crate) bodies: BodyScan,
}

impl PolicySet {
    /// The number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter()
    }

    /// The first policy whose conditions all hold.
    pub fn first_match(
        &self,
        facts: &RequestFacts,
        client_ip: Option<IpAddr>,
        upstream: &Upstream<'_>,
    ) -> Option<&Policy> {
        if self.policies.is_empty() {
            return None;
        }
        let path_hits = hits(&self.paths, &self.path_owner, facts.path(), self.len());
        let host_hits = if self.hosts.is_empty() {
            Vec::new()
        } else {
            let host = facts
                .host()
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            hits(&self.hosts, &self.host_owner, &host, self.len())
        };
        // Which policies' body literals occur: computed once, on the first
        // policy that gets as far as its body condition.
        let mut body_candidates: Option<Vec<bool>> = None;
        self.policies.iter().enumerate().find_map(|(i, policy)| {
            let c = &policy.conditions;
            let holds = (!c.has_path || path_hits.get(i).copied().unwrap_or(false))
                && (!c.has_host || host_hits.get(i).copied().unwrap_or(false))
                && (c.status.is_empty() || c.status.contains(&upstream.status.as_u16()))
                && (c.methods.is_empty() || c.methods.contains(facts.method()))
                && c.request_headers
                    .iter()
                    .all(|(idx, cond)| cond.holds(facts.captured(*idx)))
                && (c.client_in.is_empty()
                    || client_ip.is_some_and(|ip| c.client_in.iter().any(|n| n.contains(&ip))))
                && (c.client_not_in.is_empty()
                    || client_ip
                        .is_some_and(|ip| !c.client_not_in.iter().any(|n| n.contains(&ip))))
                && c.response_headers.iter().all(|(name, cond)| {
                    cond.holds(upstream.headers.get(name).map(http::HeaderValue::as_bytes))
                })
                && c.reason
                    .as_ref()
                    .is_none_or(|cond| cond.holds(upstream.reason.unwrap_or("").as_bytes()))
                && c.body.as_ref().is_none_or(|cond| {
                    body_candidates
                        .get_or_insert_with(|| self.bodies.candidates(upstream.body))
                        .get(i)
                        .is_none_or(|&may| may)
                        && cond.holds(upstream.body)
                });
            holds.then_some(policy)
        })
    }
}

/// Which policies have a glob in `set` matching `value` (empty, with no
/// allocation, when the set is).
fn hits(set: &GlobSet, owner: &[usize], value: &str, policies: usize) -> Vec<bool> {
    if set.is_empty() {
        return Vec::new();
    }
    let mut out = vec![false; policies];
    for glob in set.matches(value) {
        if let Some(&p) = owner.get(glob) {
            out[p] = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that is one literal over and over stops the scan at its cap;
    /// every policy becomes a candidate and the answers stay right.
    #[test]
    fn a_body_of_repeated_literals_gives_up_the_scan_not_the_answer() {
        let config = Config::from_yaml_str(
            "policies:\n  - { id: never, match: { body: { regex: \"aaab\" } }, cause: permission }\n  - { id: always, match: { body: { contains: aaa } }, cause: ip_blocked }\n",
        )
        .unwrap();
        let body = vec![b'a'; 64 * 1024];
        let set = config.policies();
        assert_eq!(set.bodies.candidates(&body), vec![true, true]);
        let upstream = Upstream {
            status: StatusCode::FORBIDDEN,
            headers: &HeaderMap::new(),
            body: &body,
            reason: None,
        };
        let req = Request::get("/").body(()).unwrap();
        let facts = RequestFacts::capture(&req, &config);
        let hit = set.first_match(&facts, None, &upstream).map(Policy::id);
        assert_eq!(hit, Some("always"));
    }

    /// The literal scan only skips work: on every real denial document we
    /// have (and their upper-cased copies), no body condition of the shipped
    /// pack that holds is ruled out by it.
    #[test]
    fn body_scan_never_rules_out_a_match() {
        let pack = crate::config::builtin_signatures();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        let mut bodies = Vec::new();
        for dir in ["corpus", "corpus_extra"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    let sample = crate::corpus::read_sample(&path).unwrap();
                    bodies.push(sample.body.to_uppercase());
                    bodies.push(sample.body);
                }
            }
        }
        let mut held = 0;
        for body in &bodies {
            let candidates = pack.bodies.candidates(body.as_bytes());
            for (i, policy) in pack.policies.iter().enumerate() {
                let c = &policy.conditions;
                if let Some(cond) = &c.body
                    && cond.holds(body.as_bytes())
                {
                    held += 1;
                    assert!(
                        candidates[i],
                        "{} holds but its literals were not found",
                        policy.id
                    );
                }
            }
        }
        assert!(held > 40, "only {held} body conditions held");
    }
    use crate::config::Config;
    use crate::facts::ClientAddr;
    use http::Request;

    const POLICIES: &str = r#"
intercept: [403, 429]
networks: { office: [192.0.2.0/24] }
policies:
  - id: admin
    match: { path: "/admin/**", methods: [GET, POST] }
    cause: permission
  - id: one-segment
    match: { path: "/files/*" }
    cause: permission
  - id: debug-header
    match: { headers: { x-debug: { present: true }, x-tenant: { glob: "acme-*" } } }
    cause: policy_explicit_deny
  - id: not-office
    match: { client_not_in: [office], host: "*.internal.example" }
    cause: ip_blocked
  - id: s3
    match: { response_headers: { server: { equals: AmazonS3 } }, body: { regex: "<Code>AccessDenied</Code>" } }
    cause: permission
  - id: rate
    match: { status: [429] }
    cause: rate_limited
"#;

    fn first(
        req: Request<()>,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Option<String> {
        let config = Config::from_yaml_str(POLICIES).unwrap();
        let facts = RequestFacts::capture(&req, &config);
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let upstream = Upstream {
            status: StatusCode::from_u16(status).unwrap(),
            headers: &map,
            body: body.as_bytes(),
            reason: None,
        };
        let ip = facts.client_ip(&config);
        config
            .policies()
            .first_match(&facts, ip, &upstream)
            .map(|p| p.id().to_owned())
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn path_globs_and_methods() {
        assert_eq!(
            first(get("/admin/users/1"), 403, &[], ""),
            Some("admin".into())
        );
        assert_eq!(first(get("/admin"), 403, &[], ""), Some("admin".into()));
        let delete = Request::delete("/admin/x").body(()).unwrap();
        assert_eq!(first(delete, 403, &[], ""), None);
        assert_eq!(
            first(get("/files/a"), 403, &[], ""),
            Some("one-segment".into())
        );
        // `*` does not cross `/`.
        assert_eq!(first(get("/files/a/b"), 403, &[], ""), None);
    }

    #[test]
    fn request_headers_all_must_hold() {
        let req = |tenant: &str| {
            Request::get("/x")
                .header("x-debug", "1")
                .header("x-tenant", tenant)
                .body(())
                .unwrap()
        };
        assert_eq!(
            first(req("acme-eu"), 403, &[], ""),
            Some("debug-header".into())
        );
        assert_eq!(first(req("globex"), 403, &[], ""), None);
    }

    #[test]
    fn client_networks_and_hosts() {
        let req = |peer: &str| {
            let mut r = Request::get("/x")
                .header("host", "db.internal.example:8443")
                .body(())
                .unwrap();
            r.extensions_mut().insert(ClientAddr(peer.parse().unwrap()));
            r
        };
        assert_eq!(
            first(req("198.51.100.7:1"), 403, &[], ""),
            Some("not-office".into())
        );
        assert_eq!(first(req("192.0.2.7:1"), 403, &[], ""), None);
    }

    #[test]
    fn upstream_headers_body_and_status() {
        let body = "<Error><Code>AccessDenied</Code></Error>";
        assert_eq!(
            first(get("/b/k"), 403, &[("server", "AmazonS3")], body),
            Some("s3".into())
        );
        assert_eq!(first(get("/b/k"), 403, &[("server", "nginx")], body), None);
        assert_eq!(first(get("/api"), 429, &[], ""), Some("rate".into()));
    }
}
