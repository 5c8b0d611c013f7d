//! Shared test support: a real OAuth provider double and a real vault
//! (mTLS, sled, keyring) on 127.0.0.1:0.
#![allow(dead_code)]

pub mod dev;
pub mod etcd;
pub mod provider;
pub mod timer;
pub mod vault;
pub mod webhook;
