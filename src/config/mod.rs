//! The config: read from YAML into raw types ([`raw`]), validated and compiled
//! (`compile.rs`, `policies.rs`) into a [`Config`] that is used as it is at request time:
//! globs, networks, regexes and templates are all built once.
//!
//! A config is either wholly valid or refused with the file, line and column
//! of the first problem; nothing is ever half-loaded.

mod compile;
#[cfg(feature = "sidecar")]
pub(crate) use compile::revision;
mod error;
pub mod events;
mod policies;
pub mod raw;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, StatusCode, Uri};
use ipnet::IpNet;

pub(crate) use error::suggest;
pub use error::{ConfigError, Located};

use crate::explanation::Expose;
use crate::policy::PolicySet;

/// The largest config file whydenied reads.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Default `max_body_kib`.
pub const DEFAULT_MAX_BODY_KIB: u32 = 64;

/// A validated, compiled config. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Config {
    pub(crate) intercept: StatusSet,
    pub(crate) max_body_bytes: usize,
    pub(crate) trusted_proxies: Vec<IpNet>,
    pub(crate) identity_header: Option<HeaderName>,
    pub(crate) identity_claim: Option<String>,
    pub(crate) api_key_headers: Vec<HeaderName>,
    pub(crate) captured_headers: Vec<HeaderName>,
    pub(crate) policies: PolicySet,
    pub(crate) custom_signatures: PolicySet,
    pub(crate) builtin_signatures: bool,
    pub(crate) expose: Expose,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) upstream: Option<Uri>,
    pub(crate) upstream_ca_file: Option<std::path::PathBuf>,
    pub(crate) admin_listen: Option<SocketAddr>,
    pub(crate) limits: Limits,
    pub(crate) events: events::EventSettings,
    pub(crate) revision: String,
    pub(crate) hub: std::sync::OnceLock<crate::events::record::Hub>,
    /// Recent denials and escalation state: one per handle, carried from
    /// config to config when the handle's config is replaced.
    pub(crate) recorder: std::sync::OnceLock<Arc<crate::events::record::Recorder>>,
}

/// Limits and timeouts of the sidecar proxy (see the config reference).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Longest request target in bytes.
    pub max_uri_bytes: usize,
    /// Largest request body in bytes, if limited.
    pub max_request_body_bytes: Option<u64>,
    /// Time to connect to the upstream.
    pub upstream_connect_timeout: Duration,
    /// Time for the upstream's response headers.
    pub upstream_response_timeout: Duration,
    /// Idle connection lifetime.
    pub idle_timeout: Duration,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
}

/// Reads a config file: a regular file (a FIFO or a device such as
/// /dev/zero, put in its place by mistake, would block the reader or never
/// end), of at most [`MAX_CONFIG_BYTES`] (checked on what was opened, and
/// again on what was read: the file may grow meanwhile).
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let not_a_file = || ConfigError::NotAFile {
        path: path.to_owned(),
    };
    let too_large = |size| ConfigError::TooLarge {
        name: path.display().to_string(),
        size,
        limit: MAX_CONFIG_BYTES,
    };
    // Before opening: opening a FIFO waits for a writer.
    if !std::fs::metadata(path).map_err(read_err)?.is_file() {
        return Err(not_a_file());
    }
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(not_a_file());
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_request_body_bytes: None,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Default for Config {
    /// Explains 403s with the built-in detectors only.
    fn default() -> Self {
        Config::from_yaml_str("{}").unwrap_or_else(|_| unreachable_default())
    }
}

// `{}` always compiles; this keeps `Default` free of panics all the same.
fn unreachable_default() -> Config {
    Config {
        intercept: StatusSet::from_codes(&[403]),
        max_body_bytes: DEFAULT_MAX_BODY_KIB as usize * 1024,
        trusted_proxies: Vec::new(),
        identity_header: None,
        identity_claim: None,
        api_key_headers: Vec::new(),
        captured_headers: Vec::new(),
        policies: PolicySet::default(),
        custom_signatures: PolicySet::default(),
        builtin_signatures: true,
        expose: Expose::Full,
        listen: None,
        upstream: None,
        upstream_ca_file: None,
        admin_listen: None,
        limits: Limits::default(),
        events: events::EventSettings::default(),
        revision: String::new(),
        hub: std::sync::OnceLock::new(),
        recorder: std::sync::OnceLock::new(),
    }
}

impl Config {
    /// Parses and compiles a YAML config held in a string.
    pub fn from_yaml_str(yaml: &str) -> Result<Config, ConfigError> {
        Self::parse(yaml, "<config>")
    }

    /// Reads, parses and compiles a YAML config file. Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = read_file(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and compiles `text`, naming it `source_name` in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                name: source_name.to_owned(),
                size: text.len() as u64,
                limit: MAX_CONFIG_BYTES,
            });
        }
        compile::compile(text, source_name)
    }

    /// Whether responses with this status are explained.
    #[inline]
    pub fn intercepts(&self, status: StatusCode) -> bool {
        self.intercept.contains(status.as_u16())
    }

    /// The intercepted statuses.
    pub fn intercepted(&self) -> Vec<u16> {
        self.intercept.codes()
    }

    /// How many bytes of a denial's body are read.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The policies, in file order.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// The signature sets to try, in order: the config's own, then the
    /// built-in pack (unless switched off).
    pub fn signatures(&self) -> impl Iterator<Item = &PolicySet> {
        let builtin = self.builtin_signatures.then(builtin_signatures);
        std::iter::once(&self.custom_signatures).chain(builtin)
    }

    /// A short hash of the config text, to tell which config answered.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// Sidecar: the address to listen on, if set.
    pub fn listen(&self) -> Option<SocketAddr> {
        self.listen
    }

    /// Sidecar: the upstream URL, if set.
    pub fn upstream(&self) -> Option<&Uri> {
        self.upstream.as_ref()
    }

    /// Sidecar: the CA file trusted for an `https://` upstream, if set.
    pub fn upstream_ca_file(&self) -> Option<&std::path::Path> {
        self.upstream_ca_file.as_deref()
    }

    /// Sidecar: the admin listener address, if set.
    pub fn admin_listen(&self) -> Option<SocketAddr> {
        self.admin_listen
    }

    /// The live sinks of this config, started on first use.
    pub(crate) fn hub(&self) -> &crate::events::record::Hub {
        self.hub
            .get_or_init(|| crate::events::record::Hub::start(self))
    }

    /// Events, sinks and escalation.
    pub fn events(&self) -> &events::EventSettings {
        &self.events
    }

    /// Sidecar: limits and timeouts.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn captured_headers(&self) -> &[HeaderName] {
        &self.captured_headers
    }

    pub(crate) fn identity_header(&self) -> Option<&HeaderName> {
        self.identity_header.as_ref()
    }

    pub(crate) fn api_key_headers(&self) -> &[HeaderName] {
        &self.api_key_headers
    }

    #[inline]
    pub(crate) fn has_trusted_proxies(&self) -> bool {
        !self.trusted_proxies.is_empty()
    }

    pub(crate) fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// The built-in signature pack (`config/signatures.yaml`), compiled once.
pub fn builtin_signatures() -> &'static PolicySet {
    static PACK: std::sync::OnceLock<PolicySet> = std::sync::OnceLock::new();
    PACK.get_or_init(|| {
        policies::compile_pack(BUILTIN_SIGNATURES, "config/signatures.yaml").unwrap_or_else(|e| {
            tracing::error!(target: "whydenied", error = %e, "the built-in signature pack does not compile");
            PolicySet::default()
        })
    })
}

/// The text of the built-in signature pack.
pub const BUILTIN_SIGNATURES: &str = include_str!("../../config/signatures.yaml");

/// Whether whydenied can connect to URLs of this scheme: `http`, and `https`
/// with the `tls` feature.
pub(crate) fn scheme_supported(scheme: Option<&str>) -> bool {
    scheme == Some("http") || (cfg!(feature = "tls") && scheme == Some("https"))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The statuses that are intercepted: a bit per status in 400..=599, so the
/// pass-through check is one shift and one mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StatusSet([u64; 4]);

impl StatusSet {
    pub(crate) fn from_codes(codes: &[u16]) -> Self {
        let mut bits = [0u64; 4];
        for &code in codes {
            if (400..600).contains(&code) {
                let i = (code - 400) as usize;
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        Self(bits)
    }

    #[inline]
    pub(crate) fn contains(&self, code: u16) -> bool {
        let i = code.wrapping_sub(400) as usize;
        i < 200 && self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn codes(&self) -> Vec<u16> {
        (400..600).filter(|c| self.contains(*c)).collect()
    }
}

/// The current config, replaceable while requests run. Requests load it once
/// when they start and finish on that config even if it is replaced meanwhile.
#[derive(Clone, Debug)]
pub struct ConfigHandle(Arc<ArcSwap<Config>>);

impl ConfigHandle {
    /// A handle holding `config`.
    pub fn new(config: Config) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(config)))
    }

    /// The current config.
    #[inline]
    pub fn load(&self) -> Arc<Config> {
        self.0.load_full()
    }

    /// Replaces the config for requests that start from now on. Recent
    /// denials and escalation state carry over.
    pub fn replace(&self, config: Config) {
        if let Some(recorder) = self.0.load().recorder.get() {
            let _ = config.recorder.set(recorder.clone());
        }
        self.0.store(Arc::new(config));
    }

    /// The recorder of this handle, created on first use.
    pub(crate) fn recorder(&self) -> Arc<crate::events::record::Recorder> {
        let current = self.0.load();
        current
            .recorder
            .get_or_init(|| Arc::new(crate::events::record::Recorder::new(&current)))
            .clone()
    }
}

#[cfg(test)]
mod tests;
