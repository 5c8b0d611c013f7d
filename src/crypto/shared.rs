//! The keyring the running server uses, replaceable without a restart.
//!
//! Readers take a cheap `Arc` snapshot per operation, so a record is always
//! sealed or opened under one consistent keyring, never half of an old one and
//! half of a new one.

use std::sync::{Arc, RwLock};

use super::Keyring;

/// A shared, atomically replaceable keyring.
#[derive(Clone)]
pub struct SharedKeyring(Arc<RwLock<Arc<Keyring>>>);

impl SharedKeyring {
    pub fn new(keyring: Keyring) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(keyring))))
    }

    /// A snapshot for one operation.
    pub fn current(&self) -> Arc<Keyring> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, keyring: Keyring) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keyring);
    }
}
