//! Config push: the gRPC `Discovery` service every control node serves. A proxy's stream starts
//! with a Hello; the node registers the instance (through raft, batched), compiles the proxy's
//! config from the applied state and sends it, then recompiles whenever the state moves and
//! sends again when the result differs. Compiled configs are shared by every stream of the same
//! virtual node or gateway (one compile per change and role, not per proxy). Acks, nacks and
//! heartbeats land in the node's table of connected proxies (`GET /v1/proxies`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::raft::Consensus;
use super::traffic::{self, TrafficTable};
use crate::model::Command;
use crate::model::compile::compile;
use crate::model::proxy_config::ProxyRole;
use crate::model::registry::{Instance, RegistryUpdate};
use crate::model::state::MeshState;
use crate::telemetry::control::ControlMetrics;
use crate::wire::discovery::discovery_server::{Discovery, DiscoveryServer};
use crate::wire::discovery::{
    Config, ControlMessage, Hello, ProxyMessage, control_message, proxy_message,
};
use crate::wire::hello_role;

/// How long a proxy may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long registry changes wait to share one raft entry.
const REGISTRY_BATCH: Duration = Duration::from_millis(50);

/// What the node knows of one connected proxy.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub proxy_id: String,
    pub mesh: String,
    /// `virtualNode/<name>` or `virtualGateway/<name>`.
    pub resource: String,
    pub address: String,
    pub healthy: bool,
    /// The last config version sent and the last one the proxy acknowledged.
    pub version_sent: u64,
    pub version_acked: u64,
    /// Why the proxy refused a config, if it last did.
    pub last_nack: Option<String>,
    /// Epoch seconds.
    pub connected_at: f64,
    pub last_heartbeat: f64,
}

/// The proxies connected to this node.
pub type ProxyTable = Arc<Mutex<BTreeMap<String, ProxyStatus>>>;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

enum RegistryChange {
    Upsert(Instance),
    Remove(String),
}

/// The Discovery service of one control node.
#[derive(Clone)]
pub struct Xds {
    consensus: Consensus,
    proxies: ProxyTable,
    registry: mpsc::UnboundedSender<RegistryChange>,
    lease: Duration,
    configs: ConfigCache,
    /// Streams must come with the proxy's certificate (mTLS) naming the Hello's node.
    require_certificate: bool,
    metrics: Arc<ControlMetrics>,
    traffic: TrafficTable,
}

/// The last compiled config of each (mesh, role), by state generation.
#[derive(Clone, Default)]
struct ConfigCache {
    slots: Arc<Mutex<HashMap<(String, ProxyRole), Slot>>>,
}

/// One role's config; streams of that role wait here while one of them compiles.
type Slot = Arc<Mutex<Option<Compiled>>>;

#[derive(Clone)]
struct Compiled {
    generation: u64,
    /// The config as JSON, or why there is none (the node or gateway does not exist).
    json: Result<Arc<Vec<u8>>, String>,
}

impl ConfigCache {
    /// The config of `role` in `mesh` at the state's generation, compiled by whichever stream
    /// asks first; the others of that role wait on the slot and share the result.
    fn get(&self, state: &MeshState, mesh: &str, role: &ProxyRole) -> Compiled {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((mesh.to_string(), role.clone()))
            .or_default()
            .clone();
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        let generation = state.generation();
        match slot.as_ref() {
            Some(c) if c.generation == generation => c.clone(),
            _ => {
                let json = compile(state, mesh, role, state)
                    // A ProxyConfig is plain data: serializing it cannot fail.
                    .map(|c| Arc::new(serde_json::to_vec(&c).unwrap_or_default()))
                    .map_err(|e| e.message);
                slot.insert(Compiled { generation, json }).clone()
            }
        }
    }
}

impl Xds {
    /// Starts the registry batcher; `lease` is how long a registration lasts unrenewed.
    pub fn new(
        consensus: Consensus,
        lease: Duration,
        require_certificate: bool,
        metrics: Arc<ControlMetrics>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(registry_batcher(consensus.clone(), rx, lease));
        Self {
            consensus,
            proxies: Default::default(),
            registry: tx,
            lease,
            configs: ConfigCache::default(),
            require_certificate,
            metrics,
            traffic: TrafficTable::default(),
        }
    }

    pub fn proxies(&self) -> ProxyTable {
        self.proxies.clone()
    }

    /// The traffic summaries of the connected proxies.
    pub fn traffic(&self) -> TrafficTable {
        self.traffic.clone()
    }

    pub fn into_service(self) -> DiscoveryServer<Self> {
        DiscoveryServer::new(self)
    }

    fn instance(
        &self,
        hello: &Hello,
        role: &ProxyRole,
        address: IpAddr,
        healthy: bool,
    ) -> Instance {
        Instance {
            proxy_id: hello.proxy_id.clone(),
            mesh: hello.mesh.clone(),
            role: role.clone(),
            address,
            inbound_port: hello.inbound_port as u16,
            healthy,
            expires_at: now() + self.lease.as_secs_f64(),
        }
    }

    /// The stream's certificate must be this mesh's, for the node the Hello names: a proxy
    /// only ever receives its own node's config.
    fn check_peer(&self, peer: Option<&str>, mesh: &str, role: &ProxyRole) -> Result<(), Status> {
        let uri = peer.ok_or_else(|| {
            Status::unauthenticated(
                "the config stream needs the proxy's certificate (mTLS); get one with a join token",
            )
        })?;
        let trust_domain = self.consensus.read(|s| s.security().trust_domain.clone());
        let want = crate::identity::spiffe::proxy_id(&trust_domain, mesh, role);
        if uri != want {
            return Err(Status::permission_denied(format!(
                "the certificate is for {uri}, the hello names {want}"
            )));
        }
        Ok(())
    }

    fn update(&self, proxy_id: &str, f: impl FnOnce(&mut ProxyStatus)) {
        let mut table = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = table.get_mut(proxy_id) {
            f(p);
        }
    }
}

/// Checks a Hello; the error says which field is wrong.
fn check_hello(h: &Hello) -> Result<(ProxyRole, IpAddr), Status> {
    if h.proxy_id.is_empty() || h.proxy_id.len() > 128 {
        return Err(Status::invalid_argument(
            "hello.proxy_id: must be 1 to 128 characters",
        ));
    }
    if h.mesh.is_empty() {
        return Err(Status::invalid_argument("hello.mesh: is required"));
    }
    let role = hello_role(h).ok_or_else(|| {
        Status::invalid_argument("hello.role: name a virtual_node or a virtual_gateway")
    })?;
    let address: IpAddr = h.advertise_address.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "hello.advertise_address: not an IP address: {:?}",
            h.advertise_address
        ))
    })?;
    if h.inbound_port == 0 || h.inbound_port > 65535 {
        return Err(Status::invalid_argument(format!(
            "hello.inbound_port: must be 1 to 65535, got {}",
            h.inbound_port
        )));
    }
    Ok((role, address))
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for Xds {
    type StreamStream = ConfigStream;

    async fn stream(
        &self,
        req: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<ConfigStream>, Status> {
        let peer = req
            .peer_certs()
            .and_then(|certs| crate::identity::tls::peer_spiffe(&certs));
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??
            .ok_or_else(|| Status::invalid_argument("the stream ended before a Hello"))?;
        let Some(proxy_message::Kind::Hello(hello)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be a Hello",
            ));
        };
        let (role, address) = check_hello(&hello)?;
        if self.require_certificate {
            self.check_peer(peer.as_deref(), &hello.mesh, &role)?;
        }
        // Refuse proxies for resources that do not exist before registering anything.
        let compiled = self
            .consensus
            .read(|s| self.configs.get(s, &hello.mesh, &role));
        if let Err(message) = compiled.json {
            return Err(Status::not_found(message));
        }
        let _ = self.registry.send(RegistryChange::Upsert(self.instance(
            &hello,
            &role,
            address,
            hello.healthy,
        )));
        let t = now();
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                hello.proxy_id.clone(),
                ProxyStatus {
                    proxy_id: hello.proxy_id.clone(),
                    mesh: hello.mesh.clone(),
                    resource: role.resource_name(),
                    address: SocketAddr::new(address, hello.inbound_port as u16).to_string(),
                    healthy: hello.healthy,
                    version_sent: 0,
                    version_acked: hello.have_version,
                    last_nack: None,
                    connected_at: t,
                    last_heartbeat: t,
                },
            );
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(session(self.clone(), hello, role, address, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One proxy's stream, until either side ends it.
async fn session(
    xds: Xds,
    hello: Hello,
    role: ProxyRole,
    address: IpAddr,
    mut inbound: Streaming<ProxyMessage>,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
) {
    let id = hello.proxy_id.clone();
    let mut applied = xds.consensus.applied_index();
    let mut last_sent: Option<Arc<Vec<u8>>> = None;
    let mut compiled_at: Option<u64> = None;
    // The version sent and not yet acknowledged, with when this stream saw its change.
    let mut awaiting_ack: Option<(u64, std::time::Instant)> = None;
    let lease_seconds = xds.lease.as_secs().max(1) as u32;
    loop {
        let version = *applied.borrow_and_update();
        let seen = std::time::Instant::now();
        // Lease renewals move the raft index but change no config: skip the recompile.
        let generation = xds.consensus.read(|s| s.generation());
        if compiled_at != Some(generation) {
            let compiled = xds
                .consensus
                .read(|s| xds.configs.get(s, &hello.mesh, &role));
            compiled_at = Some(compiled.generation);
            match compiled.json {
                // The same Arc is the same config; a new one may still be equal.
                Ok(json)
                    if !last_sent
                        .as_ref()
                        .is_some_and(|l| Arc::ptr_eq(l, &json) || **l == *json) =>
                {
                    let config = Config {
                        version,
                        config_json: json.to_vec(),
                        lease_seconds,
                    };
                    let msg = ControlMessage {
                        kind: Some(control_message::Kind::Config(config)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                    xds.update(&id, |p| p.version_sent = version);
                    last_sent = Some(json);
                    awaiting_ack.get_or_insert((version, seen));
                }
                Ok(_) => {}
                Err(message) => {
                    // The node or gateway was deleted: this proxy has nothing left to serve.
                    let _ = tx.send(Err(Status::not_found(message))).await;
                    break;
                }
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { break },
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.kind {
                    Some(proxy_message::Kind::Ack(a)) => {
                        if let Some((v, since)) = awaiting_ack && a.version >= v {
                            xds.metrics.config_pushed(since.elapsed());
                            awaiting_ack = None;
                        }
                        xds.update(&id, |p| {
                            p.version_acked = a.version;
                            p.last_nack = None;
                        })
                    }
                    Some(proxy_message::Kind::Nack(n)) => {
                        tracing::warn!(proxy = %id, version = n.version, reason = %n.reason, "proxy refused a config");
                        xds.update(&id, |p| p.last_nack = Some(format!("version {}: {}", n.version, n.reason)));
                    }
                    Some(proxy_message::Kind::Heartbeat(h)) => {
                        let _ = xds.registry.send(RegistryChange::Upsert(xds.instance(&hello, &role, address, h.healthy)));
                        xds.update(&id, |p| {
                            p.last_heartbeat = now();
                            p.healthy = h.healthy;
                        });
                    }
                    Some(proxy_message::Kind::Traffic(t)) => {
                        traffic::record(&xds.traffic, &id, &hello.mesh, &role.resource_name(), t.edges);
                    }
                    Some(proxy_message::Kind::Goodbye(_)) => {
                        let _ = xds.registry.send(RegistryChange::Remove(id.clone()));
                        break;
                    }
                    Some(proxy_message::Kind::Hello(_)) | None => {
                        let _ = tx.send(Err(Status::invalid_argument("only one Hello per stream"))).await;
                        break;
                    }
                },
                // The proxy went away; its registration lapses with its lease.
                Ok(None) | Err(_) => break,
            },
        }
    }
    xds.proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    xds.traffic
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
}

/// Collects registry changes for a moment and writes each batch as one raft entry; also expires
/// lapsed instances when nothing else writes.
async fn registry_batcher(
    consensus: Consensus,
    mut rx: mpsc::UnboundedReceiver<RegistryChange>,
    lease: Duration,
) {
    let mut sweep = tokio::time::interval(lease / 3);
    loop {
        let mut upserts = BTreeMap::new();
        let mut removals = Vec::new();
        tokio::select! {
            change = rx.recv() => {
                let Some(change) = change else { return };
                let mut add = |c| match c {
                    RegistryChange::Upsert(i) => { upserts.insert(i.proxy_id.clone(), i); }
                    RegistryChange::Remove(id) => removals.push(id),
                };
                add(change);
                tokio::time::sleep(REGISTRY_BATCH).await;
                while let Ok(c) = rx.try_recv() {
                    add(c);
                }
            }
            _ = sweep.tick() => {
                let t = now();
                if !consensus.read(|s| s.registry().all().any(|i| i.expires_at < t)) {
                    continue;
                }
            }
        }
        let update = RegistryUpdate {
            now: now(),
            upserts: upserts.into_values().collect(),
            removals,
        };
        if let Err(e) = consensus.write(Command::Registry(update)).await {
            tracing::warn!(error = %e, "registry update not written; proxies will renew");
        }
    }
}
