//! The OAuth client the vault acts as, and the one set of rules a client
//! must meet, whether it arrives in a Deposit or from a provider preset in
//! the server's config. Also the one place endpoint URLs are parsed
//! ([`parse_url`], which remembers recent ones; [`parse_http_url`] on input).

use std::cell::RefCell;

use url::Url;

use crate::secret::SecretString;

const MAX_URL: usize = 2048;
const MAX_CLIENT_ID: usize = 512;
const MAX_CLIENT_SECRET: usize = 4096;
const MAX_SCOPES: usize = 64;
const MAX_SCOPE: usize = 256;

/// How the vault authenticates to the token endpoint (RFC 6749 §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    SecretBasic,
    SecretPost,
    /// Public client: only `client_id` is sent.
    None,
    /// RFC 7523 §2.2: a JWT signed with the client's key (presets only).
    PrivateKeyJwt,
}

/// The OAuth client the vault uses on a credential's behalf.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub token_endpoint: Url,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub auth: ClientAuth,
    pub revocation_endpoint: Option<Url>,
    pub scopes: Vec<String>,
    /// Where consent happens: for the flows the vault runs (DESIGN §5f).
    pub flows: FlowEndpoints,
    /// The signing key of a `private_key_jwt` client.
    pub assertion_key: Option<std::sync::Arc<super::assertion::AssertionKey>>,
}

/// The endpoints of the consent flows; a client that only refreshes needs
/// none of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowEndpoints {
    /// RFC 6749 §4.1: where the user's browser goes.
    pub authorization: Option<Url>,
    /// RFC 8628 §3.1.
    pub device_authorization: Option<Url>,
    /// The authorization server's issuer identifier: the `iss` a redirect
    /// must carry when it carries one (RFC 9207).
    pub issuer: Option<Url>,
    /// The redirect URI registered for this client, used when a begin call
    /// names none (presets).
    pub redirect_uri: Option<Url>,
    /// The token endpoint was left empty for the issuer's metadata to name
    /// (`token_endpoint` holds the issuer until then).
    pub discover_token_endpoint: bool,
}

/// An OAuth client as given, before any check: the fields of the proto
/// message or of a `[providers.x]` section.
#[derive(Debug, Default)]
pub struct ClientSpec {
    pub token_endpoint: String,
    /// Empty: no RFC 7009 revocation.
    pub revocation_endpoint: String,
    pub client_id: String,
    /// Empty for public clients.
    pub client_secret: SecretString,
    /// `None` when the given method was not recognised (already reported).
    pub auth: Option<ClientAuth>,
    pub scopes: Vec<String>,
    /// Empty: not given.
    pub authorization_endpoint: String,
    pub device_authorization_endpoint: String,
    pub issuer: String,
    pub redirect_uri: String,
    /// Required with `private_key_jwt`.
    pub assertion_key: Option<std::sync::Arc<super::assertion::AssertionKey>>,
}

/// One field of a [`ClientSpec`] that breaks the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientProblem {
    /// The field's name, e.g. `token_endpoint` or `scopes[2]`.
    pub field: String,
    pub description: String,
}

impl ClientSpec {
    /// Checks every field and reports every problem at once. Whether an
    /// endpoint may be *called* is the endpoint policy's decision, made
    /// before each call; this only checks the shape.
    pub fn validate(self) -> Result<ClientConfig, Vec<ClientProblem>> {
        let mut problems = Vec::new();
        let mut problem = |field: String, description: String| {
            problems.push(ClientProblem { field, description });
        };
        // With an issuer, an empty token endpoint is discovered.
        let discover_token_endpoint = self.token_endpoint.is_empty() && !self.issuer.is_empty();
        let token_endpoint = if discover_token_endpoint {
            url("issuer", &self.issuer, true, &mut problem)
        } else {
            url("token_endpoint", &self.token_endpoint, true, &mut problem)
        };
        let revocation_endpoint = url(
            "revocation_endpoint",
            &self.revocation_endpoint,
            false,
            &mut problem,
        );
        let flows = FlowEndpoints {
            authorization: url(
                "authorization_endpoint",
                &self.authorization_endpoint,
                false,
                &mut problem,
            ),
            device_authorization: url(
                "device_authorization_endpoint",
                &self.device_authorization_endpoint,
                false,
                &mut problem,
            ),
            issuer: url("issuer", &self.issuer, false, &mut problem),
            redirect_uri: url("redirect_uri", &self.redirect_uri, false, &mut problem),
            discover_token_endpoint,
        };
        if self.client_id.is_empty() {
            problem("client_id".into(), "required".into());
        } else if self.client_id.len() > MAX_CLIENT_ID {
            problem("client_id".into(), format!("at most {MAX_CLIENT_ID} bytes"));
        } else if self.client_id.chars().any(char::is_control) {
            problem(
                "client_id".into(),
                "must not contain control characters".into(),
            );
        }
        check_secret(self.auth, &self.client_secret, &mut problem);
        if self.auth == Some(ClientAuth::PrivateKeyJwt) && self.assertion_key.is_none() {
            problem(
                "private_key_file".into(),
                "required for private_key_jwt".into(),
            );
        }
        check_scopes(&self.scopes, &mut problem);
        match (token_endpoint, self.auth) {
            (Some(token_endpoint), Some(auth)) if problems.is_empty() => Ok(ClientConfig {
                token_endpoint,
                client_id: self.client_id,
                client_secret: (!self.client_secret.is_empty()).then_some(self.client_secret),
                auth,
                revocation_endpoint,
                scopes: self.scopes,
                flows,
                assertion_key: self.assertion_key,
            }),
            _ => Err(problems),
        }
    }
}

/// Parses an absolute http(s) URL with a host: the shape of every endpoint
/// and redirect URI the vault accepts.
pub fn parse_http_url(raw: &str) -> Result<Url, String> {
    if raw.len() > MAX_URL {
        return Err(format!("at most {MAX_URL} bytes"));
    }
    match parse_url(raw) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(url),
        _ => Err("must be an absolute http(s) URL".into()),
    }
}

/// How many parsed URLs each thread remembers.
const PARSED_PER_THREAD: usize = 16;

thread_local! {
    /// The URLs this thread parsed last, oldest first.
    static PARSED: RefCell<Vec<(Box<str>, Url)>> = const { RefCell::new(Vec::new()) };
}

/// `Url::parse`, remembering the last few results on each thread.
///
/// Why: endpoints repeat. Deposits name one of a few OAuth clients, and a
/// refresh decodes the stored client's endpoints again each time. Parsing
/// (IDNA host mapping, then serializing the host back) was about a seventh
/// of a Deposit's own CPU (`perf`, 2026-12-03); a hit here is a short
/// string comparison and a clone. A parse is a pure function of the text,
/// so a remembered result is exactly what parsing again would give; the
/// bound keeps a stream of distinct URLs from growing it, and only accepted
/// URLs are kept.
pub fn parse_url(raw: &str) -> Result<Url, url::ParseError> {
    let known = PARSED.with_borrow(|parsed| {
        parsed
            .iter()
            .find(|(text, _)| **text == *raw)
            .map(|(_, url)| url.clone())
    });
    if let Some(url) = known {
        return Ok(url);
    }
    let url = Url::parse(raw)?;
    PARSED.with_borrow_mut(|parsed| {
        if parsed.len() == PARSED_PER_THREAD {
            parsed.remove(0);
        }
        parsed.push((raw.into(), url.clone()));
    });
    Ok(url)
}

fn url(
    field: &str,
    raw: &str,
    required: bool,
    problem: &mut impl FnMut(String, String),
) -> Option<Url> {
    if raw.is_empty() {
        if required {
            problem(field.into(), "required".into());
        }
        return None;
    }
    parse_http_url(raw)
        .map_err(|description| problem(field.into(), description))
        .ok()
}

fn check_secret(
    auth: Option<ClientAuth>,
    secret: &SecretString,
    problem: &mut impl FnMut(String, String),
) {
    let field = || "client_secret".to_owned();
    match auth {
        Some(ClientAuth::None | ClientAuth::PrivateKeyJwt) if !secret.is_empty() => problem(
            field(),
            "must be empty when the auth method is none or private_key_jwt".into(),
        ),
        Some(ClientAuth::SecretBasic | ClientAuth::SecretPost) if secret.is_empty() => problem(
            field(),
            "required for client_secret_basic and client_secret_post".into(),
        ),
        _ if secret.len() > MAX_CLIENT_SECRET => {
            problem(field(), format!("at most {MAX_CLIENT_SECRET} bytes"))
        }
        _ => {}
    }
}

/// RFC 6749 §3.3 scope tokens, at most [`MAX_SCOPES`] of them: the rule for a
/// client's scopes and for the scopes a consent flow asks for.
pub fn check_scopes(scopes: &[String], problem: &mut impl FnMut(String, String)) {
    if scopes.len() > MAX_SCOPES {
        problem("scopes".into(), format!("at most {MAX_SCOPES} scopes"));
    }
    for (i, scope) in scopes.iter().enumerate() {
        // RFC 6749 §3.3 scope-token: printable ASCII except space, `"` and `\`.
        let valid = !scope.is_empty()
            && scope.len() <= MAX_SCOPE
            && scope
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        if !valid {
            problem(
                format!("scopes[{i}]"),
                "must be an RFC 6749 scope token (printable ASCII, no spaces)".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_urls_are_what_parsing_gives_and_the_memory_is_bounded() {
        let distinct: Vec<String> = (0..3 * PARSED_PER_THREAD)
            .map(|i| format!("https://idp{i}.example:8443/token?x={i}"))
            .collect();
        // Twice over more distinct URLs than are remembered, so both the
        // remembered and the evicted paths answer, each as a parse would.
        for _ in 0..2 {
            for raw in &distinct {
                assert_eq!(parse_url(raw), Url::parse(raw));
            }
            assert_eq!(PARSED.with_borrow(Vec::len), PARSED_PER_THREAD);
        }
        // Host mapping, as the parser does it, and refusals, not remembered.
        for _ in 0..2 {
            assert_eq!(
                parse_url("https://IDP.Example/t").unwrap().host_str(),
                Some("idp.example")
            );
            assert_eq!(parse_url("http://[::1"), Url::parse("http://[::1"));
            assert!(parse_url("no scheme").is_err());
        }
        assert!(PARSED.with_borrow(|parsed| parsed.iter().all(|(raw, _)| !raw.contains("::1"))));
    }

    fn spec() -> ClientSpec {
        ClientSpec {
            token_endpoint: "https://idp.example/token".into(),
            client_id: "client".into(),
            client_secret: "s3cret".into(),
            auth: Some(ClientAuth::SecretBasic),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_client_validates() {
        let client = spec().validate().unwrap();
        assert_eq!(client.token_endpoint.host_str(), Some("idp.example"));
        assert!(client.revocation_endpoint.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = ClientSpec {
            token_endpoint: "ftp://idp".into(),
            client_id: String::new(),
            client_secret: SecretString::default(),
            auth: Some(ClientAuth::SecretPost),
            scopes: vec!["a b".into()],
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["token_endpoint", "client_id", "client_secret", "scopes[0]"]
        );
    }

    #[test]
    fn a_public_client_carries_no_secret() {
        let mut public = spec();
        public.auth = Some(ClientAuth::None);
        assert!(public.validate().is_err());
    }
}
