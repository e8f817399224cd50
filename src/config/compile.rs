//! Validation and compilation: [`RawConfig`] in, [`Config`] out, or the first
//! problem with its location.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use globset::{GlobBuilder, GlobSetBuilder};
use http::{HeaderName, Method, Uri};
use ipnet::IpNet;
use memchr::memmem;
use serde_saphyr::{Location, Spanned};

use super::error::{Located, suggest, with_suggestion};
use super::raw::{RawBodyMatch, RawConfig, RawHeaderMatch, RawLimits, RawMatch, RawPolicy};
use super::{Config, ConfigError, DEFAULT_MAX_BODY_KIB, Limits, StatusSet};
use crate::explanation::{Audience, CauseKind, DeniedBy, Effort, Expose, Likelihood};
use crate::facts::MAX_CAPTURED_HEADERS;
use crate::policy::{BodyCond, Conditions, HeaderCond, Policy, PolicySet, Step};
use crate::template::Template;

const MAX_PATTERN_BYTES: usize = 1024;
const MAX_REGEX_COMPILED_BYTES: usize = 256 * 1024;
const MAX_TEXT_CHARS: usize = 2048;

/// Where errors are reported: the source's name and text.
struct Ctx<'a> {
    name: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, at: &Location, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid(Box::new(Located::new(
            self.name,
            self.text,
            at.line(),
            at.column(),
            message.into(),
        )))
    }
}

pub(super) fn compile(text: &str, name: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { name, text };
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        serde_saphyr::from_str(text).map_err(|e| yaml_error(&ctx, &e))?
    };

    let intercept_codes = match &raw.intercept {
        None => vec![403],
        Some(list) => {
            if list.is_empty() {
                return Err(ctx.err(
                    &Location::UNKNOWN,
                    "`intercept` is empty, so nothing would be explained; list at least one status such as 403",
                ));
            }
            let mut codes = Vec::new();
            for code in list {
                if !(400..=599).contains(&code.value) {
                    return Err(ctx.err(
                        &code.referenced,
                        format!(
                            "cannot intercept status {}: only 4xx and 5xx responses are denials or failures",
                            code.value
                        ),
                    ));
                }
                codes.push(code.value);
            }
            codes
        }
    };
    let intercept = StatusSet::from_codes(&intercept_codes);

    let max_body_kib = match &raw.max_body_kib {
        None => DEFAULT_MAX_BODY_KIB,
        Some(v) if (1..=1024).contains(&v.value) => v.value,
        Some(v) => {
            return Err(ctx.err(
                &v.referenced,
                format!(
                    "`max_body_kib` is {}; it must be between 1 and 1024",
                    v.value
                ),
            ));
        }
    };

    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .map(|n| network(&ctx, n))
        .collect::<Result<Vec<_>, _>>()?;

    let mut networks: HashMap<&str, Vec<IpNet>> = HashMap::new();
    for (net_name, list) in &raw.networks {
        if !is_id(net_name) {
            return Err(ctx.err(
                &list.referenced,
                format!("network name `{net_name}` may only use letters, digits, `-`, `_` and `.`"),
            ));
        }
        let nets = list
            .value
            .iter()
            .map(|n| network(&ctx, n))
            .collect::<Result<Vec<_>, _>>()?;
        networks.insert(net_name.as_str(), nets);
    }

    let (identity_header, identity_claim) = match &raw.identity {
        None => (None, None),
        Some(id) => {
            let header = id
                .header
                .as_ref()
                .map(|h| header_name(&ctx, h))
                .transpose()?;
            let claim = match &id.jwt_claim {
                Some(c) if c.value.is_empty() || c.value.len() > 64 => {
                    return Err(ctx.err(&c.referenced, "`jwt_claim` must be 1 to 64 characters"));
                }
                Some(c) => Some(c.value.clone()),
                None => None,
            };
            (header, claim)
        }
    };

    let api_key_headers = match raw
        .credentials
        .as_ref()
        .and_then(|c| c.api_key_headers.as_ref())
    {
        None => vec![HeaderName::from_static("x-api-key")],
        Some(list) => list
            .iter()
            .map(|h| header_name(&ctx, h))
            .collect::<Result<Vec<_>, _>>()?,
    };

    let expose = match &raw.expose {
        None => Expose::Full,
        Some(e) => word(&ctx, e, "expose", Expose::from_name, &Expose::names())?,
    };

    let mut builder = PolicyBuilder::new(&ctx, &networks, intercept, false);
    let mut policies = Vec::with_capacity(raw.policies.len());
    for (index, raw_policy) in raw.policies.iter().enumerate() {
        policies.push(builder.policy(index, raw_policy, expose)?);
    }
    let captured = std::mem::take(&mut builder.captured);
    let policy_set = builder.finish(policies)?;

    let (builtin_signatures, custom_signatures) = match &raw.signatures {
        None => (true, PolicySet::default()),
        Some(s) => {
            let mut builder = PolicyBuilder::new(&ctx, &networks, intercept, true);
            let mut sigs = Vec::with_capacity(s.custom.len());
            for (index, raw_sig) in s.custom.iter().enumerate() {
                sigs.push(builder.policy(index, raw_sig, Expose::Full)?);
            }
            (s.builtin.unwrap_or(true), builder.finish(sigs)?)
        }
    };

    let listen = raw
        .listen
        .as_ref()
        .map(|l| socket_addr(&ctx, l, "listen"))
        .transpose()?;
    let admin_listen = raw
        .admin
        .as_ref()
        .and_then(|a| a.listen.as_ref())
        .map(|l| socket_addr(&ctx, l, "admin.listen"))
        .transpose()?;
    let upstream = raw
        .upstream
        .as_ref()
        .map(|u| upstream_url(&ctx, u))
        .transpose()?;
    let limits = limits(&ctx, raw.limits.as_ref())?;
    let report = |at: &Location, message: String| ctx.err(at, message);
    let events = super::events::compile(
        raw.events.as_ref(),
        &raw.sinks,
        raw.escalation.as_ref(),
        &report,
    )?;

    Ok(Config {
        intercept,
        max_body_bytes: max_body_kib as usize * 1024,
        trusted_proxies,
        identity_header,
        identity_claim,
        api_key_headers,
        captured_headers: captured,
        policies: policy_set,
        custom_signatures,
        builtin_signatures,
        expose,
        listen,
        upstream,
        upstream_ca_file: raw
            .upstream_tls
            .as_ref()
            .and_then(|t| t.ca_file.as_ref())
            .map(std::path::PathBuf::from),
        admin_listen,
        limits,
        events,
        revision: revision(text),
        hub: std::sync::OnceLock::new(),
        recorder: std::sync::OnceLock::new(),
    })
}

struct PolicyBuilder<'a> {
    ctx: &'a Ctx<'a>,
    networks: &'a HashMap<&'a str, Vec<IpNet>>,
    intercept: StatusSet,
    captured: Vec<HeaderName>,
    paths: GlobSetBuilder,
    path_owner: Vec<usize>,
    hosts: GlobSetBuilder,
    host_owner: Vec<usize>,
    /// Policy id → line where it was first defined.
    seen: HashMap<String, u64>,
    /// Signatures match on the response only.
    signatures: bool,
    body_patterns: Vec<String>,
}

impl<'a> PolicyBuilder<'a> {
    fn new(
        ctx: &'a Ctx<'a>,
        networks: &'a HashMap<&'a str, Vec<IpNet>>,
        intercept: StatusSet,
        signatures: bool,
    ) -> Self {
        Self {
            ctx,
            networks,
            intercept,
            captured: Vec::new(),
            paths: GlobSetBuilder::new(),
            path_owner: Vec::new(),
            hosts: GlobSetBuilder::new(),
            host_owner: Vec::new(),
            seen: HashMap::new(),
            signatures,
            body_patterns: Vec::new(),
        }
    }

    fn finish(self, policies: Vec<Policy>) -> Result<PolicySet, ConfigError> {
        let ctx = self.ctx;
        let paths = self
            .paths
            .build()
            .map_err(|e| ctx.err(&Location::UNKNOWN, format!("path globs: {e}")))?;
        let hosts = self
            .hosts
            .build()
            .map_err(|e| ctx.err(&Location::UNKNOWN, format!("host globs: {e}")))?;
        let bodies = if self.body_patterns.is_empty() {
            None
        } else {
            Some(
                regex::bytes::RegexSetBuilder::new(&self.body_patterns)
                    .size_limit(MAX_REGEX_COMPILED_BYTES * 64)
                    .dfa_size_limit(MAX_REGEX_COMPILED_BYTES * 64)
                    .build()
                    .map_err(|e| {
                        ctx.err(
                            &Location::UNKNOWN,
                            format!("the body conditions together are too large to compile: {e}"),
                        )
                    })?,
            )
        };
        Ok(PolicySet {
            policies,
            paths,
            path_owner: self.path_owner,
            hosts,
            host_owner: self.host_owner,
            bodies,
        })
    }

    fn policy(
        &mut self,
        index: usize,
        raw: &RawPolicy,
        default_expose: Expose,
    ) -> Result<Policy, ConfigError> {
        let ctx = self.ctx;
        let id = &raw.id;
        if !is_id(&id.value) || id.value.len() > 64 {
            return Err(ctx.err(
                &id.referenced,
                format!(
                    "policy id `{}` must be 1 to 64 letters, digits, `-`, `_` or `.`",
                    crate::escape::clean(&id.value, 80)
                ),
            ));
        }
        if let Some(line) = self.seen.insert(id.value.clone(), id.referenced.line()) {
            return Err(ctx.err(
                &id.referenced,
                format!(
                    "duplicate policy id `{}`: it is already used by the policy at line {line}; ids must be unique",
                    id.value
                ),
            ));
        }
        let Some(cause) = &raw.cause else {
            return Err(ctx.err(
                &id.referenced,
                format!(
                    "policy `{}` has no `cause`; give one of {}",
                    id.value,
                    CauseKind::names().join(", ")
                ),
            ));
        };
        let cause = word(
            ctx,
            cause,
            "cause",
            CauseKind::from_name,
            &CauseKind::names(),
        )?;
        let remediation = raw
            .remediation
            .iter()
            .map(|s| {
                Ok(Step {
                    text: template(ctx, &s.step)?,
                    audience: match &s.audience {
                        None => Audience::Caller,
                        Some(a) => word(ctx, a, "for", Audience::from_name, &Audience::names())?,
                    },
                    effort: match &s.effort {
                        None => Effort::Easy,
                        Some(e) => word(ctx, e, "effort", Effort::from_name, &Effort::names())?,
                    },
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let docs = match &raw.docs {
            None => None,
            Some(d) => {
                let ok = d.value.parse::<Uri>().ok().is_some_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
                });
                if !ok || d.value.len() > 2048 {
                    return Err(ctx.err(
                        &d.referenced,
                        "`docs` must be an absolute http:// or https:// URL",
                    ));
                }
                Some(d.value.clone())
            }
        };
        Ok(Policy {
            id: id.value.clone(),
            title: raw.title.as_ref().map(|t| template(ctx, t)).transpose()?,
            cause,
            detail: raw.detail.as_ref().map(|t| template(ctx, t)).transpose()?,
            remediation,
            owner: raw.owner.as_deref().map(|s| crate::escape::clean(s, 256)),
            contact: raw.contact.as_deref().map(|s| crate::escape::clean(s, 256)),
            docs,
            expose: match &raw.expose {
                None => default_expose,
                Some(e) => word(ctx, e, "expose", Expose::from_name, &Expose::names())?,
            },
            conditions: self.conditions(index, &raw.matcher)?,
            likelihood: match &raw.likelihood {
                None => Likelihood::High,
                Some(l) => word(
                    ctx,
                    l,
                    "likelihood",
                    Likelihood::from_name,
                    &Likelihood::names(),
                )?,
            },
            temporary: raw.temporary,
            denied_by: raw
                .denied_by
                .as_ref()
                .map(|d| word(ctx, d, "denied_by", DeniedBy::from_name, &DeniedBy::names()))
                .transpose()?,
            extract: match &raw.extract {
                None => None,
                Some(x) => {
                    let re = regex::bytes::RegexBuilder::new(&x.regex.value)
                        .size_limit(MAX_REGEX_COMPILED_BYTES)
                        .build()
                        .map_err(|e| {
                            ctx.err(&x.regex.referenced, format!("bad extract regex: {e}"))
                        })?;
                    Some((re, crate::escape::clean(&x.text, 512)))
                }
            },
        })
    }

    fn conditions(&mut self, index: usize, m: &RawMatch) -> Result<Conditions, ConfigError> {
        let ctx = self.ctx;
        let mut c = Conditions::default();
        if self.signatures
            && (m.path.is_some()
                || m.host.is_some()
                || !m.methods.is_empty()
                || !m.headers.is_empty()
                || !m.client_in.is_empty()
                || !m.client_not_in.is_empty())
        {
            let at = m
                .path
                .as_ref()
                .map(|p| p.referenced)
                .or_else(|| m.methods.first().map(|x| x.referenced))
                .unwrap_or(Location::UNKNOWN);
            return Err(ctx.err(
                &at,
                "a signature matches on the response only: use status, response_headers, body or reason",
            ));
        }
        let quoted = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("`{}`", crate::escape::clean(i, 120)))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let names = |items: &[Spanned<String>]| {
            items
                .iter()
                .map(|i| crate::escape::clean(&i.value, 64))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(paths) = &m.path {
            c.described.push(format!(
                "the path matches {}",
                quoted(paths.value.as_slice())
            ));
        }
        if !m.methods.is_empty() {
            c.described.push(format!(
                "the method is one of {}",
                names(&m.methods).to_ascii_uppercase()
            ));
        }
        if let Some(hosts) = &m.host {
            c.described.push(format!(
                "the host matches {}",
                quoted(hosts.value.as_slice())
            ));
        }
        for (name, cond) in m.headers.iter().chain(&m.response_headers) {
            let whose = if m.headers.contains_key(name) {
                "the request header"
            } else {
                "the upstream's response header"
            };
            let name = crate::escape::clean(name, 64);
            let what = match &cond.value {
                RawHeaderMatch {
                    present: Some(true),
                    ..
                }
                | RawHeaderMatch {
                    absent: Some(false),
                    ..
                } => "is present".to_owned(),
                RawHeaderMatch {
                    equals: Some(_), ..
                } => "has the configured value".to_owned(),
                RawHeaderMatch { glob: Some(g), .. } => {
                    format!("matches `{}`", crate::escape::clean(g, 120))
                }
                _ => "is absent".to_owned(),
            };
            c.described.push(format!("{whose} `{name}` {what}"));
        }
        if !m.client_in.is_empty() {
            c.described
                .push(format!("the client address is in {}", names(&m.client_in)));
        }
        if !m.client_not_in.is_empty() {
            c.described.push(format!(
                "the client address is outside {}",
                names(&m.client_not_in)
            ));
        }
        if !m.status.is_empty() {
            let codes: Vec<String> = m.status.iter().map(|s| s.value.to_string()).collect();
            c.described
                .push(format!("the status is {}", codes.join(" or ")));
        }
        if let Some(body) = &m.body {
            c.described.push(match &body.value {
                RawBodyMatch {
                    contains: Some(t), ..
                } => {
                    format!(
                        "the upstream's body contains `{}`",
                        crate::escape::clean(t, 120)
                    )
                }
                RawBodyMatch { regex: Some(r), .. } => {
                    format!(
                        "the upstream's body matches `{}`",
                        crate::escape::clean(r, 120)
                    )
                }
                _ => "the upstream's body matches".to_owned(),
            });
        }
        if let Some(paths) = &m.path {
            c.has_path = true;
            for pattern in paths.value.as_slice() {
                let glob = GlobBuilder::new(pattern)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| ctx.err(&paths.referenced, format!("bad path glob: {e}")))?;
                if !pattern.starts_with('/') && !pattern.starts_with('*') {
                    return Err(ctx.err(
                        &paths.referenced,
                        format!("path glob `{pattern}` must start with `/` (or `*`)"),
                    ));
                }
                self.paths.add(glob);
                self.path_owner.push(index);
                // `/admin/**` should also cover `/admin` itself.
                if let Some(base) = pattern.strip_suffix("/**").filter(|b| !b.is_empty())
                    && let Ok(glob) = GlobBuilder::new(base)
                        .literal_separator(true)
                        .backslash_escape(true)
                        .build()
                {
                    self.paths.add(glob);
                    self.path_owner.push(index);
                }
            }
        }
        if let Some(hosts) = &m.host {
            c.has_host = true;
            for pattern in hosts.value.as_slice() {
                let glob = GlobBuilder::new(&pattern.to_ascii_lowercase())
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| ctx.err(&hosts.referenced, format!("bad host glob: {e}")))?;
                self.hosts.add(glob);
                self.host_owner.push(index);
            }
        }
        for method in &m.methods {
            let upper = method.value.to_ascii_uppercase();
            let parsed = Method::from_bytes(upper.as_bytes()).map_err(|_| {
                ctx.err(
                    &method.referenced,
                    format!("`{}` is not an HTTP method", method.value),
                )
            })?;
            c.methods.push(parsed);
        }
        for (name, cond) in &m.headers {
            let header = header_name(ctx, &spanned_at(name, &cond.referenced))?;
            let slot = match self.captured.iter().position(|h| *h == header) {
                Some(slot) => slot,
                None => {
                    if self.captured.len() == MAX_CAPTURED_HEADERS {
                        return Err(ctx.err(
                            &cond.referenced,
                            format!(
                                "policies test more than {MAX_CAPTURED_HEADERS} distinct request headers; test fewer"
                            ),
                        ));
                    }
                    self.captured.push(header);
                    self.captured.len() - 1
                }
            };
            c.request_headers.push((slot, header_cond(ctx, cond)?));
        }
        for (name, cond) in &m.response_headers {
            let header = header_name(ctx, &spanned_at(name, &cond.referenced))?;
            c.response_headers.push((header, header_cond(ctx, cond)?));
        }
        c.client_in = self.networks_of(&m.client_in)?;
        c.client_not_in = self.networks_of(&m.client_not_in)?;
        for status in &m.status {
            if !self.signatures && !self.intercept.contains(status.value) {
                return Err(ctx.err(
                    &status.referenced,
                    format!(
                        "status {} is not intercepted, so this condition could never hold; add it to `intercept`",
                        status.value
                    ),
                ));
            }
            c.status.push(status.value);
        }
        if let Some(body) = &m.body {
            let (_, pattern) = body_cond(ctx, body)?;
            self.body_patterns.push(pattern);
            c.body = Some(self.body_patterns.len() - 1);
        }
        if let Some(reason) = &m.reason {
            c.reason = Some(body_cond(ctx, reason)?.0);
        }
        Ok(c)
    }

    fn networks_of(&self, names: &[Spanned<String>]) -> Result<Vec<IpNet>, ConfigError> {
        let mut out = Vec::new();
        for item in names {
            if let Some(nets) = self.networks.get(item.value.as_str()) {
                out.extend(nets.iter().copied());
            } else if item.value.contains(['.', ':']) {
                out.push(network(self.ctx, item)?);
            } else {
                let known: Vec<&str> = self.networks.keys().copied().collect();
                let mut msg = format!("unknown network `{}`", item.value);
                if let Some(s) = suggest(&item.value, &known) {
                    msg.push_str(&format!(" (did you mean `{s}`?)"));
                }
                msg.push_str("; name a list under `networks` or give a CIDR such as 192.0.2.0/24");
                return Err(self.ctx.err(&item.referenced, msg));
            }
        }
        Ok(out)
    }
}

fn header_cond(ctx: &Ctx<'_>, cond: &Spanned<RawHeaderMatch>) -> Result<HeaderCond, ConfigError> {
    let m = &cond.value;
    let given = [
        m.present.is_some(),
        m.absent.is_some(),
        m.equals.is_some(),
        m.glob.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if given != 1 {
        return Err(ctx.err(
            &cond.referenced,
            "a header condition takes exactly one of `present: true`, `absent: true`, `equals: VALUE`, `glob: PATTERN`",
        ));
    }
    Ok(match m {
        RawHeaderMatch {
            present: Some(true),
            ..
        }
        | RawHeaderMatch {
            absent: Some(false),
            ..
        } => HeaderCond::Present,
        RawHeaderMatch {
            present: Some(false),
            ..
        }
        | RawHeaderMatch {
            absent: Some(true), ..
        } => HeaderCond::Absent,
        RawHeaderMatch {
            equals: Some(v), ..
        } => HeaderCond::Equals(v.as_bytes().to_vec()),
        RawHeaderMatch { glob: Some(g), .. } => HeaderCond::Glob(
            GlobBuilder::new(g)
                .build()
                .map_err(|e| ctx.err(&cond.referenced, format!("bad header glob: {e}")))?
                .compile_matcher(),
        ),
        _ => HeaderCond::Present,
    })
}

/// A body condition, and the same as a regex pattern for the one-pass set.
fn body_cond(
    ctx: &Ctx<'_>,
    body: &Spanned<RawBodyMatch>,
) -> Result<(BodyCond, String), ConfigError> {
    match &body.value {
        RawBodyMatch {
            contains: Some(text),
            regex: None,
        } => {
            if text.is_empty() || text.len() > MAX_PATTERN_BYTES {
                return Err(ctx.err(
                    &body.referenced,
                    format!("`contains` must be 1 to {MAX_PATTERN_BYTES} bytes"),
                ));
            }
            Ok((
                BodyCond::Contains(Box::new(memmem::Finder::new(text.as_bytes()).into_owned())),
                regex::escape(text),
            ))
        }
        RawBodyMatch {
            contains: None,
            regex: Some(pattern),
        } => {
            if pattern.len() > MAX_PATTERN_BYTES {
                return Err(ctx.err(
                    &body.referenced,
                    format!(
                        "the regex is {} bytes; the limit is {MAX_PATTERN_BYTES}",
                        pattern.len()
                    ),
                ));
            }
            let re = regex::bytes::RegexBuilder::new(pattern)
                .size_limit(MAX_REGEX_COMPILED_BYTES)
                .dfa_size_limit(4 * MAX_REGEX_COMPILED_BYTES)
                .build()
                .map_err(|e| {
                    let detail = match e {
                        regex::Error::CompiledTooBig(limit) => format!(
                            "the regex compiles to more than {limit} bytes; simplify it (bounded repetitions such as {{1000}} multiply its size)"
                        ),
                        other => other.to_string(),
                    };
                    ctx.err(&body.referenced, format!("bad body regex: {detail}"))
                })?;
            Ok((BodyCond::Regex(re), pattern.clone()))
        }
        _ => Err(ctx.err(
            &body.referenced,
            "a body condition takes exactly one of `contains: TEXT` and `regex: PATTERN`",
        )),
    }
}

fn template(ctx: &Ctx<'_>, text: &Spanned<String>) -> Result<Template, ConfigError> {
    if text.value.chars().count() > MAX_TEXT_CHARS {
        return Err(ctx.err(
            &text.referenced,
            format!("text longer than {MAX_TEXT_CHARS} characters"),
        ));
    }
    Template::parse(&text.value).map_err(|m| ctx.err(&text.referenced, m))
}

/// A vocabulary word, with a "did you mean" when it is close to a known one.
fn word<T: Copy>(
    ctx: &Ctx<'_>,
    value: &Spanned<String>,
    field: &str,
    parse: fn(&str) -> Option<T>,
    known: &[&str],
) -> Result<T, ConfigError> {
    parse(&value.value).ok_or_else(|| {
        let mut msg = format!(
            "unknown {field} `{}`",
            crate::escape::clean(&value.value, 64)
        );
        if let Some(s) = suggest(&value.value, known) {
            msg.push_str(&format!(" (did you mean `{s}`?)"));
        }
        msg.push_str(&format!("; expected one of {}", known.join(", ")));
        ctx.err(&value.referenced, msg)
    })
}

fn network(ctx: &Ctx<'_>, value: &Spanned<String>) -> Result<IpNet, ConfigError> {
    let text = value.value.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map(|n| match n {
            // Match IPv4-mapped IPv6 peers against IPv4 lists.
            IpNet::V6(v6) => v6
                .addr()
                .to_ipv4_mapped()
                .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len().saturating_sub(96)).ok())
                .map(IpNet::V4)
                .unwrap_or(n),
            v4 => v4,
        })
        .map(|n| n.trunc())
        .map_err(|_| {
            ctx.err(
                &value.referenced,
                format!(
                    "`{}` is not a CIDR or an IP address (write 10.0.0.0/8 or 2001:db8::/32)",
                    crate::escape::clean(text, 64)
                ),
            )
        })
}

fn header_name(ctx: &Ctx<'_>, value: &Spanned<String>) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(value.value.as_bytes()).map_err(|_| {
        ctx.err(
            &value.referenced,
            format!(
                "`{}` is not a valid header name",
                crate::escape::clean(&value.value, 64)
            ),
        )
    })
}

fn socket_addr(
    ctx: &Ctx<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<SocketAddr, ConfigError> {
    value.value.parse().map_err(|_| {
        ctx.err(
            &value.referenced,
            format!("`{field}` must be an address with a port, such as 127.0.0.1:8080"),
        )
    })
}

fn upstream_url(ctx: &Ctx<'_>, value: &Spanned<String>) -> Result<Uri, ConfigError> {
    let uri: Uri = value
        .value
        .parse()
        .map_err(|_| ctx.err(&value.referenced, "`upstream` is not a URL"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
    if !scheme_ok || uri.authority().is_none() || !path_ok {
        return Err(ctx.err(
            &value.referenced,
            "`upstream` must be http://host:port or https://host:port, without a path",
        ));
    }
    Ok(uri)
}

/// Compiles a signature pack file (`signatures: [...]`).
pub(crate) fn compile_pack(text: &str, name: &str) -> Result<PolicySet, ConfigError> {
    let ctx = Ctx { name, text };
    let raw: super::raw::RawPack =
        serde_saphyr::from_str(text).map_err(|e| yaml_error(&ctx, &e))?;
    let networks = HashMap::new();
    let mut builder = PolicyBuilder::new(&ctx, &networks, StatusSet::from_codes(&[]), true);
    let mut sigs = Vec::with_capacity(raw.signatures.len());
    for (index, raw_sig) in raw.signatures.iter().enumerate() {
        sigs.push(builder.policy(index, raw_sig, Expose::Full)?);
    }
    builder.finish(sigs)
}

fn limits(ctx: &Ctx<'_>, raw: Option<&RawLimits>) -> Result<Limits, ConfigError> {
    let mut l = Limits::default();
    let Some(raw) = raw else {
        return Ok(l);
    };
    let duration = |v: &Option<Spanned<String>>, field: &str, into: &mut Duration| {
        if let Some(v) = v {
            *into = parse_duration(&v.value).ok_or_else(|| {
                ctx.err(
                    &v.referenced,
                    format!("`{field}` must be a duration between 1ms and 1 day, such as 250ms, 10s, 5m or 1h"),
                )
            })?;
        }
        Ok::<_, ConfigError>(())
    };
    duration(
        &raw.header_read_timeout,
        "header_read_timeout",
        &mut l.header_read_timeout,
    )?;
    duration(
        &raw.upstream_connect_timeout,
        "upstream_connect_timeout",
        &mut l.upstream_connect_timeout,
    )?;
    duration(
        &raw.upstream_response_timeout,
        "upstream_response_timeout",
        &mut l.upstream_response_timeout,
    )?;
    duration(&raw.idle_timeout, "idle_timeout", &mut l.idle_timeout)?;
    duration(&raw.shutdown_grace, "shutdown_grace", &mut l.shutdown_grace)?;
    let count = |v: &Option<Spanned<u32>>, field: &str, min: u32, max: u32, into: &mut usize| {
        if let Some(v) = v {
            if !(min..=max).contains(&v.value) {
                return Err(ctx.err(
                    &v.referenced,
                    format!(
                        "`{field}` is {}; it must be between {min} and {max}",
                        v.value
                    ),
                ));
            }
            *into = v.value as usize;
        }
        Ok(())
    };
    count(
        &raw.max_header_bytes,
        "max_header_bytes",
        8192,
        1 << 20,
        &mut l.max_header_bytes,
    )?;
    count(&raw.max_headers, "max_headers", 8, 1000, &mut l.max_headers)?;
    count(
        &raw.max_uri_bytes,
        "max_uri_bytes",
        256,
        1 << 20,
        &mut l.max_uri_bytes,
    )?;
    count(
        &raw.max_connections,
        "max_connections",
        1,
        1 << 20,
        &mut l.max_connections,
    )?;
    if let Some(v) = &raw.max_request_body_bytes {
        l.max_request_body_bytes = Some(v.value);
    }
    Ok(l)
}

/// `250ms`, `10s`, `5m`, `1h`, between 1 ms and one day.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (Duration::from_millis(1)..=Duration::from_secs(86_400))
        .contains(&d)
        .then_some(d)
}

/// A spanned copy of a map key, located at its value (keys carry no span).
fn spanned_at(key: &str, at: &Location) -> Spanned<String> {
    Spanned::new(key.to_owned(), *at, *at)
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn yaml_error(ctx: &Ctx<'_>, e: &serde_saphyr::Error) -> ConfigError {
    let options = serde_saphyr::render_options! { snippets: serde_saphyr::SnippetMode::Off };
    let mut message = e.render_with_options(options);
    // The plain rendering ends with " at line N, column M"; the location is shown separately.
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    let message = with_suggestion(message);
    let at = e.location().unwrap_or(Location::UNKNOWN);
    ctx.err(&at, message)
}

/// FNV-1a of the config text: a short, stable revision id.
fn revision(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
