//! Compiling policies and signatures: conditions, globs, header and body
//! matchers, templates; all policies of a set share one glob pass and one
//! body pass.

use std::collections::HashMap;

use globset::{GlobBuilder, GlobSetBuilder};
use http::{HeaderName, Method, Uri};
use ipnet::IpNet;
use memchr::memmem;
use serde_saphyr::{Location, Spanned};

use super::compile::{
    Ctx, MAX_PATTERN_BYTES, MAX_REGEX_COMPILED_BYTES, MAX_TEXT_CHARS, header_name, is_id, network,
    spanned_at, word, yaml_error,
};
use super::error::suggest;
use super::raw::{RawBodyMatch, RawHeaderMatch, RawMatch, RawPolicy};
use super::{ConfigError, StatusSet};
use crate::explanation::{Audience, CauseKind, DeniedBy, Effort, Expose, Likelihood};
use crate::facts::MAX_CAPTURED_HEADERS;
use crate::policy::{BodyCond, Conditions, HeaderCond, Policy, PolicySet, Step};
use crate::template::Template;

pub(super) struct PolicyBuilder<'a> {
    ctx: &'a Ctx<'a>,
    networks: &'a HashMap<&'a str, Vec<IpNet>>,
    intercept: StatusSet,
    pub(super) captured: Vec<HeaderName>,
    paths: GlobSetBuilder,
    path_owner: Vec<usize>,
    hosts: GlobSetBuilder,
    host_owner: Vec<usize>,
    /// Policy id → line where it was first defined.
    seen: HashMap<String, u64>,
    /// Signatures match on the response only.
    signatures: bool,
    /// Required literals of body conditions, with their policy's index.
    body_literals: Vec<(Vec<u8>, usize)>,
}

impl<'a> PolicyBuilder<'a> {
    pub(super) fn new(
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
            body_literals: Vec::new(),
        }
    }

    pub(super) fn finish(self, policies: Vec<Policy>) -> Result<PolicySet, ConfigError> {
        let ctx = self.ctx;
        let paths = self
            .paths
            .build()
            .map_err(|e| ctx.err(&Location::UNKNOWN, format!("path globs: {e}")))?;
        let hosts = self
            .hosts
            .build()
            .map_err(|e| ctx.err(&Location::UNKNOWN, format!("host globs: {e}")))?;
        let bodies =
            crate::policy::BodyScan::new(self.body_literals, policies.len()).map_err(|e| {
                ctx.err(
                    &Location::UNKNOWN,
                    format!("the body conditions together are too large: {e}"),
                )
            })?;
        Ok(PolicySet {
            policies,
            paths,
            path_owner: self.path_owner,
            hosts,
            host_owner: self.host_owner,
            bodies,
        })
    }

    pub(super) fn policy(
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
                    ctx.take_regex(&x.regex.referenced)?;
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
            let (cond, literals) = body_cond(ctx, body)?;
            for literal in literals.into_iter().flatten() {
                self.body_literals.push((literal, index));
            }
            c.body = Some(cond);
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

/// A body condition, and the literals one of which any match contains
/// (for the one-pass body scan).
fn body_cond(
    ctx: &Ctx<'_>,
    body: &Spanned<RawBodyMatch>,
) -> Result<(BodyCond, Option<crate::literals::Literals>), ConfigError> {
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
                crate::literals::contains_literal(text.as_bytes()),
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
            ctx.take_regex(&body.referenced)?;
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
            Ok((
                BodyCond::Regex(re),
                crate::literals::required_literals(pattern),
            ))
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

/// Compiles a signature pack file (`signatures: [...]`).
pub(crate) fn compile_pack(text: &str, name: &str) -> Result<PolicySet, ConfigError> {
    // The built-in pack is ours, not input: no regex budget.
    let ctx = Ctx::new(name, text, usize::MAX);
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
