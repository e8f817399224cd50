//! The few facts about a request that are needed if its response turns out to
//! be a denial, captured before the request is handed on.
//!
//! Capturing is on the pass-through path, so it clones nothing but cheap,
//! reference-counted values (`Method`, `Uri`, `HeaderValue`) and only those the
//! config asks for; it allocates nothing. Everything derived from them (the
//! client address behind trusted proxies, the identity) is worked out later,
//! and only for denials.

use std::net::{IpAddr, SocketAddr};

use http::header::{ACCEPT, AUTHORIZATION, COOKIE, HOST, USER_AGENT};
use http::{HeaderValue, Method, Request, Uri};

use crate::config::Config;

/// How many distinct request headers the policies of one config may test.
pub const MAX_CAPTURED_HEADERS: usize = 8;

/// How many `X-Forwarded-For` hops are looked at, from the right.
const MAX_FORWARDED_HOPS: usize = 32;
/// `X-Forwarded-For` lines kept after the first.
const MAX_FORWARDED_LINES: usize = 8;

/// The address of the peer that sent the request.
///
/// Insert it as a request extension so the layer knows the client address,
/// or give it to the service once per connection with
/// [`Explain::with_client_addr`](crate::Explain::with_client_addr) (the
/// sidecar does). With the `axum` feature the layer also reads axum's
/// `ConnectInfo<SocketAddr>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Bytes of small request values copied inline: copying a few hundred bytes
/// costs less than the reference-count traffic of cloning each value.
const INLINE_BYTES: usize = 320;

/// A captured value: copied into the inline buffer when it fits, else the
/// (reference-counted) original in one of the overflow slots. Small and
/// `Copy`, so that it is built in registers: a 40-byte enum written byte by
/// byte and then read back whole stalled the CPU on every header.
#[derive(Clone, Copy, Debug, Default)]
enum Fact {
    #[default]
    Absent,
    Inline {
        start: u16,
        len: u16,
    },
    Shared(u8),
}

/// Values kept by reference when they do not fit inline (`Host`, `Accept`,
/// `User-Agent`, the identity header and the headers policies test); more
/// spill into a vector.
const OVERFLOW_SLOTS: usize = 4;

/// What is kept of a request until its response is known.
pub struct RequestFacts {
    pub(crate) method: Method,
    inline: [u8; INLINE_BYTES],
    inline_used: usize,
    path_and_query: Fact,
    /// Only when the path does not fit inline.
    long_uri: Option<Uri>,
    authority: Fact,
    host: Fact,
    accept: Fact,
    user_agent: Fact,
    identity_header: Fact,
    overflow: [Option<HeaderValue>; OVERFLOW_SLOTS],
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) forwarded_for: Option<HeaderValue>,
    /// Further `X-Forwarded-For` lines, the last few (a proxy may append a
    /// line of its own rather than extend the first; rare, so no allocation
    /// otherwise).
    forwarded_for_more: Vec<HeaderValue>,
    pub(crate) has_cookie: bool,
    pub(crate) has_api_key: bool,
    /// False when the request is not known (explaining a bare response).
    pub(crate) credentials_known: bool,
    pub(crate) peer: Option<SocketAddr>,
    /// Values of the headers that policies test, in the config's order.
    captured: [Fact; MAX_CAPTURED_HEADERS],
    /// Long values beyond the overflow slots (rare: only with several long
    /// headers that policies test).
    spill: Vec<HeaderValue>,
}

/// Shows what a log may show: never a header value (the inline buffer holds
/// copies of them, and `Authorization` is kept whole).
impl std::fmt::Debug for RequestFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestFacts")
            .field("method", &self.method)
            .field("path", &crate::escape::clean(self.path(), 200))
            .field("host", &self.host().map(|h| crate::escape::clean(h, 200)))
            .field("has_credentials", &self.has_credentials())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl RequestFacts {
    /// Keeps `value` inline if it fits.
    #[inline]
    fn keep(&mut self, value: &HeaderValue) -> Fact {
        let bytes = value.as_bytes();
        if let Some(f) = self.keep_bytes(bytes) {
            return f;
        }
        if let Some(i) = self.overflow.iter().position(Option::is_none) {
            self.overflow[i] = Some(value.clone());
            return Fact::Shared(i as u8);
        }
        match u8::try_from(OVERFLOW_SLOTS + self.spill.len()) {
            Ok(i) => {
                self.spill.push(value.clone());
                Fact::Shared(i)
            }
            Err(_) => Fact::Absent,
        }
    }

    #[inline]
    fn keep_bytes(&mut self, bytes: &[u8]) -> Option<Fact> {
        let start = self.inline_used;
        let end = start.checked_add(bytes.len())?;
        if end > INLINE_BYTES {
            return None;
        }
        self.inline[start..end].copy_from_slice(bytes);
        self.inline_used = end;
        Some(Fact::Inline {
            start: start as u16,
            len: bytes.len() as u16,
        })
    }

    fn bytes(&self, fact: Fact) -> Option<&[u8]> {
        match fact {
            Fact::Absent => None,
            Fact::Inline { start, len } => self
                .inline
                .get(start as usize..start as usize + len as usize),
            Fact::Shared(i) => match self.overflow.get(i as usize) {
                Some(slot) => slot.as_ref().map(HeaderValue::as_bytes),
                None => self
                    .spill
                    .get(i as usize - OVERFLOW_SLOTS)
                    .map(HeaderValue::as_bytes),
            },
        }
    }

    fn text(&self, fact: Fact) -> Option<&str> {
        self.bytes(fact).and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The `Accept` header, as sent.
    pub fn accept(&self) -> Option<&[u8]> {
        self.bytes(self.accept)
    }

    /// The `User-Agent` header, as sent.
    pub fn user_agent(&self) -> Option<&[u8]> {
        self.bytes(self.user_agent)
    }

    /// The identity header, as sent (if the config names one).
    pub fn identity_header(&self) -> Option<&[u8]> {
        self.bytes(self.identity_header)
    }

    /// Forgets the identity header (sent by a peer that may not set it).
    pub(crate) fn drop_identity_header(&mut self) {
        self.identity_header = Fact::Absent;
    }

    /// The query, if any.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query_str().split_once('?').map(|(_, q)| q)
    }

    fn path_and_query_str(&self) -> &str {
        if let Some(uri) = &self.long_uri {
            return uri.path_and_query().map_or("/", |p| p.as_str());
        }
        self.text(self.path_and_query).unwrap_or("/")
    }

    /// Captures what `config` needs from `req`.
    #[inline]
    pub fn capture<B>(req: &Request<B>, config: &Config) -> Self {
        let headers = req.headers();
        let peer = req
            .extensions()
            .get::<ClientAddr>()
            .map(|a| a.0)
            .or_else(|| axum_peer(req));
        let mut facts = Self {
            method: req.method().clone(),
            inline: [0; INLINE_BYTES],
            inline_used: 0,
            path_and_query: Fact::Absent,
            long_uri: None,
            authority: Fact::Absent,
            host: Fact::Absent,
            accept: Fact::Absent,
            user_agent: Fact::Absent,
            identity_header: Fact::Absent,
            overflow: [const { None }; OVERFLOW_SLOTS],
            authorization: None,
            forwarded_for: None,
            forwarded_for_more: Vec::new(),
            has_cookie: false,
            has_api_key: false,
            credentials_known: true,
            peer,
            captured: [Fact::Absent; MAX_CAPTURED_HEADERS],
            spill: Vec::new(),
        };
        let uri = req.uri();
        match uri
            .path_and_query()
            .and_then(|p| facts.keep_bytes(p.as_str().as_bytes()))
        {
            Some(f) => facts.path_and_query = f,
            None => facts.long_uri = Some(uri.clone()),
        }
        if let Some(a) = uri.authority() {
            facts.authority = facts.keep_bytes(a.as_str().as_bytes()).unwrap_or_default();
        }
        let identity_name = config.identity_header();
        let want_xff = config.has_trusted_proxies();
        // Headers that policies test are picked up in the same pass: one
        // lookup per policy header would hash each name again.
        let captured_names = config.captured_headers();
        for (name, value) in headers {
            if !captured_names.is_empty()
                && let Some(slot) = captured_names.iter().position(|c| c == name)
                && matches!(facts.captured.get(slot), Some(Fact::Absent))
            {
                facts.captured[slot] = facts.keep(value);
            }
            if name == HOST {
                if matches!(facts.host, Fact::Absent) {
                    facts.host = facts.keep(value);
                }
            } else if name == ACCEPT {
                if matches!(facts.accept, Fact::Absent) {
                    facts.accept = facts.keep(value);
                }
            } else if name == AUTHORIZATION {
                facts.authorization.get_or_insert_with(|| value.clone());
            } else if name == USER_AGENT {
                if matches!(facts.user_agent, Fact::Absent) {
                    facts.user_agent = facts.keep(value);
                }
            } else if name == COOKIE {
                facts.has_cookie = true;
            } else if identity_name == Some(name) {
                if matches!(facts.identity_header, Fact::Absent) {
                    facts.identity_header = facts.keep(value);
                }
            } else if want_xff && name.as_str() == "x-forwarded-for" {
                if facts.forwarded_for.is_none() {
                    facts.forwarded_for = Some(value.clone());
                } else {
                    if facts.forwarded_for_more.len() == MAX_FORWARDED_LINES {
                        facts.forwarded_for_more.remove(0);
                    }
                    facts.forwarded_for_more.push(value.clone());
                }
            } else if config.api_key_headers().contains(name) {
                facts.has_api_key = true;
            }
        }
        facts
    }

    /// The request method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request path, without the query.
    pub fn path(&self) -> &str {
        let pq = self.path_and_query_str();
        pq.split_once('?').map_or(pq, |(p, _)| p)
    }

    /// The requested host without its port: the URI's authority when there
    /// is one (HTTP/2, and an HTTP/1.1 absolute-form target, which wins over
    /// `Host`: RFC 9112 §3.2.2), else `Host`.
    pub fn host(&self) -> Option<&str> {
        let raw = match self.authority {
            Fact::Absent => self.text(self.host)?,
            authority => self.text(authority)?,
        };
        Some(strip_port(raw))
    }

    /// Treats the request's credentials as unknown (for explaining a response
    /// whose request was not seen, such as a corpus sample).
    pub fn assume_unknown_credentials(&mut self) {
        self.credentials_known = false;
    }

    /// Whether the request carried any credentials at all.
    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some() || self.has_cookie || self.has_api_key
    }

    /// The client address: the peer, or, when the peer is a trusted proxy, the
    /// right-most untrusted address in `X-Forwarded-For`.
    pub fn client_ip(&self, config: &Config) -> Option<IpAddr> {
        let peer = crate::config::canonical(self.peer?.ip());
        if !config.is_trusted_proxy(peer) {
            return Some(peer);
        }
        // Every line, the last first: together they are one list (RFC 9110
        // §5.3), and the right end is the part our trusted proxies wrote.
        let lines = self
            .forwarded_for_more
            .iter()
            .rev()
            .chain(self.forwarded_for.as_ref());
        let mut client = peer;
        let mut hops = 0;
        'chain: for line in lines {
            let Ok(line) = line.to_str() else { break };
            for hop in line.rsplit(',') {
                hops += 1;
                // A hop we cannot read, or too many: stop believing here.
                let Some(ip) =
                    parse_forwarded_ip(hop.trim()).filter(|_| hops <= MAX_FORWARDED_HOPS)
                else {
                    break 'chain;
                };
                client = crate::config::canonical(ip);
                if !config.is_trusted_proxy(client) {
                    break 'chain;
                }
            }
        }
        Some(client)
    }

    pub(crate) fn captured(&self, index: usize) -> Option<&[u8]> {
        self.bytes(*self.captured.get(index)?)
    }
}

#[cfg(feature = "axum")]
fn axum_peer<B>(req: &Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(not(feature = "axum"))]
fn axum_peer<B>(_req: &Request<B>) -> Option<SocketAddr> {
    None
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Reads one `X-Forwarded-For` entry: an address, optionally with a port.
fn parse_forwarded_ip(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    hop.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(trusted: &str) -> Config {
        Config::from_yaml_str(&format!("trusted_proxies: [{trusted}]\n")).unwrap()
    }

    fn facts(peer: &str, xff: Option<&str>, config: &Config) -> RequestFacts {
        facts_lines(peer, xff.as_slice(), config)
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let c = config("10.0.0.0/8");
        let f = facts("203.0.113.9:5000", Some("1.2.3.4"), &c);
        assert_eq!(f.client_ip(&c), Some("203.0.113.9".parse().unwrap()));
        let f = facts("10.1.1.1:5000", Some("1.2.3.4"), &c);
        assert_eq!(f.client_ip(&c), Some("1.2.3.4".parse().unwrap()));
    }

    fn facts_lines(peer: &str, lines: &[&str], config: &Config) -> RequestFacts {
        let mut req = Request::builder().uri("/x");
        for line in lines {
            req = req.header("x-forwarded-for", *line);
        }
        let mut req = req.body(()).unwrap();
        req.extensions_mut()
            .insert(ClientAddr(peer.parse().unwrap()));
        RequestFacts::capture(&req, config)
    }

    #[test]
    fn forwarded_for_lines_are_one_list() {
        let c = config("10.0.0.0/8");
        // The client forged a line; the trusted proxy added its own after it.
        let f = facts_lines("10.0.0.1:1", &["192.0.2.66", "203.0.113.9"], &c);
        assert_eq!(f.client_ip(&c), Some("203.0.113.9".parse().unwrap()));
        // A chain of trusted proxies, each with a line of its own.
        let f = facts_lines("10.0.0.1:1", &["198.51.100.7, 10.0.0.3", "10.0.0.2"], &c);
        assert_eq!(f.client_ip(&c), Some("198.51.100.7".parse().unwrap()));
        // Many lines: the right end is kept, and it is what counts.
        let mut lines = vec!["192.0.2.66"; 40];
        lines.push("203.0.113.9");
        let f = facts_lines("10.0.0.1:1", &lines, &c);
        assert_eq!(f.client_ip(&c), Some("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        let c = config("10.0.0.0/8");
        let f = facts("[::ffff:192.0.2.5]:4000", None, &c);
        assert_eq!(f.client_ip(&c), Some("192.0.2.5".parse().unwrap()));
        let f = facts("[::ffff:10.0.0.1]:4000", Some("::ffff:198.51.100.7"), &c);
        assert_eq!(f.client_ip(&c), Some("198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted_hop() {
        let c = config("10.0.0.0/8");
        // The client forged "6.6.6.6" in front; the real chain is 1.2.3.4 → 10.0.0.2 → peer.
        let f = facts("10.0.0.1:1", Some("6.6.6.6, 1.2.3.4, 10.0.0.2"), &c);
        assert_eq!(f.client_ip(&c), Some("1.2.3.4".parse().unwrap()));
        let f = facts("10.0.0.1:1", Some("garbage, 10.0.0.2"), &c);
        assert_eq!(f.client_ip(&c), Some("10.0.0.2".parse().unwrap()));
        let f = facts("10.0.0.1:1", Some("[2001:db8::1]:443"), &c);
        assert_eq!(f.client_ip(&c), Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn small_values_are_copied_and_long_ones_kept_whole() {
        let c = Config::default();
        let long_path = format!("/{}?q=1", "a".repeat(400));
        let ua = "agent/".repeat(100);
        let req = Request::get(long_path.as_str())
            .header("host", "example.com:8443")
            .header("accept", "text/html")
            .header("user-agent", ua.as_str())
            .body(())
            .unwrap();
        let f = RequestFacts::capture(&req, &c);
        assert_eq!(f.path(), &long_path[..401]);
        assert_eq!(f.query(), Some("q=1"));
        assert_eq!(f.host(), Some("example.com"));
        assert_eq!(f.accept(), Some(&b"text/html"[..]));
        assert_eq!(f.user_agent(), Some(ua.as_bytes()));
        let req = Request::get("http://h2.example/x?y").body(()).unwrap();
        let f = RequestFacts::capture(&req, &c);
        assert_eq!(
            (f.path(), f.query(), f.host()),
            ("/x", Some("y"), Some("h2.example"))
        );
    }

    #[test]
    fn every_long_value_has_an_overflow_slot() {
        // Four standard values and two headers that policies test, all too
        // long to copy: the last ones spill past the overflow slots.
        let c = Config::from_yaml_str(
            "identity: { header: x-user }\npolicies:\n  - { id: t, match: { headers: { x-tenant: { present: true }, x-team: { present: true } } }, cause: permission }\n",
        )
        .unwrap();
        let long = |c: char| c.to_string().repeat(200);
        let (host, accept, ua, user) = (long('h'), long('a'), long('u'), long('w'));
        let (tenant, team) = (long('t'), long('m'));
        let req = Request::get("/")
            .header("host", host.as_str())
            .header("accept", accept.as_str())
            .header("user-agent", ua.as_str())
            .header("x-user", user.as_str())
            .header("x-tenant", tenant.as_str())
            .header("x-team", team.as_str())
            .body(())
            .unwrap();
        let f = RequestFacts::capture(&req, &c);
        assert_eq!(f.host(), Some(host.as_str()));
        assert_eq!(f.accept(), Some(accept.as_bytes()));
        assert_eq!(f.user_agent(), Some(ua.as_bytes()));
        assert_eq!(f.identity_header(), Some(user.as_bytes()));
        let captured: Vec<_> = (0..2).filter_map(|i| f.captured(i)).collect();
        assert!(captured.contains(&tenant.as_bytes()), "{captured:?}");
        assert!(captured.contains(&team.as_bytes()));
    }

    #[test]
    fn debug_output_shows_no_header_value() {
        let req = Request::get("/reports?page=2")
            .header("authorization", "Bearer secret-token-value")
            .header("cookie", "session=secret-cookie")
            .header("host", "example.com")
            .body(())
            .unwrap();
        let shown = format!("{:?}", RequestFacts::capture(&req, &Config::default()));
        assert!(shown.contains("/reports"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn host_comes_without_port() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
