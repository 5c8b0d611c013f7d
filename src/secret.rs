//! Secret values: tokens, client secrets, authorization codes, passphrases.
//!
//! A [`SecretString`] can be moved around and stored, but it never prints:
//! `Debug` and `Display` both render `[redacted]`, and the heap buffer is
//! zeroized when the value is dropped. Reading the value requires an explicit
//! [`SecretString::expose`], which makes every place that handles plaintext
//! secrets greppable.

use std::fmt;

use zeroize::Zeroize;

/// The text every secret renders as.
pub const REDACTED: &str = "[redacted]";

/// A string that must never reach a log line, an error message or a panic.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The plaintext. Call sites are the audit trail of where secrets flow.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The plaintext, moved out: for where it leaves the vault in a message
    /// that must own it, so it is not copied once more on the way.
    pub fn into_exposed(mut self) -> String {
        std::mem::take(&mut self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Any scalar becomes the secret's text: an environment variable such as
/// `CREDVAULT_KEYRING__PASSPHRASE=314159…` reaches serde as a number, and a
/// type error would quote it back in the start-up error.
impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl serde::de::Visitor<'_> for Scalar {
            type Value = SecretString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret (text)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(SecretString::from(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(SecretString(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Self::Value, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Self::Value, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(SecretString(v.to_string()))
            }
        }
        deserializer.deserialize_any(Scalar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let secret = SecretString::new("rt-very-secret");
        assert_eq!(format!("{secret}"), REDACTED);
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(
            format!("{:#?}", Some(&secret)),
            format!("Some(\n    {REDACTED},\n)")
        );
        assert_eq!(secret.expose(), "rt-very-secret");
    }

    #[test]
    fn moves_its_value_out_whole() {
        let secret = SecretString::new("at-moved-out");
        assert_eq!(secret.into_exposed(), "at-moved-out");
    }
}
