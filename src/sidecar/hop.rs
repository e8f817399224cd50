//! Header hygiene at the proxy boundary, both directions: hop-by-hop headers
//! and every header named in `Connection` are removed; the forwarding headers
//! (`X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded`) are set by us, and the
//! incoming ones are believed only from a trusted proxy; from anyone else,
//! every header that claims something about the client's connection
//! (`X-Forwarded-*`, `X-Real-IP`, `True-Client-IP`, ...) is removed.
//!
//! Forwarding headers are set *after* hop-by-hop removal, so a client that
//! sends `Connection: X-Forwarded-For` cannot strip them.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the non-standard ones that are still seen in the wild.
/// (`Trailer` is not among them: it declares end-to-end trailer fields.)
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// At most this many tokens of `Connection` are honoured.
const MAX_CONNECTION_TOKENS: usize = 32;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether `Connection` lists `token` (case-insensitively).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .take(MAX_CONNECTION_TOKENS)
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A request (or 101 response) that switches protocols: `Connection: upgrade`
/// with an `Upgrade` header.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// Removes hop-by-hop headers and those named in `Connection`. With
/// `keep_upgrade`, a real upgrade keeps `Connection: upgrade` and `Upgrade`.
/// `TE: trailers` is kept on requests (it is end-to-end in effect).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Which hop-by-hop headers are present: one pass over the names, and
    // most messages carry none (or only `Connection: keep-alive`).
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name.as_str()) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // Headers named in `Connection`, other than those removed anyway (the
    // usual `keep-alive`, `close`, `upgrade` need no parsing).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .take(MAX_CONNECTION_TOKENS)
        .map(str::trim)
        .filter(|t| {
            !t.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(t))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let wants_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in &named {
        headers.remove(name);
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(*name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// What the proxy knows about the hop it received a request on.
pub struct Hop {
    /// The peer that connected to us.
    pub peer: SocketAddr,
    /// Whether that peer is a trusted proxy.
    pub trusted: bool,
    /// The scheme the client used to reach us.
    pub proto: &'static str,
    /// The host the client asked for (the `Host` header or the authority).
    pub host: Option<HeaderValue>,
}

/// Sets the forwarding headers for the upstream. From an untrusted peer, the
/// incoming ones are discarded and replaced; from a trusted proxy, ours are
/// appended to its chain.
pub fn set_forwarding(headers: &mut HeaderMap, hop: &Hop) {
    let peer_ip = crate::config::canonical(hop.peer.ip());
    // Whether any forwarding header came in: one pass over the names.
    let incoming = headers.keys().any(is_client_claim);
    if incoming && !hop.trusted {
        // Rare (a client that forges them, or a proxy not listed as
        // trusted): the allocation is only paid then.
        let forged: Vec<HeaderName> = headers
            .keys()
            .filter(|name| is_client_claim(name))
            .cloned()
            .collect();
        for name in &forged {
            headers.remove(name);
        }
    }
    let believed = incoming && hop.trusted;
    let mut ip = Vec::with_capacity(48);
    push_ip(&mut ip, peer_ip);
    let mut element = Vec::with_capacity(64);
    forwarded_element(
        &mut element,
        &ip,
        peer_ip.is_ipv4(),
        hop.proto,
        hop.host.as_ref().map(HeaderValue::as_bytes),
    );
    let xff = match believed
        .then(|| joined(headers, &X_FORWARDED_FOR))
        .flatten()
    {
        Some(chain) => [chain.as_bytes(), b", ", &ip].concat(),
        None => ip,
    };
    if let Some(v) = owned_value(xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !(believed && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(hop.proto));
    }
    if !(believed && headers.contains_key(&X_FORWARDED_HOST))
        && let Some(host) = &hop.host
    {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    let forwarded = match believed
        .then(|| joined(headers, &header::FORWARDED))
        .flatten()
    {
        Some(chain) => [chain.as_bytes(), b", ", &element].concat(),
        None => element,
    };
    if let Some(v) = owned_value(forwarded) {
        headers.insert(header::FORWARDED, v);
    }
}

/// Headers by which a proxy in front of us tells the next hop about the
/// client: where it connected from, how, to which host, port or prefix.
/// From anyone but a trusted proxy they are claims the upstream must not
/// believe, so they are removed (as Traefik does); ours replace the four we
/// set. Besides `Forwarded` and every `X-Forwarded-*`: `X-Real-IP`
/// (nginx's), `True-Client-IP` (Akamai's, Cloudflare's), `X-Client-IP`,
/// `CF-Connecting-IP` and `Fastly-Client-IP`.
fn is_client_claim(name: &HeaderName) -> bool {
    is_client_claim_name(name.as_str().as_bytes())
}

/// [`is_client_claim`] for a header name as it came on the wire (any case).
pub(super) fn is_client_claim_name(name: &[u8]) -> bool {
    let is = |word: &str| name.eq_ignore_ascii_case(word.as_bytes());
    match name.first().map(u8::to_ascii_lowercase) {
        Some(b'x') => {
            name.get(..12)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"x-forwarded-"))
                || is("x-real-ip")
                || is("x-client-ip")
        }
        Some(b'f') => is("forwarded") || is("fastly-client-ip"),
        Some(b't') => is("true-client-ip"),
        Some(b'c') => is("cf-connecting-ip"),
        _ => false,
    }
}

/// Appends the `Forwarded` element of one hop (RFC 7239): the address
/// (`ip`, already in text; an IPv6 one bracketed and quoted), the scheme,
/// and the host when it can be quoted as it is.
pub(super) fn forwarded_element(
    out: &mut Vec<u8>,
    ip: &[u8],
    v4: bool,
    proto: &str,
    host: Option<&[u8]>,
) {
    out.extend_from_slice(b"for=");
    if v4 {
        out.extend_from_slice(ip);
    } else {
        out.extend_from_slice(b"\"[");
        out.extend_from_slice(ip);
        out.extend_from_slice(b"]\"");
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto.as_bytes());
    if let Some(host) = host
        && host
            .iter()
            .all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\')
    {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host);
        out.push(b'"');
    }
}

/// Appends an address in its usual text form (IPv4 without the formatting
/// machinery: this runs for every request).
pub(super) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            let _ = std::io::Write::write_fmt(out, format_args!("{v6}"));
        }
    }
}

/// A header value that takes over the buffer (no copy). Shrunk to its
/// length first: `Bytes` adopts an exactly sized buffer as it is, but
/// allocates a separate shared header for one with spare capacity.
fn owned_value(text: Vec<u8>) -> Option<HeaderValue> {
    let exact = text.into_boxed_slice();
    HeaderValue::from_maybe_shared(bytes::Bytes::from(exact)).ok()
}

/// All values of a header joined with ", ", if any (and readable).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn addresses_are_written_like_display() {
        for text in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "192.0.2.7",
            "2001:db8::1",
            "::1",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic abc"),
            ("upgrade", "websocket"),
            ("te", "gzip, trailers"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        strip_hop_by_hop(&mut h, false);
        for gone in [
            "connection",
            "keep-alive",
            "x-secret-hop",
            "transfer-encoding",
            "proxy-authorization",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    }

    #[test]
    fn keeps_a_real_upgrade() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    fn hop(peer: &str, trusted: bool) -> Hop {
        Hop {
            peer: peer.parse().unwrap(),
            trusted,
            proto: "http",
            host: Some(HeaderValue::from_static("app.example.com")),
        }
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        set_forwarding(&mut h, &hop("203.0.113.5:4000", false));
        assert_eq!(h["x-forwarded-for"], "203.0.113.5");
        assert_eq!(h["x-forwarded-host"], "app.example.com");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.5;proto=http;host=\"app.example.com\""
        );
    }

    #[test]
    fn untrusted_client_claims_are_removed_and_trusted_ones_kept() {
        let claims = [
            ("x-real-ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("x-client-ip", "6.6.6.6"),
            ("cf-connecting-ip", "6.6.6.6"),
            ("fastly-client-ip", "6.6.6.6"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("x-forwarded-proto", "https"),
        ];
        let mut pairs = claims.to_vec();
        pairs.extend([("x-request-id", "r1"), ("forwarded-for-me", "kept")]);
        let mut h = map(&pairs);
        set_forwarding(&mut h, &hop("203.0.113.5:4000", false));
        for (name, _) in &claims[..7] {
            assert!(
                !h.contains_key(*name),
                "{name} from an untrusted peer was kept"
            );
        }
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "r1");
        assert_eq!(h["forwarded-for-me"], "kept");

        let mut h = map(&pairs);
        set_forwarding(&mut h, &hop("10.0.0.2:4000", true));
        for (name, value) in &claims {
            assert_eq!(h[*name], *value, "{name} from a trusted proxy was not kept");
        }
    }

    #[test]
    fn trusted_chains_are_extended() {
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=198.51.100.1;proto=https"),
        ]);
        set_forwarding(&mut h, &hop("[::ffff:10.0.0.2]:4000", true));
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(
            h["forwarded"]
                .to_str()
                .unwrap()
                .starts_with("for=198.51.100.1;proto=https, for=10.0.0.2;")
        );
        let mut h = HeaderMap::new();
        set_forwarding(&mut h, &hop("[2001:db8::7]:1", false));
        assert!(
            h["forwarded"]
                .to_str()
                .unwrap()
                .starts_with("for=\"[2001:db8::7]\"")
        );
    }
}
