//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>): the
//! receiver recomputes HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`
//! with the shared secret and compares it with `webhook-signature`
//! (`v1,<base64>`).

use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::SecretString;

/// The signing key of one sink. Its `Debug` shows nothing.
pub struct SigningKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

impl SigningKey {
    /// From a secret file's text: `whsec_<base64>` as the spec writes it,
    /// or any other text as raw key bytes. An empty secret is refused.
    pub fn parse(text: &SecretString) -> Result<Self, &'static str> {
        let text = text.expose().trim();
        let bytes = match text.strip_prefix("whsec_") {
            Some(encoded) => STANDARD
                .decode(encoded)
                .map_err(|_| "the secret after `whsec_` is not base64")?,
            None => text.as_bytes().to_vec(),
        };
        if bytes.len() < 16 {
            return Err("the secret must be at least 16 bytes");
        }
        Ok(Self(Zeroizing::new(bytes)))
    }

    /// The `webhook-signature` header value for one delivery.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks reference example (from the spec's libraries).
    #[test]
    fn signs_like_the_reference_implementation() {
        let key = SigningKey::parse(&SecretString::from(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ))
        .unwrap();
        let signature = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn short_or_malformed_secrets_are_refused_and_never_printed() {
        assert!(SigningKey::parse(&SecretString::from("short")).is_err());
        assert!(SigningKey::parse(&SecretString::from("whsec_***")).is_err());
        let key = SigningKey::parse(&SecretString::from("a-long-enough-secret")).unwrap();
        assert!(!format!("{key:?}").contains("long-enough"));
    }
}
