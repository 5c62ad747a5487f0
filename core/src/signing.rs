//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! Receivers verify our requests with off-the-shelf libraries, so the bytes must match the
//! specification exactly: the HMAC key is the *decoded* secret, the signed content is
//! `"{id}.{timestamp}.{body}"`, and the signature is padded standard base64 behind `v1,`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of a secret in its Standard Webhooks text form.
pub const SECRET_PREFIX: &str = "whsec_";
/// Shortest key the specification recommends; shorter keys are refused.
pub const MIN_KEY_BYTES: usize = 24;
/// Longest key the specification recommends.
pub const MAX_KEY_BYTES: usize = 64;

/// Why a secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretError {
    MissingPrefix,
    NotBase64,
    WrongLength(usize),
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretError::MissingPrefix => {
                write!(f, "a secret must start with \"{SECRET_PREFIX}\" followed by base64")
            }
            SecretError::NotBase64 => write!(
                f,
                "the part after \"{SECRET_PREFIX}\" must be standard base64 (A-Z a-z 0-9 + /, padded with =)"
            ),
            SecretError::WrongLength(n) => write!(
                f,
                "the secret decodes to {n} bytes; use between {MIN_KEY_BYTES} and {MAX_KEY_BYTES} random bytes"
            ),
        }
    }
}

impl std::error::Error for SecretError {}

impl From<SecretError> for crate::validate::Refusal {
    fn from(e: SecretError) -> Self {
        crate::validate::Refusal::Invalid(e.to_string())
    }
}

/// A decoded signing key. Its `Debug` form never shows the key.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({} bytes)", self.0.len())
    }
}

impl SigningKey {
    /// Parses a `whsec_<base64>` secret.
    pub fn parse(secret: &str) -> Result<SigningKey, SecretError> {
        let encoded = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SecretError::WrongLength(key.len()));
        }
        Ok(SigningKey(key))
    }

    /// Wraps raw key bytes (e.g. freshly generated random bytes).
    pub fn from_bytes(key: Vec<u8>) -> Result<SigningKey, SecretError> {
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SecretError::WrongLength(key.len()));
        }
        Ok(SigningKey(key))
    }

    /// The `whsec_<base64>` text form.
    pub fn to_secret(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// One `v1,<base64>` signature entry over `"{msg_id}.{timestamp}.{body}"`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` header value: one entry per key, separated by single spaces (more
/// than one key during a secret rotation).
pub fn signature_header(keys: &[SigningKey], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specification_vectors() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let key = SigningKey::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            key.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn the_reference_library_accepts_our_signatures() {
        let secret = SigningKey::from_bytes(vec![7u8; 32]).unwrap().to_secret();
        let key = SigningKey::parse(&secret).unwrap();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let body =
            br#"{"type":"order.created","timestamp":"2026-11-22T10:00:00Z","data":{"id":1}}"#;
        let old = SigningKey::from_bytes(vec![9u8; 32]).unwrap();
        let header = signature_header(&[old, key], "msg_1", ts, body);
        assert_eq!(header.matches("v1,").count(), 2);

        let wh = standardwebhooks::Webhook::new(&secret).unwrap();
        let mut headers = http_headers(&[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", &ts.to_string()),
            ("webhook-signature", &header),
        ]);
        assert!(wh.verify(body, &headers).is_ok());
        headers.insert("webhook-id", "msg_2".parse().unwrap());
        assert!(wh.verify(body, &headers).is_err());
    }

    fn http_headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn refuses_malformed_secrets() {
        assert_eq!(
            SigningKey::parse("abc").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(
            SigningKey::parse("whsec_!!!").unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(
            SigningKey::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::WrongLength(5)
        );
        assert!(format!("{:?}", SigningKey::from_bytes(vec![1; 24]).unwrap()).contains("24 bytes"));
    }
}
