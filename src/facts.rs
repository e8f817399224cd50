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

/// The address of the peer that sent the request.
///
/// Insert it as a request extension so the layer knows the client address
/// (the sidecar does this for every connection). With the `axum` feature the
/// layer also reads axum's `ConnectInfo<SocketAddr>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// What is kept of a request until its response is known.
#[derive(Debug)]
pub struct RequestFacts {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) host: Option<HeaderValue>,
    pub(crate) accept: Option<HeaderValue>,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) identity_header: Option<HeaderValue>,
    pub(crate) forwarded_for: Option<HeaderValue>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) has_cookie: bool,
    pub(crate) has_api_key: bool,
    /// False when the request is not known (explaining a bare response).
    pub(crate) credentials_known: bool,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) captured: [Option<HeaderValue>; MAX_CAPTURED_HEADERS],
}

impl RequestFacts {
    /// Captures what `config` needs from `req`.
    pub fn capture<B>(req: &Request<B>, config: &Config) -> Self {
        let headers = req.headers();
        let mut captured = [const { None }; MAX_CAPTURED_HEADERS];
        if !config.captured_headers().is_empty() {
            for (slot, name) in captured.iter_mut().zip(config.captured_headers()) {
                *slot = headers.get(name).cloned();
            }
        }
        let mut host = None;
        let mut accept = None;
        let mut authorization = None;
        let mut identity_header = None;
        let mut forwarded_for = None;
        let mut user_agent = None;
        let mut has_cookie = false;
        let mut has_api_key = false;
        let identity_name = config.identity_header();
        let want_xff = config.has_trusted_proxies();
        for (name, value) in headers {
            if name == HOST {
                host.get_or_insert_with(|| value.clone());
            } else if name == ACCEPT {
                accept.get_or_insert_with(|| value.clone());
            } else if name == AUTHORIZATION {
                authorization.get_or_insert_with(|| value.clone());
            } else if name == USER_AGENT {
                user_agent.get_or_insert_with(|| value.clone());
            } else if name == COOKIE {
                has_cookie = true;
            } else if identity_name == Some(name) {
                identity_header.get_or_insert_with(|| value.clone());
            } else if want_xff && name.as_str() == "x-forwarded-for" {
                forwarded_for.get_or_insert_with(|| value.clone());
            } else if config.api_key_headers().contains(name) {
                has_api_key = true;
            }
        }
        let peer = req
            .extensions()
            .get::<ClientAddr>()
            .map(|a| a.0)
            .or_else(|| axum_peer(req));
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host,
            accept,
            authorization,
            identity_header,
            forwarded_for,
            user_agent,
            has_cookie,
            has_api_key,
            credentials_known: true,
            peer,
            captured,
        }
    }

    /// The request method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request path, without the query.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The requested host without its port, from `Host` or the URI authority.
    pub fn host(&self) -> Option<&str> {
        let raw = match &self.host {
            Some(v) => v.to_str().ok()?,
            None => self.uri.authority()?.as_str(),
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
        let peer = self.peer?.ip();
        if !config.is_trusted_proxy(peer) {
            return Some(peer);
        }
        let Some(header) = self.forwarded_for.as_ref().and_then(|v| v.to_str().ok()) else {
            return Some(peer);
        };
        let mut client = peer;
        for hop in header.rsplit(',').take(MAX_FORWARDED_HOPS) {
            let Some(ip) = parse_forwarded_ip(hop.trim()) else {
                // A hop we cannot read: stop believing the chain here.
                break;
            };
            client = ip;
            if !config.is_trusted_proxy(ip) {
                break;
            }
        }
        Some(client)
    }

    pub(crate) fn captured(&self, index: usize) -> Option<&HeaderValue> {
        self.captured.get(index).and_then(Option::as_ref)
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
        let mut req = Request::builder().uri("/x");
        if let Some(xff) = xff {
            req = req.header("x-forwarded-for", xff);
        }
        let mut req = req.body(()).unwrap();
        req.extensions_mut()
            .insert(ClientAddr(peer.parse().unwrap()));
        RequestFacts::capture(&req, config)
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let c = config("10.0.0.0/8");
        let f = facts("203.0.113.9:5000", Some("1.2.3.4"), &c);
        assert_eq!(f.client_ip(&c), Some("203.0.113.9".parse().unwrap()));
        let f = facts("10.1.1.1:5000", Some("1.2.3.4"), &c);
        assert_eq!(f.client_ip(&c), Some("1.2.3.4".parse().unwrap()));
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
    fn host_comes_without_port() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
