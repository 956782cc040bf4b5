//! The replicated commands: what the API proposes to raft and every node applies to its state
//! machine. Everything that must be the same on every node (ids, clocks, owner) is decided by the
//! proposing node and carried in the command, so applying is deterministic.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::quota::Quotas;
use super::registry::RegistryUpdate;
use super::resource::{Owner, ResourceKey, Spec};
use super::security::SecurityCommand;
use super::shapes::TagRef;

/// A `clientToken` and the fingerprint of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub token: String,
    /// FNV-1a over the request's canonical body (see [`fingerprint`]).
    pub fingerprint: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Create {
        key: ResourceKey,
        spec: Spec,
        tags: Vec<TagRef>,
        idempotency: Option<Idempotency>,
        uid: String,
        owner: Owner,
        /// Epoch seconds on the proposing node.
        now: f64,
    },
    Update {
        key: ResourceKey,
        spec: Spec,
        idempotency: Option<Idempotency>,
        now: f64,
    },
    Delete {
        key: ResourceKey,
        now: f64,
    },
    Tag {
        key: ResourceKey,
        tags: Vec<TagRef>,
    },
    Untag {
        key: ResourceKey,
        tag_keys: Vec<String>,
    },
    /// Sets the quotas every node enforces (the control nodes' configured limits).
    SetQuotas(Quotas),
    /// A batch of proxy registrations, renewals and goodbyes.
    Registry(RegistryUpdate),
    /// The mesh CA, join tokens and access keys.
    Security(SecurityCommand),
    /// Replaces the whole state with a backup (`trellis snapshot restore`): the
    /// [`StateSnapshot`](super::state::StateSnapshot) as JSON, checked before it is proposed.
    Restore {
        snapshot_json: String,
    },
}

impl Command {
    /// The operation name, for logs and metrics.
    pub fn operation(&self) -> String {
        match self {
            Command::Create { key, .. } => format!("Create{}", key.kind),
            Command::Update { key, .. } => format!("Update{}", key.kind),
            Command::Delete { key, .. } => format!("Delete{}", key.kind),
            Command::Tag { .. } => "TagResource".into(),
            Command::Untag { .. } => "UntagResource".into(),
            Command::SetQuotas(_) => "SetQuotas".into(),
            Command::Registry(_) => "Registry".into(),
            Command::Security(c) => c.operation().into(),
            Command::Restore { .. } => "RestoreSnapshot".into(),
        }
    }
}

/// What applying a command produced.
pub type Outcome = Result<Value, ApiError>;

/// FNV-1a 64 over a canonical JSON rendering: stable across processes and versions, unlike
/// std's hasher, so a replayed token compares equal on every node.
pub fn fingerprint(v: &Value) -> u64 {
    let s = v.to_string();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
