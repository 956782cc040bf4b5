//! The replicated identity state (DESIGN §5): the mesh CA's roots (certificate and key; the key
//! lives only here, on control nodes), join tokens (stored as SHA-256 hashes, with their
//! node, expiry, uses and revocation) and the API's access keys. Everything random (keys,
//! token secrets, ids) is made by the proposing node and carried in the command; applying is
//! deterministic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::ApiError;
use super::proxy_config::ProxyRole;

/// One mesh root: certificate and private key (PEM).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct CaRoot {
    pub cert_pem: String,
    pub key_pem: String,
    /// Epoch seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for CaRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRoot")
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A join token: trades once (or `uses` times) for a proxy certificate of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Public id (for list and revoke); the secret is never stored, only its hash.
    pub id: String,
    /// Hex SHA-256 of the secret part.
    pub hash: String,
    pub mesh: String,
    pub role: ProxyRole,
    pub created_at: f64,
    pub expires_at: f64,
    /// Redemptions left; `None`: unlimited until expiry.
    pub uses_left: Option<u32>,
    pub revoked: bool,
}

/// An API access key (SigV4): the secret must be known to verify signatures, as in AWS.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessKey {
    pub id: String,
    pub secret: String,
    /// May only Describe / List.
    pub read_only: bool,
    pub created_at: f64,
    pub description: String,
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKey")
            .field("id", &self.id)
            .field("read_only", &self.read_only)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecurityCommand {
    /// Creates the first root; a no-op when there already is one (the first proposal wins).
    CaInit {
        trust_domain: String,
        root: CaRoot,
    },
    /// Adds a new root (signing from now on) with its certificate cross-signed by the current
    /// one; older roots stay in the bundle until they expire.
    CaRotate {
        root: CaRoot,
        cross_cert_pem: String,
        now: f64,
    },
    TokenCreate(JoinToken),
    TokenRevoke {
        id: String,
    },
    /// Spends one use of the token whose secret hashes to `hash`, for the node it names.
    TokenRedeem {
        hash: String,
        mesh: String,
        role: ProxyRole,
        now: f64,
    },
    KeyCreate(AccessKey),
    KeyDelete {
        id: String,
    },
}

impl SecurityCommand {
    pub fn operation(&self) -> &'static str {
        match self {
            Self::CaInit { .. } => "CaInit",
            Self::CaRotate { .. } => "CaRotate",
            Self::TokenCreate(_) => "TokenCreate",
            Self::TokenRevoke { .. } => "TokenRevoke",
            Self::TokenRedeem { .. } => "TokenRedeem",
            Self::KeyCreate(_) => "KeyCreate",
            Self::KeyDelete { .. } => "KeyDelete",
        }
    }
}

/// The identity half of the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Security {
    pub trust_domain: String,
    /// Oldest first; the last one signs.
    roots: Vec<CaRoot>,
    /// Cross-signed certificates of the newer roots by their predecessors.
    cross_certs: Vec<String>,
    tokens: BTreeMap<String, JoinToken>,
    keys: BTreeMap<String, AccessKey>,
}

impl Security {
    /// The root that signs now.
    pub fn signing_root(&self) -> Option<&CaRoot> {
        self.roots.last()
    }

    /// Every root still valid (the trust bundle), oldest first.
    pub fn roots(&self) -> &[CaRoot] {
        &self.roots
    }

    /// The trust bundle as one PEM: every root, then the cross-signed certificates.
    pub fn bundle_pem(&self) -> String {
        let mut pem = String::new();
        for r in &self.roots {
            pem.push_str(&r.cert_pem);
        }
        for c in &self.cross_certs {
            pem.push_str(c);
        }
        pem
    }

    pub fn cross_certs(&self) -> &[String] {
        &self.cross_certs
    }

    pub fn tokens(&self) -> impl Iterator<Item = &JoinToken> {
        self.tokens.values()
    }

    pub fn key(&self, id: &str) -> Option<&AccessKey> {
        self.keys.get(id)
    }

    pub fn keys(&self) -> impl Iterator<Item = &AccessKey> {
        self.keys.values()
    }

    /// Applies one command. `node_exists` says whether a node or gateway is in the mesh state,
    /// for tokens (a token for nothing, or for a deleted node, is refused).
    pub fn apply(
        &mut self,
        cmd: &SecurityCommand,
        node_exists: impl Fn(&str, &ProxyRole) -> bool,
    ) -> Result<Value, ApiError> {
        match cmd {
            SecurityCommand::CaInit { trust_domain, root } => {
                if self.roots.is_empty() {
                    self.trust_domain = trust_domain.clone();
                    self.roots.push(root.clone());
                    Ok(json!({"created": true}))
                } else {
                    Ok(json!({"created": false}))
                }
            }
            SecurityCommand::CaRotate {
                root,
                cross_cert_pem,
                now,
            } => {
                if self.roots.is_empty() {
                    return Err(ApiError::bad_request("there is no CA to rotate yet"));
                }
                // Roots past their end can no longer verify anything: drop them with their
                // cross certificates.
                let alive = |r: &CaRoot| r.not_after as f64 > *now;
                let dropped = self.roots.iter().take_while(|r| !alive(r)).count();
                self.roots.drain(..dropped.min(self.roots.len() - 1));
                self.cross_certs
                    .drain(..dropped.min(self.cross_certs.len()));
                self.roots.push(root.clone());
                self.cross_certs.push(cross_cert_pem.clone());
                Ok(json!({"roots": self.roots.len()}))
            }
            SecurityCommand::TokenCreate(t) => {
                if !node_exists(&t.mesh, &t.role) {
                    return Err(ApiError::not_found(format!(
                        "{} in mesh {} does not exist",
                        t.role.resource_name(),
                        t.mesh
                    )));
                }
                if self.tokens.contains_key(&t.id) {
                    return Err(ApiError::conflict(format!("token {} exists", t.id)));
                }
                self.tokens.insert(t.id.clone(), t.clone());
                Ok(json!({"id": t.id}))
            }
            SecurityCommand::TokenRevoke { id } => match self.tokens.get_mut(id) {
                Some(t) => {
                    t.revoked = true;
                    Ok(json!({"id": id}))
                }
                None => Err(ApiError::not_found(format!("no token {id}"))),
            },
            SecurityCommand::TokenRedeem {
                hash,
                mesh,
                role,
                now,
            } => {
                let Some(t) = self.tokens.values_mut().find(|t| t.hash == *hash) else {
                    return Err(ApiError::forbidden("unknown join token"));
                };
                if t.revoked {
                    return Err(ApiError::forbidden(format!("token {} is revoked", t.id)));
                }
                if t.expires_at <= *now {
                    return Err(ApiError::forbidden(format!("token {} has expired", t.id)));
                }
                if t.uses_left == Some(0) {
                    return Err(ApiError::forbidden(format!("token {} is used up", t.id)));
                }
                if t.mesh != *mesh || t.role != *role {
                    return Err(ApiError::forbidden(format!(
                        "token {} is for {} in mesh {}, not {} in mesh {mesh}",
                        t.id,
                        t.role.resource_name(),
                        t.mesh,
                        role.resource_name()
                    )));
                }
                if !node_exists(mesh, role) {
                    return Err(ApiError::forbidden(format!(
                        "{} in mesh {mesh} no longer exists",
                        role.resource_name()
                    )));
                }
                if let Some(n) = &mut t.uses_left {
                    *n -= 1;
                }
                Ok(json!({"id": t.id}))
            }
            SecurityCommand::KeyCreate(k) => {
                if self.keys.contains_key(&k.id) {
                    return Err(ApiError::conflict(format!("access key {} exists", k.id)));
                }
                self.keys.insert(k.id.clone(), k.clone());
                Ok(json!({"accessKeyId": k.id}))
            }
            SecurityCommand::KeyDelete { id } => match self.keys.remove(id) {
                Some(_) => Ok(json!({"accessKeyId": id})),
                None => Err(ApiError::not_found(format!("no access key {id}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests;
