//! The config file as written: serde types that keep the location of every
//! value that can be wrong, so that validation can point at it. Nothing here
//! is used at request time; `compile.rs` turns it into [`super::Config`].
//!
//! The doc comments on these types are the config reference: they become the
//! descriptions in the published JSON Schema (`whydenied schema`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

#[cfg(feature = "schema")]
use schemars::JsonSchema;

/// A value with its place in the file.
pub type S<T> = Spanned<T>;

/// The whydenied config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(title = "whydenied config"))]
pub struct RawConfig {
    /// Sidecar only: the address the proxy listens on. Default `0.0.0.0:8080`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub listen: Option<S<String>>,
    /// Sidecar only: the service behind the proxy, as an `http://host:port` URL.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub upstream: Option<S<String>>,
    /// Sidecar only: TLS to an `https://` upstream (feature `tls`).
    #[serde(default)]
    pub upstream_tls: Option<RawUpstreamTls>,
    /// Sidecar only: the admin listener (health, metrics, denial lookup).
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    /// Response statuses that are explained. Default `[403]`. Any 4xx or 5xx;
    /// typical additions are 401, 429 and 451.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Vec<u16>>"))]
    pub intercept: Option<Vec<S<u16>>>,
    /// How much of a denial's upstream body is read for diagnosis, in KiB.
    /// Default 64, at most 1024. The rest is never read.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub max_body_kib: Option<S<u32>>,
    /// Peers whose `X-Forwarded-For` is believed: CIDRs or addresses.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub trusted_proxies: Vec<S<String>>,
    /// Where the caller's identity comes from.
    #[serde(default)]
    pub identity: Option<RawIdentity>,
    /// What counts as credentials when deciding "no credentials were sent".
    #[serde(default)]
    pub credentials: Option<RawCredentials>,
    /// Named network lists (CIDRs or addresses) that policies refer to by name.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "BTreeMap<String, Vec<String>>"))]
    pub networks: BTreeMap<String, S<Vec<S<String>>>>,
    /// Default for policies' `expose`: `full` (default), `caller` or `minimal`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub expose: Option<S<String>>,
    /// The policies, matched in file order; the first match explains the denial.
    #[serde(default)]
    pub policies: Vec<RawPolicy>,
    /// Sidecar only: limits and timeouts of the proxy.
    #[serde(default)]
    pub limits: Option<RawLimits>,
    /// The signatures that recognise common software's denials.
    #[serde(default)]
    pub signatures: Option<RawSignatures>,
    /// Where denial events go and what is kept of them.
    #[serde(default)]
    pub events: Option<super::events::RawEvents>,
    /// Named event sinks.
    #[serde(default)]
    pub sinks: BTreeMap<String, super::events::RawSink>,
    /// Escalation rules and self-service.
    #[serde(default)]
    pub escalation: Option<super::events::RawEscalation>,
}

/// Limits and timeouts of the sidecar proxy. Durations are written like
/// `250ms`, `10s`, `5m`, `1h`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawLimits {
    /// Time a client has to send a request's headers (against slowloris),
    /// counted from accept for a connection's first request. Default `10s`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub header_read_timeout: Option<S<String>>,
    /// Largest request head (request line and headers) in bytes; larger gets
    /// 431. Default 32768, at least 8192.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub max_header_bytes: Option<S<u32>>,
    /// Most request headers; more gets 431. Default 100.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub max_headers: Option<S<u32>>,
    /// Longest request target in bytes; longer gets 414. Default 8192.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub max_uri_bytes: Option<S<u32>>,
    /// Largest request body in bytes; larger gets 413. Default: no limit.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u64>"))]
    pub max_request_body_bytes: Option<S<u64>>,
    /// Time to connect to the upstream; then 502. Default `5s`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub upstream_connect_timeout: Option<S<String>>,
    /// Time for the upstream to send its response headers; then 504.
    /// Default `60s`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub upstream_response_timeout: Option<S<String>>,
    /// How long an idle connection is kept, to the client and to the
    /// upstream, and how long an upstream body may send nothing before the
    /// proxy gives up on it (a stalled denial body is then explained with what
    /// was read). Also: how long a client may leave its response unread, an
    /// HTTP/2 connection may stay without streams (then GOAWAY), and an
    /// upgraded tunnel may carry nothing either way. Default `60s`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub idle_timeout: Option<S<String>>,
    /// Most client connections open at once, upgraded tunnels included;
    /// more wait to be accepted. Default 4096.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<u32>"))]
    pub max_connections: Option<S<u32>>,
    /// On SIGTERM or SIGINT, how long in-flight requests may take to finish.
    /// Default `30s`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub shutdown_grace: Option<S<String>>,
}

/// TLS to the upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawUpstreamTls {
    /// A PEM file of CA certificates trusted besides Mozilla's roots (for an
    /// internal CA).
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// The sidecar's admin listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawAdmin {
    /// Address of the admin listener. Default `127.0.0.1:9901`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub listen: Option<S<String>>,
}

/// Where the caller's identity comes from, in this order.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawIdentity {
    /// A request header set by an authenticating proxy or the app, such as
    /// `x-forwarded-user`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub header: Option<S<String>>,
    /// A claim of the bearer JWT (decoded without verification, so shown as
    /// unverified), such as `sub` or `email`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub jwt_claim: Option<S<String>>,
}

/// What counts as credentials.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawCredentials {
    /// Request headers that carry an API key. Default `[x-api-key]`.
    /// (`Authorization` and `Cookie` always count.)
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Vec<String>>"))]
    pub api_key_headers: Option<Vec<S<String>>>,
}

/// One policy: when it matches, it says who denied and why.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawPolicy {
    /// A unique id, quoted in events and metrics: letters, digits, `-`, `_`, `.`.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub id: S<String>,
    /// A short human title. May use template variables. Default: from the cause.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub title: Option<S<String>>,
    /// When the policy applies; all given conditions must hold. Empty matches
    /// every intercepted response.
    #[serde(default, rename = "match")]
    pub matcher: RawMatch,
    /// The cause: permission, authentication_missing, token_expired,
    /// token_invalid, insufficient_scope, ip_blocked, rate_limited, waf_or_bot,
    /// csrf, geo_blocked, account_state, policy_explicit_deny, unknown.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub cause: Option<S<String>>,
    /// What happened, for the caller. A template: `{{ path }}`, `{{ method }}`,
    /// `{{ host }}`, `{{ status }}`, `{{ policy }}`, `{{ policy_title }}`,
    /// `{{ identity }}`, `{{ client_ip }}`, `{{ denial_id }}`, `{{ owner }}`,
    /// `{{ contact }}`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub detail: Option<S<String>>,
    /// What can be done, in order.
    #[serde(default)]
    pub remediation: Vec<RawStep>,
    /// The team that owns the policy.
    #[serde(default)]
    pub owner: Option<String>,
    /// Whom the caller should ask (a channel, an address, a URL).
    #[serde(default)]
    pub contact: Option<String>,
    /// Where the policy is documented (an http or https URL).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub docs: Option<S<String>>,
    /// How much the caller sees: `full`, `caller` or `minimal`. Default: the
    /// top-level `expose`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub expose: Option<S<String>>,
    /// How sure a match makes the cause: `high` (default), `medium`, `low`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub likelihood: Option<S<String>>,
    /// Whether the identical request would succeed later. Default: from the
    /// cause (`rate_limited` is temporary).
    #[serde(default)]
    pub temporary: Option<bool>,
    /// Who denied: `proxy`, `upstream`, `identity_provider`, `waf_or_cdn`,
    /// `gateway`. Default `proxy` for policies, `upstream` for signatures.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub denied_by: Option<S<String>>,
    /// Pulls fields out of the upstream body into the evidence.
    #[serde(default)]
    pub extract: Option<RawExtract>,
}

/// A regular expression with named groups, and the evidence sentence that
/// uses them as `{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawExtract {
    /// Run over the body prefix, such as `User \\"(?P<user>[^\\"]+)\\"`.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub regex: S<String>,
    /// The evidence, such as `Kubernetes user {user}`.
    pub text: String,
}

/// The built-in signature pack and the config's own signatures.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawSignatures {
    /// Use the built-in pack (config/signatures.yaml). Default true.
    #[serde(default)]
    pub builtin: Option<bool>,
    /// More signatures, tried before the built-in ones. Same language as
    /// policies, matching only on the response: `status`,
    /// `response_headers`, `body`, `reason`.
    #[serde(default)]
    pub custom: Vec<RawPolicy>,
}

/// The signature pack file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPack {
    /// The signatures, tried in order.
    pub signatures: Vec<RawPolicy>,
}

/// One remediation step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawStep {
    /// What to do. A template, like `detail`.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub step: S<String>,
    /// Who can do it: `caller` (default) or `admin`.
    #[serde(default, rename = "for")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub audience: Option<S<String>>,
    /// `easy` (default), `medium` or `hard`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub effort: Option<S<String>>,
}

/// The conditions of a policy. All that are given must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawMatch {
    /// Path glob(s): `*` stays within one segment, `**` crosses segments,
    /// `{a,b}` alternates. Example: `/admin/**`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<OneOrMany>"))]
    pub path: Option<S<OneOrMany>>,
    /// Request methods, such as `[GET, POST]`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub methods: Vec<S<String>>,
    /// Host glob(s), matched without the port, case-insensitively: `*.example.com`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<OneOrMany>"))]
    pub host: Option<S<OneOrMany>>,
    /// Request header conditions, by header name.
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schemars(with = "BTreeMap<String, RawHeaderMatch>")
    )]
    pub headers: BTreeMap<String, S<RawHeaderMatch>>,
    /// The client address is in one of these (network names or CIDRs).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub client_in: Vec<S<String>>,
    /// The client address is in none of these (network names or CIDRs).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub client_not_in: Vec<S<String>>,
    /// The response status is one of these.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<u16>"))]
    pub status: Vec<S<u16>>,
    /// Upstream response header conditions, by header name.
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schemars(with = "BTreeMap<String, RawHeaderMatch>")
    )]
    pub response_headers: BTreeMap<String, S<RawHeaderMatch>>,
    /// A condition on the first `max_body_kib` of the upstream body.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<RawBodyMatch>"))]
    pub body: Option<S<RawBodyMatch>>,
    /// A condition on the reason phrase of the upstream's status line
    /// (HTTP/1.1 only; `Ip Forbidden` in `403 Ip Forbidden`).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Option<RawBodyMatch>"))]
    pub reason: Option<S<RawBodyMatch>>,
}

/// One string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values; any may match.
    Many(Vec<String>),
}

impl OneOrMany {
    pub(crate) fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A header condition: exactly one of `present`, `absent`, `equals`, `glob`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawHeaderMatch {
    /// `true`: the header is sent (any value).
    #[serde(default)]
    pub present: Option<bool>,
    /// `true`: the header is not sent.
    #[serde(default)]
    pub absent: Option<bool>,
    /// Its value equals this exactly.
    #[serde(default)]
    pub equals: Option<String>,
    /// Its value matches this glob (`*` matches anything).
    #[serde(default)]
    pub glob: Option<String>,
}

/// A body condition: exactly one of `contains` and `regex`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
pub struct RawBodyMatch {
    /// The body contains this text (case-sensitive).
    #[serde(default)]
    pub contains: Option<String>,
    /// The body matches this regular expression (Rust `regex` syntax, linear
    /// time; at most 1 KiB of pattern and a bounded compiled size).
    #[serde(default)]
    pub regex: Option<String>,
}
