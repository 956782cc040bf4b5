//! The App Mesh state machine: every resource of every mesh, the `clientToken` ledger and the
//! quotas. `apply` is a pure, deterministic function of the state and one replicated command, so
//! every control node reaches the same state; the API reads from it directly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::command::{Command, Idempotency, Outcome};
use super::compile::Instances;
use super::error::{ApiError, ErrorKind};
use super::proxy_config::{Endpoint, ProxyRole};
use super::quota::Quotas;
use super::registry::Registry;
use super::resource::{Metadata, Owner, Record, ResourceKey, ResourceKind, Spec, Status};
use super::rules;
use super::security::{Security, SecurityCommand};
use super::shapes::TagRef;
use super::vip::VipPool;

/// Most tags one resource may carry.
pub const MAX_TAGS: usize = 50;
/// How long a `clientToken` is remembered, in seconds.
const TOKEN_WINDOW_SECS: f64 = 8.0 * 3600.0;
/// How many `clientToken`s are remembered at most (the oldest go first).
const TOKEN_CAPACITY: usize = 50_000;
/// How many bytes of stored answers the `clientToken`s may hold at most.
const TOKEN_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct TokenKey {
    operation: String,
    key: ResourceKey,
    token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TokenEntry {
    key: TokenKey,
    fingerprint: u64,
    at: f64,
    /// The answer given, replayed for a retry.
    outcome: Value,
    /// Its size as JSON, for the byte cap.
    size: usize,
}

/// The whole replicated App Mesh state.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    /// Shared with snapshots: taking one copies pointers, not specs, so writes wait for a
    /// snapshot of a large mesh no longer than for a pass over its keys. A write to a record
    /// a snapshot still holds copies that one record (`Arc::make_mut`).
    resources: BTreeMap<ResourceKey, Arc<Record>>,
    /// Shared with snapshots, like `resources`.
    tokens: HashMap<TokenKey, Arc<TokenEntry>>,
    /// Token keys in the order they were stored, for eviction.
    token_order: VecDeque<TokenKey>,
    /// Sum of the stored answers' sizes.
    token_bytes: usize,
    /// How many resources of each kind each parent holds, for quotas without a scan.
    counts: HashMap<(ResourceKind, String, String), usize>,
    /// Virtual-service VIPs in use.
    vips: VipPool,
    /// Virtual services by lower-cased name (then mesh), for DNS.
    services: BTreeMap<(String, String), Ipv4Addr>,
    /// Virtual nodes by lower-cased `serviceDiscovery.dns.hostname` (then mesh, node), with
    /// their listener ports, for DNS.
    hostnames: BTreeMap<(String, String, String), Vec<u16>>,
    /// Running proxies.
    registry: Registry,
    /// The mesh CA, join tokens, access keys.
    security: Security,
    /// See [`MeshState::generation`].
    generation: u64,
    quotas: Quotas,
}

/// The serialized form of [`MeshState`], used for raft snapshots and backups.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub resources: Vec<Arc<Record>>,
    tokens: Vec<Arc<TokenEntry>>,
    pub quotas: Quotas,
    #[serde(default)]
    vips: VipPool,
    #[serde(default)]
    registry: Registry,
    #[serde(default)]
    security: Security,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Page<'a> {
    pub items: Vec<&'a Record>,
    /// The name of the last item, when more items follow it.
    pub more_after: Option<String>,
}

// === impl MeshState ===

impl MeshState {
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    pub fn get(&self, key: &ResourceKey) -> Option<&Record> {
        self.resources.get(key).map(Arc::as_ref)
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Every stored resource, in key order.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.resources.values().map(Arc::as_ref)
    }

    /// Resources of `kind` under `mesh` / `parent`, in name order.
    fn children<'a>(
        &'a self,
        kind: ResourceKind,
        mesh: &str,
        parent: &str,
    ) -> impl Iterator<Item = &'a Record> + 'a {
        let (mesh, parent) = (mesh.to_string(), parent.to_string());
        let start = if kind == ResourceKind::Mesh {
            ResourceKey::mesh("")
        } else {
            ResourceKey::child(kind, &mesh, &parent, "")
        };
        self.resources
            .range((Bound::Included(start), Bound::Unbounded))
            .map(|(_, r)| r.as_ref())
            .take_while(move |r| {
                r.key.kind == kind
                    && (kind == ResourceKind::Mesh
                        || (r.key.mesh == mesh && r.key.parent == parent))
            })
    }

    /// One page of the resources of `kind` under `mesh` / `parent`: up to `limit` items whose
    /// name sorts after `after`. Paging by name is stable under concurrent writes: an item that
    /// exists for the whole listing is returned exactly once.
    pub fn list(
        &self,
        kind: ResourceKind,
        mesh: &str,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Page<'_> {
        let mut items: Vec<&Record> = self
            .children(kind, mesh, parent)
            .filter(|r| after.is_none_or(|a| r.key.name() > a))
            .take(limit + 1)
            .collect();
        let more_after = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|r| r.key.name().to_string())
        } else {
            None
        };
        Page { items, more_after }
    }

    /// The VIP of the virtual service called `name` (any case). Where several meshes have a
    /// service of that name, the first mesh by name answers.
    pub fn service_vip(&self, name: &str) -> Option<Ipv4Addr> {
        let name = name.to_ascii_lowercase();
        self.services
            .range((name.clone(), String::new())..)
            .next()
            .filter(|((n, _), _)| *n == name)
            .map(|(_, vip)| *vip)
    }

    fn index_hostname(&mut self, key: &ResourceKey, spec: &Spec, add: bool) {
        let Spec::VirtualNode(vn) = spec else { return };
        let Some(dns) = vn.service_discovery.as_ref().and_then(|d| d.dns.as_ref()) else {
            return;
        };
        let k = (
            dns.hostname.trim_end_matches('.').to_ascii_lowercase(),
            key.mesh.clone(),
            key.name.clone(),
        );
        if add {
            let ports = vn
                .listeners
                .iter()
                .flatten()
                .filter_map(|l| u16::try_from(l.port_mapping.port).ok())
                .collect();
            self.hostnames.insert(k, ports);
        } else {
            self.hostnames.remove(&k);
        }
    }

    /// The addresses of the healthy instances of every virtual node whose DNS hostname is
    /// `name` (any case); `None` when no virtual node has that hostname.
    pub fn hostname_addresses(&self, name: &str) -> Option<Vec<std::net::IpAddr>> {
        let mut addrs: Vec<std::net::IpAddr> = self
            .hostname_instances(name)?
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        addrs.dedup();
        Some(addrs)
    }

    /// Like [`Self::hostname_addresses`], each address with the listener ports of its virtual
    /// node (for SRV answers); sorted by address, then ports.
    pub fn hostname_instances(&self, name: &str) -> Option<Vec<(std::net::IpAddr, Vec<u16>)>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let nodes: Vec<(&String, &String, &Vec<u16>)> = self
            .hostnames
            .range((name.clone(), String::new(), String::new())..)
            .take_while(|((h, _, _), _)| *h == name)
            .map(|((_, m, n), ports)| (m, n, ports))
            .collect();
        if nodes.is_empty() {
            return None;
        }
        let mut found: Vec<(std::net::IpAddr, Vec<u16>)> = nodes
            .into_iter()
            .flat_map(|(m, n, ports)| {
                let role = ProxyRole::VirtualNode(n.clone());
                self.registry
                    .healthy(m, &role)
                    .map(|i| (i.address, ports.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        found.sort();
        found.dedup();
        Some(found)
    }

    /// The running proxies.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// How many virtual services hold a VIP.
    pub fn vips_in_use(&self) -> usize {
        self.vips.len()
    }

    pub fn snapshot(&self) -> StateSnapshot {
        StateSnapshot {
            resources: self.resources.values().cloned().collect(),
            tokens: self
                .token_order
                .iter()
                .filter_map(|k| self.tokens.get(k).cloned())
                .collect(),
            quotas: self.quotas.clone(),
            vips: self.vips.clone(),
            registry: self.registry.clone(),
            security: self.security.clone(),
        }
    }

    pub fn from_snapshot(s: StateSnapshot) -> Self {
        let mut state = MeshState {
            quotas: s.quotas,
            vips: s.vips,
            registry: s.registry,
            security: s.security,
            ..Default::default()
        };
        for r in s.resources {
            state.count(&r.key, 1);
            state.index_hostname(&r.key, &r.spec, true);
            if let Some(vip) = r.vip {
                state.vips.restore(vip, &r.key);
                state
                    .services
                    .insert((r.key.name.to_ascii_lowercase(), r.key.mesh.clone()), vip);
            }
            state.resources.insert(r.key.clone(), r);
        }
        for t in s.tokens {
            state.token_bytes += t.size;
            state.token_order.push_back(t.key.clone());
            state.tokens.insert(t.key.clone(), t);
        }
        state
    }

    /// Applies one committed command. Errors are App Mesh answers (the state is unchanged), not
    /// failures of the state machine.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        self.apply_as(cmd, Answer::Rendered)
    }

    /// Applies a command no caller waits on here (a follower applying its leader's entries):
    /// the state changes exactly as with [`apply`](Self::apply), but a created, updated or
    /// deleted resource is not described (`Ok(Value::Null)` stands for its description). A
    /// clientToken's stored answer is rendered all the same: any node may have to replay it.
    pub fn apply_unanswered(&mut self, cmd: &Command) -> Outcome {
        self.apply_as(cmd, Answer::Unwanted)
    }

    fn apply_as(&mut self, cmd: &Command, answer: Answer) -> Outcome {
        let out = self.apply_inner(cmd, answer);
        // Everything that succeeded changed what proxies may see, except a registry batch of
        // mere lease renewals.
        let visible = match cmd {
            Command::Registry(_) => out.as_ref().is_ok_and(|v| v["changed"] == true),
            // The trust bundle is in every proxy's config; tokens and keys are in none.
            Command::Security(c) => {
                out.is_ok()
                    && matches!(
                        c,
                        SecurityCommand::CaInit { .. } | SecurityCommand::CaRotate { .. }
                    )
            }
            _ => out.is_ok(),
        };
        if visible {
            self.generation += 1;
        }
        out
    }

    /// Counts the changes that can alter a proxy's config (not lease renewals): configs compiled
    /// at the same generation are the same. Not replicated; each node counts its own.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Carries the generation over when this state replaces `previous` (an installed snapshot),
    /// so it never repeats a value the old state had.
    pub fn continue_generation(&mut self, previous: &MeshState) {
        self.generation = previous.generation + 1;
    }

    fn apply_inner(&mut self, cmd: &Command, answer: Answer) -> Outcome {
        let operation = cmd.operation();
        match cmd {
            Command::Create {
                key,
                spec,
                tags,
                idempotency,
                uid,
                owner,
                now,
            } => {
                let answer = answer.or_for(idempotency.as_ref());
                self.idempotent(&operation, key, idempotency.as_ref(), *now, |s| {
                    let record = s.create(key, spec, tags, uid, owner, *now)?;
                    Ok(answer.render(&record, Status::Active))
                })
            }
            Command::Update {
                key,
                spec,
                idempotency,
                now,
            } => {
                let answer = answer.or_for(idempotency.as_ref());
                self.idempotent(&operation, key, idempotency.as_ref(), *now, |s| {
                    s.update(key, spec, *now, answer)
                })
            }
            Command::Delete { key, .. } => self.delete(key, answer),
            Command::Tag { key, tags } => self.tag(key, tags),
            Command::Untag { key, tag_keys } => self.untag(key, tag_keys),
            Command::SetQuotas(q) => {
                self.quotas = q.clone();
                Ok(json!({}))
            }
            Command::Registry(u) => Ok(json!({ "changed": self.registry.apply(u) })),
            Command::Security(c) => {
                let resources = &self.resources;
                self.security
                    .apply(c, |mesh, role| resources.contains_key(&role.key(mesh)))
            }
            Command::Restore { snapshot_json } => {
                let snap: StateSnapshot = serde_json::from_str(snapshot_json).map_err(|e| {
                    ApiError::bad_request(format!("snapshot: not a trellis state: {e}"))
                })?;
                let mut restored = MeshState::from_snapshot(snap);
                restored.continue_generation(self);
                *self = restored;
                Ok(json!({ "resources": self.resources.len() }))
            }
        }
    }

    /// The mesh CA, join tokens and access keys.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// Whether the virtual node or gateway `role` exists in `mesh`.
    pub fn find_role(&self, mesh: &str, role: &ProxyRole) -> bool {
        self.resources.contains_key(&role.key(mesh))
    }

    /// A virtual node's `serviceDiscovery.dns.hostname`, for its proxies' certificates.
    pub fn role_hostname(&self, mesh: &str, role: &ProxyRole) -> Option<String> {
        match &self.resources.get(&role.key(mesh))?.spec {
            Spec::VirtualNode(vn) => vn
                .service_discovery
                .as_ref()?
                .dns
                .as_ref()
                .map(|d| d.hostname.trim_end_matches('.').to_string()),
            _ => None,
        }
    }

    /// Runs `f` unless the token was seen: the same request replays the stored answer, another
    /// request with the same token is a ConflictException.
    fn idempotent(
        &mut self,
        operation: &str,
        key: &ResourceKey,
        idem: Option<&Idempotency>,
        now: f64,
        f: impl FnOnce(&mut Self) -> Outcome,
    ) -> Outcome {
        let Some(idem) = idem else { return f(self) };
        self.evict_tokens(now);
        let tk = TokenKey {
            operation: operation.into(),
            key: key.clone(),
            token: idem.token.clone(),
        };
        if let Some(seen) = self.tokens.get(&tk) {
            // The answer is about one incarnation of the resource: once it is deleted (and
            // perhaps created again) the token no longer says anything.
            let current = self.resources.get(key).map(|r| r.metadata.uid.as_str());
            let answered = seen.outcome["metadata"]["uid"].as_str();
            if current.is_some() && current == answered {
                if seen.fingerprint == idem.fingerprint {
                    return Ok(seen.outcome.clone());
                }
                return Err(ApiError::conflict(format!(
                    "clientToken {} was already used for a {operation} request with different parameters",
                    idem.token
                )));
            }
            self.forget_token(&tk);
            self.token_order.retain(|k| *k != tk);
        }
        let outcome = f(self);
        // Only answers that changed state are replayed; a failed attempt may be retried.
        if let Ok(v) = &outcome {
            let size = v.to_string().len();
            self.token_bytes += size;
            self.token_order.push_back(tk.clone());
            self.tokens.insert(
                tk.clone(),
                Arc::new(TokenEntry {
                    key: tk,
                    fingerprint: idem.fingerprint,
                    at: now,
                    outcome: v.clone(),
                    size,
                }),
            );
            self.evict_tokens(now);
        }
        outcome
    }

    fn count_key(kind: ResourceKind, mesh: &str, parent: &str) -> (ResourceKind, String, String) {
        // Meshes are counted account-wide.
        let mesh = if kind == ResourceKind::Mesh { "" } else { mesh };
        (kind, mesh.to_string(), parent.to_string())
    }

    fn count(&mut self, key: &ResourceKey, delta: isize) {
        let n = self
            .counts
            .entry(Self::count_key(key.kind, &key.mesh, &key.parent))
            .or_default();
        *n = n.saturating_add_signed(delta);
    }

    /// How many resources of `kind` live under `mesh` / `parent`.
    fn how_many(&self, kind: ResourceKind, mesh: &str, parent: &str) -> usize {
        self.counts
            .get(&Self::count_key(kind, mesh, parent))
            .copied()
            .unwrap_or(0)
    }

    fn forget_token(&mut self, tk: &TokenKey) {
        if let Some(t) = self.tokens.remove(tk) {
            self.token_bytes -= t.size;
        }
    }

    /// Drops the oldest tokens while any is past the window or the ledger is over its caps.
    fn evict_tokens(&mut self, now: f64) {
        while let Some(front) = self.token_order.front() {
            let stale = self
                .tokens
                .get(front)
                .is_none_or(|t| t.at + TOKEN_WINDOW_SECS < now);
            let over = self.token_order.len() > TOKEN_CAPACITY || self.token_bytes > TOKEN_BYTES;
            if !stale && !over {
                break;
            }
            if let Some(k) = self.token_order.pop_front() {
                self.forget_token(&k);
            }
        }
    }

    /// The parent of `key` (its mesh, or the router / gateway of a route), or NotFound naming
    /// whichever is missing.
    pub fn find_parent(&self, key: &ResourceKey) -> Result<&Record, ApiError> {
        let pk = key
            .parent_key()
            .ok_or_else(|| ApiError::bad_request("a mesh has no parent"))?;
        let mesh = ResourceKey::mesh(&key.mesh);
        if !self.resources.contains_key(&mesh) {
            return Err(ApiError::not_found(format!(
                "Mesh with name {} not found",
                key.mesh
            )));
        }
        self.get(&pk).ok_or_else(|| {
            ApiError::not_found(format!(
                "{} with name {} is not present under mesh {}",
                pk.kind, pk.name, pk.mesh
            ))
        })
    }

    /// The resource at `key`, or NotFound naming the missing mesh, parent or resource.
    pub fn find(&self, key: &ResourceKey) -> Result<&Record, ApiError> {
        if key.kind != ResourceKind::Mesh {
            self.find_parent(key)?;
        }
        self.get(key).ok_or_else(|| not_found(key))
    }

    fn create(
        &mut self,
        key: &ResourceKey,
        spec: &Spec,
        tags: &[TagRef],
        uid: &str,
        owner: &Owner,
        now: f64,
    ) -> Result<Arc<Record>, ApiError> {
        let mesh_owner = if key.kind == ResourceKind::Mesh {
            owner.account.clone()
        } else {
            self.find_parent(key)?;
            self.resources
                .get(&ResourceKey::mesh(&key.mesh))
                .map(|m| m.metadata.mesh_owner.clone())
                .unwrap_or_else(|| owner.account.clone())
        };
        if self.resources.contains_key(key) {
            return Err(ApiError::conflict(format!(
                "{} already exists",
                key.describe()
            )));
        }
        let (limit, what) = self.quotas.limit(key.kind);
        if self.how_many(key.kind, &key.mesh, &key.parent) >= limit {
            return Err(ApiError::limit(format!(
                "cannot create {}: the limit of {limit} {what} is reached",
                key.describe()
            )));
        }
        self.check_spec_in_context(key, spec)?;
        if tags.len() > MAX_TAGS {
            return Err(too_many_tags(tags.len()));
        }
        // Last, once nothing else can fail: the address is taken only for a stored service.
        let vip = if key.kind == ResourceKind::VirtualService {
            let vip = self.vips.allocate(key).ok_or_else(|| {
                ApiError::limit("no free VIP left in 127.77.0.0/16 for another virtual service")
            })?;
            self.services
                .insert((key.name.to_ascii_lowercase(), key.mesh.clone()), vip);
            Some(vip)
        } else {
            None
        };
        let record = Record {
            key: key.clone(),
            vip,
            metadata: Metadata {
                arn: owner.arn(key),
                uid: uid.into(),
                version: 1,
                created_at: now,
                last_updated_at: now,
                mesh_owner,
                resource_owner: owner.account.clone(),
            },
            spec: spec.clone(),
            tags: tags
                .iter()
                .map(|t| (t.key.clone(), t.value.clone()))
                .collect(),
        };
        let record = Arc::new(record);
        self.count(key, 1);
        self.index_hostname(key, spec, true);
        self.resources.insert(key.clone(), record.clone());
        Ok(record)
    }

    fn update(&mut self, key: &ResourceKey, spec: &Spec, now: f64, answer: Answer) -> Outcome {
        self.find(key)?;
        self.check_spec_in_context(key, spec)?;
        if let Some(old) = self.resources.get(key).map(|r| r.spec.clone()) {
            self.index_hostname(key, &old, false);
        }
        self.index_hostname(key, spec, true);
        let record = Arc::make_mut(self.resources.get_mut(key).ok_or_else(|| not_found(key))?);
        record.spec = spec.clone();
        record.metadata.version += 1;
        record.metadata.last_updated_at = now.max(record.metadata.last_updated_at);
        Ok(answer.render(record, Status::Active))
    }

    fn delete(&mut self, key: &ResourceKey, answer: Answer) -> Outcome {
        self.find(key)?;
        if let Some(why) = self.in_use(key) {
            return Err(ApiError::in_use(why));
        }
        let record = self.resources.remove(key).ok_or_else(|| not_found(key))?;
        self.count(key, -1);
        self.index_hostname(key, &record.spec, false);
        if let Some(vip) = record.vip {
            self.vips.release(vip);
            self.services
                .remove(&(key.name.to_ascii_lowercase(), key.mesh.clone()));
        }
        Ok(answer.render(&record, Status::Deleted))
    }

    fn tag(&mut self, key: &ResourceKey, tags: &[TagRef]) -> Outcome {
        let record = Arc::make_mut(self.resources.get_mut(key).ok_or_else(|| not_found(key))?);
        let mut merged = record.tags.clone();
        for t in tags {
            merged.insert(t.key.clone(), t.value.clone());
        }
        if merged.len() > MAX_TAGS {
            return Err(too_many_tags(merged.len()));
        }
        record.tags = merged;
        Ok(json!({}))
    }

    fn untag(&mut self, key: &ResourceKey, tag_keys: &[String]) -> Outcome {
        let record = Arc::make_mut(self.resources.get_mut(key).ok_or_else(|| not_found(key))?);
        for k in tag_keys {
            record.tags.remove(k);
        }
        Ok(json!({}))
    }

    /// Why `key` cannot be deleted yet, if it cannot.
    fn in_use(&self, key: &ResourceKey) -> Option<String> {
        match key.kind {
            ResourceKind::Mesh => {
                let left: Vec<String> = [
                    ResourceKind::VirtualService,
                    ResourceKind::VirtualRouter,
                    ResourceKind::VirtualNode,
                    ResourceKind::VirtualGateway,
                ]
                .into_iter()
                .filter_map(|k| {
                    let n = self.how_many(k, &key.mesh, "");
                    (n > 0).then(|| format!("{n} {k}"))
                })
                .collect();
                (!left.is_empty()).then(|| {
                    format!(
                        "Mesh {} still contains {}; delete them before the mesh",
                        key.mesh,
                        left.join(", ")
                    )
                })
            }
            ResourceKind::VirtualNode | ResourceKind::VirtualRouter => {
                if key.kind == ResourceKind::VirtualRouter {
                    let routes = self
                        .children(ResourceKind::Route, &key.mesh, &key.name)
                        .count();
                    if routes > 0 {
                        return Some(format!(
                            "VirtualRouter {} in mesh {} still has {routes} Route(s); delete them first",
                            key.name, key.mesh
                        ));
                    }
                }
                let providers: Vec<&str> = self
                    .children(ResourceKind::VirtualService, &key.mesh, "")
                    .filter(|r| rules::provider_of(&r.spec) == Some((key.kind, key.name.as_str())))
                    .map(|r| r.key.name.as_str())
                    .collect();
                (!providers.is_empty()).then(|| {
                    format!(
                        "{} {} in mesh {} is the provider of VirtualService {}; change or delete it first",
                        key.kind,
                        key.name,
                        key.mesh,
                        providers.join(", ")
                    )
                })
            }
            ResourceKind::VirtualGateway => {
                let n = self
                    .children(ResourceKind::GatewayRoute, &key.mesh, &key.name)
                    .count();
                (n > 0).then(|| {
                    format!(
                        "VirtualGateway {} in mesh {} still has {n} GatewayRoute(s); delete them first",
                        key.name, key.mesh
                    )
                })
            }
            ResourceKind::VirtualService | ResourceKind::Route | ResourceKind::GatewayRoute => None,
        }
    }

    /// The rules that depend on other resources: providers exist, route ports and protocols
    /// match the router's (or gateway's) listeners, backend quota.
    fn check_spec_in_context(&self, key: &ResourceKey, spec: &Spec) -> Result<(), ApiError> {
        match spec {
            Spec::VirtualService(_) => {
                if let Some((kind, name)) = rules::provider_of(spec) {
                    let pk = ResourceKey::in_mesh(kind, &key.mesh, name);
                    if !self.resources.contains_key(&pk) {
                        let member = if kind == ResourceKind::VirtualNode {
                            "spec.provider.virtualNode.virtualNodeName"
                        } else {
                            "spec.provider.virtualRouter.virtualRouterName"
                        };
                        return Err(ApiError::not_found(format!(
                            "{member}: {kind} with name {name} is not present under mesh {}",
                            key.mesh
                        )));
                    }
                }
            }
            Spec::VirtualNode(vn) => {
                let n = vn.backends.as_ref().map_or(0, Vec::len);
                if n > self.quotas.backends_per_virtual_node {
                    return Err(ApiError::limit(format!(
                        "spec.backends: {n} backends exceed the limit of {} backends per virtual node",
                        self.quotas.backends_per_virtual_node
                    )));
                }
            }
            // A listener change must not strand the routes already written against it.
            Spec::VirtualRouter(vr) => {
                for r in self.children(ResourceKind::Route, &key.mesh, &key.name) {
                    if let Spec::Route(route) = &r.spec
                        && let Err(why) = rules::route_fits_listeners(route, vr, &key.name)
                    {
                        return Err(ApiError::bad_request(format!(
                            "spec.listeners: Route {} would no longer fit this VirtualRouter ({why}); update or delete it first",
                            r.key.name
                        )));
                    }
                }
            }
            Spec::VirtualGateway(vg) => {
                for r in self.children(ResourceKind::GatewayRoute, &key.mesh, &key.name) {
                    if let Spec::GatewayRoute(route) = &r.spec
                        && let Err(why) = rules::gateway_route_fits_listeners(route, vg, &key.name)
                    {
                        return Err(ApiError::bad_request(format!(
                            "spec.listeners: GatewayRoute {} would no longer fit this VirtualGateway ({why}); update or delete it first",
                            r.key.name
                        )));
                    }
                }
            }
            Spec::Route(route) => {
                let router = self.find_parent(key)?;
                if let Spec::VirtualRouter(vr) = &router.spec {
                    rules::route_fits_listeners(route, vr, &key.parent)
                        .map_err(ApiError::bad_request)?;
                }
            }
            Spec::GatewayRoute(gr) => {
                let gateway = self.find_parent(key)?;
                if let Spec::VirtualGateway(vg) = &gateway.spec {
                    rules::gateway_route_fits_listeners(gr, vg, &key.parent)
                        .map_err(ApiError::bad_request)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// App Mesh's NotFound message for a missing resource.
pub fn not_found(key: &ResourceKey) -> ApiError {
    match key.kind {
        ResourceKind::Mesh => ApiError::not_found(format!("Mesh with name {} not found", key.mesh)),
        // App Mesh's own wording: "VirtualNode with name vn is not present under mesh m".
        k => match k.parent() {
            Some(p) => ApiError::not_found(format!(
                "{k} with name {} is not present under {p} {} in mesh {}",
                key.name, key.parent, key.mesh
            )),
            None => ApiError::not_found(format!(
                "{k} with name {} is not present under mesh {}",
                key.name, key.mesh
            )),
        },
    }
}

fn too_many_tags(n: usize) -> ApiError {
    ApiError::new(
        ErrorKind::TooManyTags,
        format!(
            "tags: a resource can have at most {MAX_TAGS} tags, this request would give it {n}; no tags were applied"
        ),
    )
}

impl Instances for MeshState {
    fn endpoints(&self, mesh: &str, node: &str) -> Vec<Endpoint> {
        let role = ProxyRole::VirtualNode(node.to_string());
        self.registry
            .healthy(mesh, &role)
            .map(|i| i.endpoint())
            .collect()
    }
}

/// Whether a caller waits for a command's answer on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Rendered,
    /// Nobody here reads it: a resource's description is left out.
    Unwanted,
}

impl Answer {
    /// A stored clientToken answer is always rendered.
    fn or_for(self, idempotency: Option<&Idempotency>) -> Self {
        if idempotency.is_some() {
            Answer::Rendered
        } else {
            self
        }
    }

    fn render(self, record: &Record, status: Status) -> Value {
        match self {
            Answer::Rendered => record.to_data(status),
            Answer::Unwanted => Value::Null,
        }
    }
}
