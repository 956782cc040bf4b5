//! What one proxy needs to carry traffic for its virtual node or virtual gateway, compiled from
//! the mesh's resources by `compile` and pushed on the proxy's config stream. It keeps App Mesh's
//! own shapes where they mean exactly what the proxy must do (matches, health checks, TLS,
//! pools), resolves everything else (providers, routers, defaults, durations) so the proxy
//! never needs the rest of the mesh.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::shapes::{
    ClientPolicy, EgressFilterType, GrpcGatewayRouteMatch, GrpcRouteMatch, HealthCheckPolicy,
    HttpGatewayRouteMatch, HttpGatewayRouteRewrite, HttpRouteMatch, ListenerTls, ListenerTlsMode,
    LoggingFormat, OutlierDetection, PortProtocol, VirtualGatewayConnectionPool,
    VirtualGatewayHealthCheckPolicy, VirtualGatewayListenerTls, VirtualNodeConnectionPool,
};

/// Per-request timeout when none is set (App Mesh's 15 s); 0 disables it.
pub const DEFAULT_PER_REQUEST_MS: u64 = 15_000;
/// Idle timeout when none is set (App Mesh's 300 s).
pub const DEFAULT_IDLE_MS: u64 = 300_000;

/// The whole config of one proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyConfig {
    pub mesh: String,
    /// Whom the proxy serves.
    pub role: ProxyRole,
    /// The mesh's egress filter: DROP_ALL unless the mesh says ALLOW_ALL.
    pub egress_filter: EgressFilterType,
    /// The node's own listeners, fronting the local app (empty for a gateway).
    pub inbound: Vec<InboundListener>,
    /// One per virtual service the proxy may send to (a node's backends, a gateway's targets).
    pub outbound: Vec<OutboundService>,
    /// Where weighted targets lead: one per (virtual node, port) that some route names.
    pub clusters: Vec<Cluster>,
    pub access_log: Option<AccessLog>,
    /// A virtual gateway's listeners and gateway routes.
    pub gateway: Option<GatewayConfig>,
    /// The mesh CA's roots (PEM): peers' certificates must chain to one of them. Changes
    /// with `trellis ca rotate`.
    #[serde(default)]
    pub trust_bundle: String,
    /// Who may call this virtual node (App Mesh's access model): the virtual nodes and
    /// gateways that list, among their backends or gateway-route targets, a virtual service
    /// whose routes lead here. Checked on the caller's certificate.
    #[serde(default)]
    pub allowed_callers: Vec<ProxyRole>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ProxyRole {
    VirtualNode(String),
    VirtualGateway(String),
}

impl ProxyRole {
    /// `virtualNode/<name>` or `virtualGateway/<name>`.
    pub fn resource_name(&self) -> String {
        match self {
            Self::VirtualNode(n) => format!("virtualNode/{n}"),
            Self::VirtualGateway(g) => format!("virtualGateway/{g}"),
        }
    }

    /// The key of the virtual node or gateway this role serves in `mesh`.
    pub fn key(&self, mesh: &str) -> super::resource::ResourceKey {
        use super::resource::{ResourceKey, ResourceKind};
        match self {
            Self::VirtualNode(n) => ResourceKey::in_mesh(ResourceKind::VirtualNode, mesh, n),
            Self::VirtualGateway(g) => ResourceKey::in_mesh(ResourceKind::VirtualGateway, mesh, g),
        }
    }
}

/// Timeouts resolved to milliseconds (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub per_request_ms: u64,
    pub idle_ms: u64,
}

impl Timeouts {
    /// The idle timeout, `None` when there is none.
    pub fn idle(&self) -> Option<std::time::Duration> {
        (self.idle_ms > 0).then(|| std::time::Duration::from_millis(self.idle_ms))
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            per_request_ms: DEFAULT_PER_REQUEST_MS,
            idle_ms: DEFAULT_IDLE_MS,
        }
    }
}

/// One of the node's listeners: peers connect to it, the proxy forwards to the app on
/// 127.0.0.1:`port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundListener {
    pub port: u16,
    pub protocol: PortProtocol,
    pub timeouts: Timeouts,
    pub connection_pool: Option<VirtualNodeConnectionPool>,
    /// The local app's health check, reported to the control plane.
    pub health_check: Option<HealthCheckPolicy>,
    pub tls: Option<ListenerTls>,
}

/// A backend virtual service: reached on its VIP at each of its ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundService {
    pub virtual_service: String,
    pub vip: Option<Ipv4Addr>,
    /// The backend's client policy, else the node's (or gateway's) backend default.
    pub client_policy: Option<ClientPolicy>,
    pub listeners: Vec<OutboundListener>,
}

/// One port of a virtual service, with its routes in the order they are tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundListener {
    pub port: u16,
    pub protocol: PortProtocol,
    pub routes: Vec<CompiledRoute>,
}

/// A route ready to match: App Mesh's match, resolved targets, retry policy and timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompiledRoute {
    /// The App Mesh route, or `virtualNode/<name>` for a virtual-node provider's implicit route.
    pub name: String,
    pub priority: Option<i64>,
    pub matcher: RouteMatch,
    pub targets: Vec<Target>,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RouteMatch {
    Http(HttpRouteMatch),
    Grpc(GrpcRouteMatch),
    /// TCP routes (and virtual-node providers) match every connection.
    Any,
}

/// A weighted target: the cluster `virtual_node`:`port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub virtual_node: String,
    pub port: u16,
    pub weight: u32,
}

/// When to retry, resolved from App Mesh's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_retries: u32,
    /// 0 = bounded only by the request timeout.
    pub per_retry_timeout_ms: u64,
    /// HTTP statuses that are retried.
    pub http_statuses: Vec<u16>,
    /// Retry when the upstream resets or refuses the stream (server-error and gateway-error
    /// include Envoy's reset policy; stream-error is a refused stream).
    pub on_reset: bool,
    pub on_refused_stream: bool,
    /// connection-error: the connection to the upstream failed.
    pub on_connection_error: bool,
    /// gRPC statuses by App Mesh's names (`unavailable`, `deadline-exceeded`, …).
    pub grpc_events: Vec<String>,
    /// Whether this is App Mesh's implicit default policy (no policy on the route).
    pub is_default: bool,
}

/// Everything the proxy needs to send to one (virtual node, port).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    pub virtual_node: String,
    pub port: u16,
    /// The target listener's protocol (`None` when the node or listener does not exist).
    pub protocol: Option<PortProtocol>,
    /// The target listener's TLS mode (`None`: no `tls` block, the mesh's default mTLS).
    #[serde(default)]
    pub tls_mode: Option<ListenerTlsMode>,
    /// The node's `serviceDiscovery.dns.hostname`, which its certificate carries.
    pub hostname: Option<String>,
    /// Passive health checking, by the caller, from the target listener.
    pub outlier_detection: Option<OutlierDetection>,
    /// Active health checking, by the caller, from the target listener.
    pub health_check: Option<HealthCheckPolicy>,
    /// Healthy instances of the node.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// The instance's address: its proxy's inbound listener.
    pub address: std::net::SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessLog {
    pub path: String,
    pub format: Option<LoggingFormat>,
}

/// A virtual gateway's own side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayConfig {
    pub listeners: Vec<GatewayListener>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayListener {
    pub port: u16,
    pub protocol: PortProtocol,
    pub connection_pool: Option<VirtualGatewayConnectionPool>,
    pub health_check: Option<VirtualGatewayHealthCheckPolicy>,
    pub tls: Option<VirtualGatewayListenerTls>,
    /// Gateway routes in the order they are tried.
    pub routes: Vec<CompiledGatewayRoute>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompiledGatewayRoute {
    pub name: String,
    pub priority: Option<i64>,
    pub matcher: GatewayRouteMatch,
    /// The target virtual service (one of `ProxyConfig::outbound`) and its port.
    pub virtual_service: String,
    pub port: Option<u16>,
    /// App Mesh's rewrites (defaults apply: Host to the service name, matched prefix to `/`).
    pub rewrite: Option<HttpGatewayRouteRewrite>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GatewayRouteMatch {
    Http(HttpGatewayRouteMatch),
    Grpc(GrpcGatewayRouteMatch),
}
