//! Reading a bearer token without trusting it.
//!
//! whydenied never verifies tokens (it does not decide access): it only looks
//! at the claims of a JWT-shaped bearer token to name the caller and, later,
//! to say that a token has expired or lacks a scope. Whatever is read here is
//! marked as unverified, and the token itself is never kept, logged or shown.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use serde_json::{Map, Value};

/// The longest token that is looked at.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The bearer token of an `Authorization` header, if it has that scheme.
pub fn bearer(authorization: &HeaderValue) -> Option<&str> {
    let value = authorization.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The claims of a JWT-shaped token, decoded without verifying the signature.
pub fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// A claim as text: strings as they are, numbers and booleans printed.
pub fn claim_text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) fn make_jwt(claims: &str) -> String {
    format!(
        "eyJhbGciOiJub25lIn0.{}.sig",
        URL_SAFE_NO_PAD.encode(claims.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_claims_of_a_bearer_jwt() {
        let jwt = make_jwt(r#"{"sub":"alice","exp":1700000000}"#);
        let header = HeaderValue::from_str(&format!("Bearer {jwt}")).unwrap();
        let claims = unverified_claims(bearer(&header).unwrap()).unwrap();
        assert_eq!(claim_text(&claims, "sub").as_deref(), Some("alice"));
        assert_eq!(claim_text(&claims, "exp").as_deref(), Some("1700000000"));
    }

    #[test]
    fn ignores_what_is_not_a_bearer_jwt() {
        assert_eq!(
            bearer(&HeaderValue::from_static("Basic dXNlcjpwYXNz")),
            None
        );
        assert_eq!(unverified_claims("opaque-token"), None);
        assert_eq!(unverified_claims("a.!!!.c"), None);
        assert_eq!(unverified_claims(&make_jwt("[1,2]")), None);
        assert_eq!(unverified_claims(&"a.".repeat(5000)), None);
    }
}
