//! Validation and compilation: [`RawConfig`] in, [`Config`] out, or the first
//! problem with its location. Policies and signatures are compiled in
//! `policies.rs`; this file owns the rest of the config and the helpers both use.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{HeaderName, Uri};
use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};

use super::error::{Located, suggest, with_suggestion};
use super::policies::PolicyBuilder;
use super::raw::{RawConfig, RawLimits};
use super::{Config, ConfigError, DEFAULT_MAX_BODY_KIB, Limits, StatusSet};
use crate::explanation::Expose;
use crate::policy::PolicySet;

pub(super) const MAX_PATTERN_BYTES: usize = 1024;
pub(super) const MAX_REGEX_COMPILED_BYTES: usize = 256 * 1024;
pub(super) const MAX_TEXT_CHARS: usize = 2048;

/// Most regexes one config may compile (policies and custom signatures):
/// each costs up to [`MAX_REGEX_COMPILED_BYTES`] and those without a
/// required literal run on every denied body, so a long file of them could
/// take gigabytes and seconds per denial.
pub(super) const MAX_REGEXES: usize = 200;

/// Where errors are reported: the source's name and text; and how many more
/// regexes it may compile.
pub(super) struct Ctx<'a> {
    pub(super) name: &'a str,
    pub(super) text: &'a str,
    pub(super) regexes_left: std::cell::Cell<usize>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(name: &'a str, text: &'a str, max_regexes: usize) -> Self {
        Self {
            name,
            text,
            regexes_left: std::cell::Cell::new(max_regexes),
        }
    }

    /// Takes one regex from the budget, before it is compiled.
    pub(super) fn take_regex(&self, at: &Location) -> Result<(), ConfigError> {
        match self.regexes_left.get().checked_sub(1) {
            Some(left) => {
                self.regexes_left.set(left);
                Ok(())
            }
            None => Err(self.err(
                at,
                format!(
                    "more than {MAX_REGEXES} regexes in one config; each costs memory and may run on every denied body: use `contains:` or fewer, broader patterns"
                ),
            )),
        }
    }

    pub(super) fn err(&self, at: &Location, message: impl Into<String>) -> ConfigError {
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
    let ctx = Ctx::new(name, text, MAX_REGEXES);
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

/// A vocabulary word, with a "did you mean" when it is close to a known one.
pub(super) fn word<T: Copy>(
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

pub(super) fn network(ctx: &Ctx<'_>, value: &Spanned<String>) -> Result<IpNet, ConfigError> {
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

pub(super) fn header_name(
    ctx: &Ctx<'_>,
    value: &Spanned<String>,
) -> Result<HeaderName, ConfigError> {
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
pub(super) fn spanned_at(key: &str, at: &Location) -> Spanned<String> {
    Spanned::new(key.to_owned(), *at, *at)
}

pub(super) fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn yaml_error(ctx: &Ctx<'_>, e: &serde_saphyr::Error) -> ConfigError {
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
pub(crate) fn revision(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
