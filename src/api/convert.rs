//! Proto -> domain: every request field is checked here, and every problem is
//! reported at once as a `google.rpc.BadRequest` field violation.
//!
//! Limits are generous for real providers (Google refresh tokens are ~100
//! bytes, Azure's ~1.5 KB) and tight enough that no field can balloon a record.

use std::{collections::BTreeMap, time::Duration};

use url::Url;

use super::{
    pb,
    status::{ApiError, FieldViolation},
};
use crate::{
    auth::{Action, Caller, Principal},
    broker::{
        consent::{BeginCommand, Redirect},
        model::{
            AccessToken, ClientAuth, ClientConfig, CredentialId, DepositCommand, Grant,
            TokenRequest,
        },
    },
    secret::SecretString,
    upstream::{check_scopes, parse_http_url, ClientSpec, RESERVED_PARAMS},
};

const MAX_TENANT: usize = 128;
const MAX_SUBJECT: usize = 512;
const MAX_PROVIDER: usize = 128;
const MAX_TOKEN: usize = 16 * 1024;
const MAX_CODE: usize = 4096;
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 256;

/// Collects violations so a caller learns every problem in one round trip.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidFields(self.0))
        }
    }
}

/// Validates a Deposit and scopes it to the caller.
pub fn deposit(
    request: pb::DepositRequest,
    principal: &Principal,
) -> Result<(Caller, DepositCommand), ApiError> {
    let mut v = Violations::default();
    let reference = request.credential.unwrap_or_default();
    check_reference(&reference, &mut v);
    let client = request.client.map(|c| client(c, &mut v));
    let grant = match request.grant {
        None => {
            v.add(
                "grant",
                "one of refresh_token, authorization_code or client_credentials is required",
            );
            None
        }
        Some(pb::deposit_request::Grant::RefreshToken(g)) => refresh_grant(g, &mut v),
        Some(pb::deposit_request::Grant::AuthorizationCode(g)) => code_grant(g, &mut v),
        Some(pb::deposit_request::Grant::ClientCredentials(_)) => Some(Grant::ClientCredentials),
    };
    let labels = labels(request.labels, &mut v);
    v.finish()?;
    let caller = principal.authorize(&reference.tenant, Action::Deposit)?;
    let id = credential_id(&caller, reference);
    let grant = grant.ok_or_else(|| ApiError::InvalidFields(vec![]))?;
    let client = client.flatten();
    Ok((
        caller,
        DepositCommand {
            id,
            client,
            grant,
            labels,
        },
    ))
}

/// Validates a GetAccessToken and scopes it to the caller.
pub fn get_access_token(
    request: pb::GetAccessTokenRequest,
    principal: &Principal,
    max_min_valid_for: Duration,
) -> Result<(Caller, TokenRequest), ApiError> {
    let mut v = Violations::default();
    let reference = request.credential.unwrap_or_default();
    check_reference(&reference, &mut v);
    let min_valid_for = match request.min_valid_for {
        None => None,
        Some(d) => match Duration::try_from(d) {
            Ok(d) if d <= max_min_valid_for => Some(d),
            Ok(_) => {
                v.add(
                    "min_valid_for",
                    format!("must be at most {}s", max_min_valid_for.as_secs()),
                );
                None
            }
            Err(_) => {
                v.add(
                    "min_valid_for",
                    "must be a non-negative, normalized duration",
                );
                None
            }
        },
    };
    v.finish()?;
    let caller = principal.authorize(&reference.tenant, Action::Get)?;
    let id = credential_id(&caller, reference);
    Ok((
        caller,
        TokenRequest {
            id,
            min_valid_for,
            force_refresh: request.force_refresh,
        },
    ))
}

/// Validates a Revoke and scopes it to the caller.
pub fn revoke(
    request: pb::RevokeRequest,
    principal: &Principal,
) -> Result<(Caller, CredentialId), ApiError> {
    let mut v = Violations::default();
    let reference = request.credential.unwrap_or_default();
    check_reference(&reference, &mut v);
    v.finish()?;
    let caller = principal.authorize(&reference.tenant, Action::Revoke)?;
    let id = credential_id(&caller, reference);
    Ok((caller, id))
}

/// A credential's reference on the wire.
pub fn credential_ref(id: CredentialId) -> pb::CredentialRef {
    pb::CredentialRef {
        tenant: id.tenant,
        subject: id.subject,
        provider: id.provider,
    }
}

fn credential_id(caller: &Caller, reference: pb::CredentialRef) -> CredentialId {
    // A named tenant is the one authorized (`authorize` scopes the caller
    // to exactly it), so the request's own string is moved instead of the
    // caller's copied: one allocation fewer on every call that names one.
    let tenant = if reference.tenant.is_empty() {
        caller.tenant.clone()
    } else {
        debug_assert_eq!(reference.tenant, caller.tenant);
        reference.tenant
    };
    CredentialId {
        tenant,
        subject: reference.subject,
        provider: reference.provider,
    }
}

fn check_reference(r: &pb::CredentialRef, v: &mut Violations) {
    // An empty tenant is resolved from the caller's claims later.
    if !r.tenant.is_empty() {
        check_name("credential.tenant", &r.tenant, MAX_TENANT, is_name_char, v);
    }
    if r.subject.is_empty() {
        v.add("credential.subject", "required");
    } else if r.subject.len() > MAX_SUBJECT {
        v.add("credential.subject", format!("at most {MAX_SUBJECT} bytes"));
    } else if r.subject.chars().any(char::is_control) {
        v.add("credential.subject", "must not contain control characters");
    }
    if r.provider.is_empty() {
        v.add("credential.provider", "required");
    } else {
        check_name(
            "credential.provider",
            &r.provider,
            MAX_PROVIDER,
            |c| is_name_char(c) || c == ':',
            v,
        );
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn check_name(field: &str, value: &str, max: usize, allowed: fn(char) -> bool, v: &mut Violations) {
    if value.len() > max {
        v.add(field, format!("at most {max} bytes"));
    } else if !value.chars().all(allowed) {
        v.add(field, "may contain only letters, digits, `.`, `_` and `-`");
    }
}

/// The OAuth client of a request, checked by the one set of client rules
/// (`upstream::ClientSpec`); its problems are reported under `client.`.
fn client(c: pb::OAuthClient, v: &mut Violations) -> Option<ClientConfig> {
    let auth = match pb::ClientAuthMethod::try_from(c.auth_method) {
        Ok(pb::ClientAuthMethod::Unspecified | pb::ClientAuthMethod::ClientSecretBasic) => {
            Some(ClientAuth::SecretBasic)
        }
        Ok(pb::ClientAuthMethod::ClientSecretPost) => Some(ClientAuth::SecretPost),
        Ok(pb::ClientAuthMethod::None) => Some(ClientAuth::None),
        Err(_) => {
            v.add(
                "client.auth_method",
                format!("unknown ClientAuthMethod value {}", c.auth_method),
            );
            None
        }
    };
    let spec = ClientSpec {
        token_endpoint: c.token_endpoint,
        revocation_endpoint: c.revocation_endpoint,
        client_id: c.client_id,
        client_secret: SecretString::from(c.client_secret),
        auth,
        scopes: c.scopes,
        authorization_endpoint: c.authorization_endpoint,
        device_authorization_endpoint: c.device_authorization_endpoint,
        issuer: c.issuer,
        redirect_uri: String::new(),
        assertion_key: None,
    };
    match spec.validate() {
        Ok(client) => Some(client),
        Err(problems) => {
            for problem in problems {
                v.add(format!("client.{}", problem.field), problem.description);
            }
            None
        }
    }
}

/// Parses an absolute http(s) URL; whether it may be called is the endpoint
/// policy's decision, made in the broker.
fn url_field(field: &str, raw: &str, required: bool, v: &mut Violations) -> Option<Url> {
    if raw.is_empty() {
        if required {
            v.add(field, "required");
        }
        return None;
    }
    parse_http_url(raw)
        .map_err(|description| v.add(field, description))
        .ok()
}

fn secret_field(
    field: &str,
    raw: String,
    max: usize,
    required: bool,
    v: &mut Violations,
) -> Option<SecretString> {
    let secret = SecretString::from(raw);
    if secret.is_empty() {
        if required {
            v.add(field, "required");
        }
        return None;
    }
    if secret.len() > max {
        v.add(field, format!("at most {max} bytes"));
        return None;
    }
    if secret.expose().chars().any(char::is_control) {
        v.add(field, "must not contain control characters");
        return None;
    }
    Some(secret)
}

fn refresh_grant(g: pb::RefreshTokenGrant, v: &mut Violations) -> Option<Grant> {
    let refresh_token = secret_field(
        "refresh_token.refresh_token",
        g.refresh_token,
        MAX_TOKEN,
        true,
        v,
    );
    let access = secret_field(
        "refresh_token.access_token",
        g.access_token,
        MAX_TOKEN,
        false,
        v,
    );
    let expires_at = match g.access_token_expires_at {
        None => None,
        Some(ts) => match std::time::SystemTime::try_from(ts) {
            Ok(t) => Some(t),
            Err(_) => {
                v.add(
                    "refresh_token.access_token_expires_at",
                    "must be a valid timestamp",
                );
                None
            }
        },
    };
    let access_token = match (access, expires_at) {
        (Some(token), Some(expires_at)) => Some(AccessToken {
            token,
            token_type: "Bearer".to_owned(),
            expires_at,
            scopes: Vec::new(),
        }),
        (Some(_), None) => {
            v.add(
                "refresh_token.access_token_expires_at",
                "required with access_token",
            );
            None
        }
        (None, Some(_)) => {
            v.add(
                "refresh_token.access_token",
                "required with access_token_expires_at",
            );
            None
        }
        (None, None) => None,
    };
    Some(Grant::RefreshToken {
        refresh_token: refresh_token?,
        access_token,
    })
}

fn code_grant(g: pb::AuthorizationCodeGrant, v: &mut Violations) -> Option<Grant> {
    let code = secret_field("authorization_code.code", g.code, MAX_CODE, true, v);
    let redirect_uri = url_field("authorization_code.redirect_uri", &g.redirect_uri, true, v);
    let verifier = SecretString::from(g.code_verifier);
    // RFC 7636 §4.1: 43 to 128 unreserved characters.
    let verifier_ok = verifier.is_empty()
        || ((43..=128).contains(&verifier.len())
            && verifier
                .expose()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')));
    if !verifier_ok {
        v.add(
            "authorization_code.code_verifier",
            "must be 43-128 unreserved characters (RFC 7636)",
        );
    }
    Some(Grant::AuthorizationCode {
        code: code?,
        redirect_uri: redirect_uri?,
        code_verifier: (!verifier.is_empty()).then_some(verifier),
        resources: Vec::new(),
    })
}

fn labels(
    raw: std::collections::HashMap<String, String>,
    v: &mut Violations,
) -> BTreeMap<String, String> {
    if raw.len() > MAX_LABELS {
        v.add("labels", format!("at most {MAX_LABELS} labels"));
    }
    let mut labels = BTreeMap::new();
    for (key, value) in raw {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY
            && key.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-' | b'/')
            });
        if !key_ok {
            v.add(
                "labels",
                format!("label keys are 1-{MAX_LABEL_KEY} of [a-z0-9._/-]"),
            );
        } else if value.len() > MAX_LABEL_VALUE || value.chars().any(char::is_control) {
            v.add(
                format!("labels[{key}]"),
                format!("at most {MAX_LABEL_VALUE} bytes, no control characters"),
            );
        }
        labels.insert(key, value);
    }
    labels
}

const MAX_STATE: usize = 128;
const MAX_RESOURCES: usize = 16;
const MAX_EXTRA_PARAMS: usize = 16;
const MAX_EXTRA_VALUE: usize = 1024;

/// Validates a BeginAuthorization and scopes it to the caller.
pub fn begin_authorization(
    request: pb::BeginAuthorizationRequest,
    principal: &Principal,
) -> Result<(Caller, BeginCommand), ApiError> {
    let (flow, redirect_uri) = flow(
        FlowFields {
            credential: request.credential,
            client: request.client,
            scopes: &request.scopes,
            resources: &request.resources,
            labels: request.labels,
        },
        principal,
        |v| {
            let redirect_uri = url_field("redirect_uri", &request.redirect_uri, false, v);
            extra_params(&request.extra_params, v);
            redirect_uri
        },
    )?;
    Ok((
        flow.caller,
        BeginCommand {
            id: flow.id,
            client: flow.client,
            redirect_uri,
            scopes: request.scopes,
            resources: request.resources,
            extra_params: request.extra_params.into_iter().collect(),
            labels: flow.labels,
        },
    ))
}

/// A validated BeginDeviceAuthorization.
pub struct DeviceCommand {
    pub id: CredentialId,
    pub client: Option<ClientConfig>,
    pub scopes: Vec<String>,
    pub resources: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// Validates a BeginDeviceAuthorization and scopes it to the caller.
pub fn begin_device_authorization(
    request: pb::BeginDeviceAuthorizationRequest,
    principal: &Principal,
) -> Result<(Caller, DeviceCommand), ApiError> {
    let (flow, ()) = flow(
        FlowFields {
            credential: request.credential,
            client: request.client,
            scopes: &request.scopes,
            resources: &request.resources,
            labels: request.labels,
        },
        principal,
        |_| (),
    )?;
    Ok((
        flow.caller,
        DeviceCommand {
            id: flow.id,
            client: flow.client,
            scopes: request.scopes,
            resources: request.resources,
            labels: flow.labels,
        },
    ))
}

/// The fields both consent flows begin with.
struct FlowFields<'a> {
    credential: Option<pb::CredentialRef>,
    client: Option<pb::OAuthClient>,
    scopes: &'a [String],
    resources: &'a [String],
    labels: std::collections::HashMap<String, String>,
}

/// A flow's common fields, validated and authorized.
struct Flow {
    caller: Caller,
    id: CredentialId,
    client: Option<ClientConfig>,
    labels: BTreeMap<String, String>,
}

/// Validates the fields every consent flow shares, and the flow's own ones
/// (`own`) into the same violations, then authorizes the caller.
fn flow<T>(
    fields: FlowFields<'_>,
    principal: &Principal,
    own: impl FnOnce(&mut Violations) -> T,
) -> Result<(Flow, T), ApiError> {
    let mut v = Violations::default();
    let reference = fields.credential.unwrap_or_default();
    check_reference(&reference, &mut v);
    let client = fields.client.map(|c| client(c, &mut v));
    let own = own(&mut v);
    flow_scopes(fields.scopes, &mut v);
    resources(fields.resources, &mut v);
    let labels = labels(fields.labels, &mut v);
    v.finish()?;
    let caller = principal.authorize(&reference.tenant, Action::Authorize)?;
    let id = credential_id(&caller, reference);
    Ok((
        Flow {
            caller,
            id,
            client: client.flatten(),
            labels,
        },
        own,
    ))
}

/// Validates a CompleteAuthorization: the state, and a code or an error.
pub fn complete_authorization(
    request: pb::CompleteAuthorizationRequest,
) -> Result<(SecretString, Redirect), ApiError> {
    let mut v = Violations::default();
    let state = state_field(request.state, &mut v);
    let redirect = if request.error.is_empty() {
        let code = secret_field("code", request.code, MAX_CODE, true, &mut v);
        if request.iss.len() > 2048 || request.iss.chars().any(char::is_control) {
            v.add("iss", "at most 2048 bytes, no control characters");
        }
        code.map(|code| Redirect::Code {
            code,
            iss: (!request.iss.is_empty()).then_some(request.iss),
        })
    } else {
        if request.error.len() > 128 || request.error.chars().any(char::is_control) {
            v.add("error", "at most 128 bytes, no control characters");
        }
        Some(Redirect::Error {
            error: request.error,
        })
    };
    v.finish()?;
    match (state, redirect) {
        (Some(state), Some(redirect)) => Ok((state, redirect)),
        _ => Err(ApiError::InvalidFields(vec![])),
    }
}

/// Validates a GetAuthorization.
pub fn get_authorization(request: pb::GetAuthorizationRequest) -> Result<SecretString, ApiError> {
    let mut v = Violations::default();
    let state = state_field(request.state, &mut v);
    v.finish()?;
    state.ok_or_else(|| ApiError::InvalidFields(vec![]))
}

fn state_field(raw: String, v: &mut Violations) -> Option<SecretString> {
    secret_field("state", raw, MAX_STATE, true, v)
}

fn flow_scopes(scopes: &[String], v: &mut Violations) {
    check_scopes(scopes, &mut |field, description| v.add(field, description));
}

/// RFC 8707 §2: absolute URIs without a fragment.
fn resources(resources: &[String], v: &mut Violations) {
    if resources.len() > MAX_RESOURCES {
        v.add("resources", format!("at most {MAX_RESOURCES} resources"));
    }
    for (i, resource) in resources.iter().enumerate() {
        let ok = resource.len() <= 2048
            && Url::parse(resource).is_ok_and(|url| url.fragment().is_none());
        if !ok {
            v.add(
                format!("resources[{i}]"),
                "must be an absolute URI without a fragment (RFC 8707)",
            );
        }
    }
}

/// A caller's extra authorization parameters: never one the vault sets.
fn extra_params(params: &std::collections::HashMap<String, String>, v: &mut Violations) {
    if params.len() > MAX_EXTRA_PARAMS {
        v.add(
            "extra_params",
            format!("at most {MAX_EXTRA_PARAMS} parameters"),
        );
    }
    for (name, value) in params {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !name_ok {
            v.add("extra_params", "names are 1-64 of [A-Za-z0-9_.-]");
        } else if RESERVED_PARAMS.contains(&name.to_ascii_lowercase().as_str()) {
            v.add(
                format!("extra_params[{name}]"),
                "set by the vault; it may not be overridden",
            );
        } else if value.len() > MAX_EXTRA_VALUE || value.chars().any(char::is_control) {
            v.add(
                format!("extra_params[{name}]"),
                format!("at most {MAX_EXTRA_VALUE} bytes, no control characters"),
            );
        }
    }
}
