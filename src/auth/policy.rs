//! The policy file: which identity may do what, for which tenants.
//!
//! Least privilege by default: an identity that matches no rule can do
//! nothing. Rules are additive; a caller gets the union of every rule whose
//! pattern matches its identity.
//!
//! ```toml
//! [[rule]]
//! identity = "spiffe://credvault.dev/admin"     # exact
//! tenants = ["*"]
//! actions = ["deposit", "get", "revoke", "admin"]
//!
//! [[rule]]
//! identity = "spiffe://credvault.dev/acme/*"    # prefix
//! tenants = ["acme"]
//! actions = ["deposit", "get", "revoke"]
//! ```

use std::{collections::BTreeSet, fmt, path::Path};

use serde::Deserialize;

use super::identity::Identity;

/// What a caller may do to a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Deposit,
    Get,
    Revoke,
    /// The VaultAdmin service.
    Admin,
    /// WatchCredentialEvents.
    Watch,
    /// The four authorization RPCs (the consent flows).
    Authorize,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Get => "get",
            Self::Revoke => "revoke",
            Self::Admin => "admin",
            Self::Watch => "watch",
            Self::Authorize => "authorize",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tenants a caller may act for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Tenants {
    #[default]
    None,
    All,
    Some(BTreeSet<String>),
}

impl Tenants {
    pub fn contains(&self, tenant: &str) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Some(set) => set.contains(tenant),
        }
    }

    /// The tenant, when the claims name exactly one.
    pub fn single(&self) -> Option<&str> {
        match self {
            Self::Some(set) if set.len() == 1 => set.iter().next().map(String::as_str),
            _ => None,
        }
    }

    /// Tenants both sides allow.
    pub fn intersect(&self, other: &Tenants) -> Tenants {
        match (self, other) {
            (Self::None, _) | (_, Self::None) => Self::None,
            (Self::All, other) | (other, Self::All) => other.clone(),
            (Self::Some(a), Self::Some(b)) => {
                let both: BTreeSet<String> = a.intersection(b).cloned().collect();
                if both.is_empty() {
                    Self::None
                } else {
                    Self::Some(both)
                }
            }
        }
    }

    fn union(&mut self, other: &Tenants) {
        *self = match (std::mem::take(self), other) {
            (Self::All, _) | (_, Self::All) => Self::All,
            (Self::None, other) => other.clone(),
            (mine, Self::None) => mine,
            (Self::Some(mut mine), Self::Some(theirs)) => {
                mine.extend(theirs.iter().cloned());
                Self::Some(mine)
            }
        };
    }
}

/// What the policy grants one identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    pub tenants: Tenants,
    pub actions: BTreeSet<Action>,
    /// Some matching rule demands a verified JWT on every call.
    pub require_jwt: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    identity: String,
    tenants: Vec<String>,
    actions: Vec<Action>,
    /// Calls must also carry a JWT naming the tenant (see `auth.jwt`).
    #[serde(default)]
    require_jwt: bool,
}

#[derive(Clone, Debug)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Debug)]
struct Rule {
    pattern: Pattern,
    grants: Grants,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid policy file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// A loaded policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PolicyError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses policy TOML; the error is a one-line description.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for (index, rule) in file.rules.into_iter().enumerate() {
            let pattern = match rule.identity.strip_suffix('*') {
                Some(prefix) if prefix.contains('*') => {
                    return Err(format!(
                        "rule {index}: `*` is only allowed at the end of an identity"
                    ))
                }
                Some("") => {
                    return Err(format!(
                        "rule {index}: an identity pattern of just `*` would grant everyone"
                    ))
                }
                Some(prefix) => Pattern::Prefix(prefix.to_owned()),
                None if rule.identity.contains('*') => {
                    return Err(format!(
                        "rule {index}: `*` is only allowed at the end of an identity"
                    ))
                }
                None if rule.identity.is_empty() => {
                    return Err(format!("rule {index}: empty identity"))
                }
                None => Pattern::Exact(rule.identity),
            };
            let tenants = if rule.tenants.iter().any(|t| t == "*") {
                Tenants::All
            } else if rule.tenants.is_empty() {
                return Err(format!("rule {index}: no tenants"));
            } else {
                Tenants::Some(rule.tenants.into_iter().collect())
            };
            rules.push(Rule {
                pattern,
                grants: Grants {
                    tenants,
                    actions: rule.actions.into_iter().collect(),
                    require_jwt: rule.require_jwt,
                },
            });
        }
        Ok(Self { rules })
    }

    /// How many rules the policy has.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The union of all grants whose pattern matches `identity`.
    pub fn grants_for(&self, identity: &Identity) -> Grants {
        let name = identity.to_string();
        let mut grants = Grants::default();
        for rule in &self.rules {
            let matches = match &rule.pattern {
                Pattern::Exact(exact) => *exact == name,
                Pattern::Prefix(prefix) => prefix_matches(prefix, &name),
            };
            if matches {
                grants.tenants.union(&rule.grants.tenants);
                grants.actions.extend(rule.grants.actions.iter().copied());
                grants.require_jwt |= rule.grants.require_jwt;
            }
        }
        grants
    }
}

/// A prefix matches at a path-segment boundary only: `spiffe://td/ns/*`
/// matches `spiffe://td/ns/a`, and `spiffe://td*` matches `spiffe://td` and
/// `spiffe://td/…` but never `spiffe://td-evil/…`.
fn prefix_matches(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| {
        prefix.ends_with(['/', ':']) || rest.is_empty() || rest.starts_with('/')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::SpiffeId;

    fn spiffe(s: &str) -> Identity {
        Identity::Spiffe(SpiffeId::parse(s).unwrap())
    }

    const POLICY: &str = r#"
        [[rule]]
        identity = "spiffe://credvault.dev/admin"
        tenants = ["*"]
        actions = ["deposit", "get", "revoke", "admin"]

        [[rule]]
        identity = "spiffe://credvault.dev/acme/*"
        tenants = ["acme"]
        actions = ["get"]

        [[rule]]
        identity = "spiffe://credvault.dev/acme/writer"
        tenants = ["acme-staging"]
        actions = ["deposit"]
    "#;

    #[test]
    fn unknown_identities_get_nothing() {
        let policy = Policy::parse(POLICY).unwrap();
        let grants = policy.grants_for(&spiffe("spiffe://credvault.dev/other"));
        assert_eq!(grants, Grants::default());
        assert!(!grants.tenants.contains("acme"));
    }

    #[test]
    fn rules_are_unioned() {
        let policy = Policy::parse(POLICY).unwrap();
        let grants = policy.grants_for(&spiffe("spiffe://credvault.dev/acme/writer"));
        assert!(grants.tenants.contains("acme") && grants.tenants.contains("acme-staging"));
        assert_eq!(grants.actions, [Action::Deposit, Action::Get].into());
        assert!(!grants.require_jwt);
        assert_eq!(grants.tenants.single(), None);
        let admin = policy.grants_for(&spiffe("spiffe://credvault.dev/admin"));
        assert!(admin.tenants.contains("anything"));
    }

    #[test]
    fn prefix_does_not_match_sibling_names() {
        let policy = Policy::parse(POLICY).unwrap();
        // "acme/*" must not match "acmecorp/…".
        let grants = policy.grants_for(&spiffe("spiffe://credvault.dev/acmecorp/x"));
        assert_eq!(grants, Grants::default());
    }

    #[test]
    fn prefixes_match_at_segment_boundaries_only() {
        let policy = Policy::parse(
            r#"[[rule]]
               identity = "spiffe://td*"
               tenants = ["t"]
               actions = ["get"]"#,
        )
        .unwrap();
        for (name, granted) in [
            ("spiffe://td/app", true),
            ("spiffe://td/ns/a/b", true),
            ("spiffe://td-evil/app", false),
            ("spiffe://tdx/app", false),
        ] {
            let grants = policy.grants_for(&spiffe(name));
            assert_eq!(grants.tenants.contains("t"), granted, "{name}");
        }
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        for bad in [
            r#"[[rule]]
               identity = "*"
               tenants = ["*"]
               actions = ["get"]"#,
            r#"[[rule]]
               identity = "spiffe://a/*/b"
               tenants = ["x"]
               actions = ["get"]"#,
            r#"[[rule]]
               identity = "spiffe://a/b"
               tenants = ["x"]
               actions = ["fly"]"#,
            r#"[[rule]]
               identity = "spiffe://a/b"
               tenants = []
               actions = ["get"]"#,
            "[[rules]]\nx = 1",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }
}
