//! Access control: bearer API keys for inference, a separate admin key for operator endpoints.
//!
//! Keys are held only as SHA-256 digests and compared in constant time: every configured key is
//! checked (no early exit on a match), each comparison reads all 32 bytes, and the digests' fixed
//! length hides how long a key is. Keys never reach a log line or a `Debug` output.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// A key as given on the command line or in the environment; `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("a key cannot be empty".into());
        }
        Ok(Self(s.to_string()))
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

type KeyDigest = [u8; 32];

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

fn same(a: &KeyDigest, b: &KeyDigest) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// What a route asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Open,
    /// An API key (or the admin key).
    Inference,
    /// The admin key.
    Admin,
}

/// Who passed the check, for the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// An open route (health, metrics) or the admin key: not rate-limited.
    Exempt,
    /// Inference on a server without API keys.
    Anonymous,
    /// Inference with the n-th API key.
    Key(usize),
}

/// Which keys exist and which routes are open.
pub struct AccessPolicy {
    api: Vec<KeyDigest>,
    admin: Option<KeyDigest>,
    open_health: bool,
    open_metrics: bool,
}

impl AccessPolicy {
    pub fn new(
        api_keys: &[Secret],
        admin_key: Option<&Secret>,
        open_health: bool,
        open_metrics: bool,
    ) -> Self {
        Self {
            api: api_keys.iter().map(|k| digest(k.expose())).collect(),
            admin: admin_key.map(|k| digest(k.expose())),
            open_health,
            open_metrics,
        }
    }

    /// A server with no key at all: every route is open.
    pub fn open() -> Self {
        Self::new(&[], None, true, true)
    }

    /// Reads one key per line; blank lines and `#` comments are skipped.
    pub fn read_key_file(path: &Path) -> Result<Vec<Secret>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("API key file {}: {e}", path.display()))?;
        let keys: Vec<Secret> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Secret(l.to_string()))
            .collect();
        if keys.is_empty() {
            return Err(format!("API key file {} holds no key", path.display()));
        }
        Ok(keys)
    }

    pub fn is_open(&self) -> bool {
        self.api.is_empty() && self.admin.is_none()
    }

    /// One line for the start-up log: what is protected, never the keys.
    pub fn describe(&self) -> String {
        if self.is_open() {
            return "no API key configured: every endpoint is open to anyone who can reach this \
                    address"
                .into();
        }
        format!(
            "access control on: {} API key(s){}; admin key {}; health {}, metrics {}",
            self.api.len(),
            if self.api.is_empty() {
                " (inference is open)"
            } else {
                ""
            },
            if self.admin.is_some() {
                "set"
            } else {
                "not set (operator endpoints refuse every key)"
            },
            if self.open_health { "open" } else { "keyed" },
            if self.open_metrics {
                "open"
            } else {
                "admin only"
            },
        )
    }

    fn scope(&self, path: &str) -> Scope {
        let health =
            matches!(path, "/health/live" | "/health/ready") || path.starts_with("/v2/health/");
        if health {
            return if self.open_health {
                Scope::Open
            } else {
                Scope::Inference
            };
        }
        if path == "/metrics" {
            return if self.open_metrics {
                Scope::Open
            } else {
                Scope::Admin
            };
        }
        if path.starts_with("/v2/repository") {
            return Scope::Admin;
        }
        Scope::Inference
    }

    /// Lets the request through or says why not (401 no or unknown key, 403 wrong scope).
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Result<Granted, ApiError> {
        let scope = self.scope(path);
        match scope {
            Scope::Open => return Ok(Granted::Exempt),
            // Inference is keyed once API keys exist; an admin key alone guards operator routes.
            Scope::Inference if self.api.is_empty() => return Ok(Granted::Anonymous),
            Scope::Admin if self.is_open() => return Ok(Granted::Exempt),
            Scope::Inference | Scope::Admin => {}
        }
        let Some(token) = bearer(headers) else {
            return Err(unauthorized(
                "missing_api_key",
                "this endpoint needs an API key: send `Authorization: Bearer <key>`",
            ));
        };
        let token = digest(token);
        let is_admin = self.admin.as_ref().is_some_and(|a| same(a, &token));
        // Every key is compared; the loop never stops at a match.
        let api_key =
            self.api.iter().enumerate().fold(
                None,
                |found, (i, k)| {
                    if same(k, &token) {
                        Some(i)
                    } else {
                        found
                    }
                },
            );
        match (scope, api_key) {
            _ if is_admin => Ok(Granted::Exempt),
            (Scope::Admin, Some(_)) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                "this key may call inference routes only; operator endpoints need the admin key",
            )),
            (Scope::Inference, Some(i)) => Ok(Granted::Key(i)),
            _ => Err(unauthorized("invalid_api_key", "the API key is not valid")),
        }
    }
}

fn unauthorized(code: &'static str, message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    fn keyed(open_metrics: bool) -> AccessPolicy {
        let keys = ["k1".parse().unwrap(), "k2".parse().unwrap()];
        AccessPolicy::new(&keys, Some(&"adm".parse().unwrap()), true, open_metrics)
    }

    fn code(r: Result<Granted, ApiError>) -> Option<(u16, &'static str)> {
        r.err().map(|e| (e.status.as_u16(), e.code))
    }

    #[test]
    fn inference_takes_any_api_key_or_the_admin_key() {
        let p = keyed(true);
        let path = "/v1/embeddings";
        assert_eq!(
            p.check(path, &headers("Bearer k2")).unwrap(),
            Granted::Key(1)
        );
        assert_eq!(code(p.check(path, &headers("Bearer k1"))), None);
        assert_eq!(code(p.check(path, &headers("bearer k2"))), None);
        assert_eq!(code(p.check(path, &headers("Bearer adm"))), None);
        assert_eq!(
            code(p.check(path, &HeaderMap::new())),
            Some((401, "missing_api_key"))
        );
        assert_eq!(
            code(p.check(path, &headers("Bearer k3"))),
            Some((401, "invalid_api_key"))
        );
        assert_eq!(
            code(p.check(path, &headers("Basic k1"))),
            Some((401, "missing_api_key"))
        );
        assert_eq!(code(p.check("/health/ready", &HeaderMap::new())), None);
        assert_eq!(code(p.check("/metrics", &HeaderMap::new())), None);
    }

    #[test]
    fn operator_routes_need_the_admin_key() {
        let p = keyed(false);
        assert_eq!(code(p.check("/metrics", &headers("Bearer adm"))), None);
        assert_eq!(
            code(p.check("/metrics", &headers("Bearer k1"))),
            Some((403, "insufficient_scope"))
        );
        assert_eq!(
            code(p.check("/v2/repository/index", &headers("Bearer nope"))),
            Some((401, "invalid_api_key"))
        );
    }

    #[test]
    fn no_keys_means_open_and_an_admin_key_alone_guards_only_operator_routes() {
        let open = AccessPolicy::open();
        assert_eq!(code(open.check("/v1/embeddings", &HeaderMap::new())), None);
        assert!(open.describe().contains("open"));
        let admin_only = AccessPolicy::new(&[], Some(&"adm".parse().unwrap()), true, false);
        assert_eq!(
            code(admin_only.check("/v1/embeddings", &HeaderMap::new())),
            None
        );
        assert_eq!(
            code(admin_only.check("/metrics", &HeaderMap::new())),
            Some((401, "missing_api_key"))
        );
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let s: Secret = "super-secret".parse().unwrap();
        assert!(!format!("{s:?}").contains("super"));
    }
}
