//! Who is calling and what they may do.
//!
//! Identity comes from the peer certificate ([`identity`]) or a mesh
//! sidecar's forwarded header ([`mesh`]), through the transport gate
//! ([`Peer`]); grants come from the policy file ([`policy`]).
//! [`Authenticator::principal`] turns an identity into a [`Principal`], and
//! [`Principal::authorize`] turns a principal plus the request's tenant and
//! action into a [`Caller`], the only proof of authorization the broker
//! accepts from the API layer.
//!
//! Later sources of claims (a JWT in `authorization`, a mesh sidecar's
//! forwarded identity) narrow a principal's grants before `authorize` runs.

pub mod identity;
pub mod jwt;
pub mod mesh;
mod peer;
pub mod policy;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex, RwLock,
};

pub use self::identity::{Identity, IdentityError, IdentityRules};
pub use self::jwt::{JwtVerifier, TokenError};
pub use self::peer::{bearer, Forwarded, Peer, TlsPeer, SIDECAR_SECRET_HEADER};
pub use self::policy::{Action, Grants, Policy, PolicyError, Tenants};

/// Why a call is refused. Messages name identities and tenants (not secrets).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("client certificate carries no usable identity: {0}")]
    BadIdentity(#[from] IdentityError),
    #[error("`{identity}` may not act for tenant `{tenant}`")]
    TenantNotPermitted { identity: String, tenant: String },
    #[error("`{identity}` may not {action}")]
    ActionNotPermitted { identity: String, action: Action },
    #[error("a tenant is required: `{identity}` may act for several tenants")]
    TenantRequired { identity: String },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("`{identity}` must present a bearer token naming its tenant")]
    TokenRequired { identity: String },
    #[error("x-forwarded-client-cert is only trusted in mesh mode")]
    ForwardedIdentityRefused,
    #[error("`{identity}` is not vouched for by its trust domain's CA bundle")]
    UntrustedDomain { identity: String },
    #[error("{0}")]
    Mesh(#[from] mesh::MeshError),
}

/// An authenticated peer and what the policy grants it.
#[derive(Clone, Debug)]
pub struct Principal {
    pub identity: Identity,
    /// Shared with the connection's memo unless a bearer token narrowed it.
    pub grants: Arc<Grants>,
}

/// What one policy granted one identity, kept for the connection that
/// identity came in on, with the generation of the policy it came from: a
/// call reads one counter, not the policy lock, to know it still holds.
#[derive(Debug, Default)]
pub struct GrantsMemo(Mutex<Option<(u64, Arc<Grants>)>>);

impl GrantsMemo {
    fn get_or_resolve(
        &self,
        generation: u64,
        resolve: impl FnOnce() -> Arc<Grants>,
    ) -> Arc<Grants> {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match memo.as_ref() {
            Some((of, grants)) if *of == generation => Arc::clone(grants),
            _ => {
                let grants = resolve();
                *memo = Some((generation, Arc::clone(&grants)));
                grants
            }
        }
    }
}

/// An authorized caller, scoped to one tenant and one action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    pub tenant: String,
    pub action: Action,
}

impl Principal {
    /// Scopes this principal to `tenant` (empty: its only tenant) and
    /// `action`. Action is checked first so a caller learns nothing about
    /// tenants it could not use anyway.
    pub fn authorize(&self, tenant: &str, action: Action) -> Result<Caller, AuthError> {
        if !self.grants.actions.contains(&action) {
            return Err(AuthError::ActionNotPermitted {
                identity: self.identity.to_string(),
                action,
            });
        }
        let tenant = if tenant.is_empty() {
            self.grants
                .tenants
                .single()
                .ok_or_else(|| AuthError::TenantRequired {
                    identity: self.identity.to_string(),
                })?
        } else {
            tenant
        };
        if !self.grants.tenants.contains(tenant) {
            return Err(AuthError::TenantNotPermitted {
                identity: self.identity.to_string(),
                tenant: tenant.to_owned(),
            });
        }
        Ok(Caller {
            identity: self.identity.clone(),
            tenant: tenant.to_owned(),
            action,
        })
    }
}

impl Principal {
    /// Scopes this principal to an action that affects every tenant (key
    /// management): it needs the action and a grant for all tenants.
    pub fn authorize_global(&self, action: Action) -> Result<Caller, AuthError> {
        if !self.grants.actions.contains(&action) {
            return Err(AuthError::ActionNotPermitted {
                identity: self.identity.to_string(),
                action,
            });
        }
        if self.grants.tenants != Tenants::All {
            return Err(AuthError::TenantNotPermitted {
                identity: self.identity.to_string(),
                tenant: "*".to_owned(),
            });
        }
        Ok(Caller {
            identity: self.identity.clone(),
            tenant: "*".to_owned(),
            action,
        })
    }
}

/// Resolves principals from identities, the policy and bearer tokens. The
/// policy can be replaced while the server runs (a reload); each call reads
/// one whole policy, old or new.
pub struct Authenticator {
    rules: IdentityRules,
    policy: RwLock<Arc<Policy>>,
    /// Bumped after every policy replacement (see [`GrantsMemo`]).
    policy_generation: AtomicU64,
    /// Where the policy is re-read from on a reload.
    policy_file: Option<std::path::PathBuf>,
    jwt: Option<JwtVerifier>,
}

impl Authenticator {
    pub fn new(rules: IdentityRules, policy: Policy) -> Self {
        Self {
            rules,
            policy: RwLock::new(Arc::new(policy)),
            policy_generation: AtomicU64::new(0),
            policy_file: None,
            jwt: None,
        }
    }

    /// Reload the policy from `path` (on change, SIGHUP or the admin call).
    pub fn with_policy_file(mut self, path: std::path::PathBuf) -> Self {
        self.policy_file = Some(path);
        self
    }

    /// Also verify bearer tokens; their tenant claims narrow each call.
    pub fn with_jwt(mut self, verifier: JwtVerifier) -> Self {
        self.jwt = Some(verifier);
        self
    }

    pub fn identity_rules(&self) -> &IdentityRules {
        &self.rules
    }

    /// Swaps in a new policy; calls already past the gate keep the old one.
    pub fn replace_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        // After the swap: a memo made from the old policy under the new
        // generation cannot exist (a call reads the generation first).
        self.policy_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Reads the policy file again and swaps it in; an invalid file is
    /// refused and the running policy stays. Returns the number of rules.
    pub async fn reload_policy(&self) -> Result<usize, PolicyError> {
        let Some(path) = self.policy_file.clone() else {
            return Ok(self
                .policy
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .rule_count());
        };
        let policy = tokio::task::spawn_blocking(move || Policy::load(&path))
            .await
            .map_err(|_| PolicyError::Invalid {
                path: String::new(),
                message: "the reload task failed".into(),
            })??;
        let rules = policy.rule_count();
        self.replace_policy(policy);
        Ok(rules)
    }

    /// The identity of a connection, from its verified leaf certificate.
    pub fn identify(&self, leaf_der: Option<&[u8]>) -> Result<Identity, AuthError> {
        let leaf = leaf_der.ok_or(AuthError::NoCertificate)?;
        Ok(identity::identity_from_certificate(leaf, &self.rules)?)
    }

    /// The principal for an already identified peer, narrowed by the
    /// tenants of its bearer token when JWTs are configured: a call may act
    /// for a tenant only if the certificate's policy AND the token allow it.
    ///
    /// `memo` is the connection's memo of its grants, when the identity is
    /// the connection's own (mTLS).
    pub fn principal(
        &self,
        identity: Identity,
        bearer: Option<&str>,
        memo: Option<&GrantsMemo>,
    ) -> Result<Principal, AuthError> {
        let resolve = || {
            let policy = Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()));
            Arc::new(policy.grants_for(&identity))
        };
        let mut grants = match memo {
            Some(memo) => {
                let generation = self.policy_generation.load(Ordering::SeqCst);
                memo.get_or_resolve(generation, resolve)
            }
            None => resolve(),
        };
        match (&self.jwt, bearer) {
            (Some(verifier), Some(token)) => {
                let claimed = verifier.verify(token)?;
                let narrowed = grants.tenants.intersect(&claimed);
                Arc::make_mut(&mut grants).tenants = narrowed;
            }
            // Fails closed, also when the policy demands a token but no
            // verifier is configured.
            (_, None) | (None, _) if grants.require_jwt => {
                return Err(AuthError::TokenRequired {
                    identity: identity.to_string(),
                })
            }
            _ => {}
        }
        Ok(Principal { identity, grants })
    }
}
