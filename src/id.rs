//! Denial ids: 128 random bits, URL-safe base64 without padding (22 chars).
//!
//! The id is what a caller quotes and what an admin looks up, so it must be
//! unguessable (nobody can enumerate other callers' denials) and safe to put
//! in a header, a URL path and a log line as it is.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The id of one explained denial.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DenialId {
    bytes: [u8; 16],
    text: [u8; 22],
}

/// The operating system could not supply random bytes.
#[derive(Debug, thiserror::Error)]
#[error("no randomness available for a denial id: {0}")]
pub struct IdError(getrandom::Error);

impl DenialId {
    /// A fresh random id.
    pub fn random() -> Result<Self, IdError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(IdError)?;
        Ok(Self::from_bytes(bytes))
    }

    /// The id made of these bytes (for tests and lookups).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let mut text = [0u8; 22];
        // 16 bytes always encode to exactly 22 characters without padding.
        let written = URL_SAFE_NO_PAD
            .encode_slice(bytes, &mut text)
            .unwrap_or_default();
        debug_assert_eq!(written, 22);
        Self { bytes, text }
    }

    /// Parses the text form; `None` unless it is exactly an id.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 22 {
            return None;
        }
        let mut bytes = [0u8; 16];
        let n = URL_SAFE_NO_PAD.decode_slice(text, &mut bytes).ok()?;
        (n == 16)
            .then(|| Self::from_bytes(bytes))
            .filter(|id| id.as_str() == text)
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        // The alphabet is ASCII, so this never fails.
        std::str::from_utf8(&self.text).unwrap_or_default()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.bytes
    }
}

impl fmt::Display for DenialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DenialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DenialId({})", self.as_str())
    }
}

impl serde::Serialize for DenialId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_22_url_safe_chars_and_differ() {
        let a = DenialId::random().unwrap();
        let b = DenialId::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 22);
        assert!(
            a.as_str()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert!(http::HeaderValue::from_str(a.as_str()).is_ok());
    }

    #[test]
    fn parse_accepts_only_exact_ids() {
        let a = DenialId::random().unwrap();
        assert_eq!(DenialId::parse(a.as_str()), Some(a));
        assert_eq!(DenialId::parse("short"), None);
        assert_eq!(DenialId::parse("../../../../etc/passwd!"), None);
        assert_eq!(DenialId::parse("AAAAAAAAAAAAAAAAAAAAA="), None);
    }
}
