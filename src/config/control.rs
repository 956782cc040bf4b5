//! `control.toml`: the settings of one control-plane node, every key documented here and in
//! config/control.toml.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use crate::model::Quotas;

/// Settings of one control-plane node (`trellis control --config control.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// This node's raft id: unique in the cluster, never reused. Default 1.
    pub node_id: u64,
    /// Where the node keeps its raft log, state and keys. Default `/var/lib/trellis`.
    pub data_dir: PathBuf,
    /// The App Mesh API (and `/v1/` admin) listener. Default `127.0.0.1:7070`.
    pub api_addr: SocketAddr,
    /// The gRPC listener (raft RPCs, proxy config streams). Default `127.0.0.1:7071`.
    /// Reserved: served once clustering and config push land.
    pub grpc_addr: SocketAddr,
    /// The DNS listener, UDP and TCP on the same port. Default `127.0.0.1:8600` (binding
    /// port 53 takes CAP_NET_BIND_SERVICE, which the packaged unit grants).
    pub dns_addr: SocketAddr,
    /// TTL of DNS answers in seconds: short, so clients follow changes. Default 5.
    pub dns_ttl: u32,
    /// Seconds a proxy's registration lasts without a heartbeat (proxies heartbeat at a third
    /// of it). Default 15.
    pub lease_seconds: u32,
    /// The address peers and proxies use to reach this node's gRPC port; default `grpc_addr`.
    pub advertise_addr: Option<SocketAddr>,
    /// How many voters to wait for before forming a new cluster: 1 (a lone node, the default),
    /// 3 or 5 (Consul's guidance: 3 tolerate one failure, 5 tolerate two). Nodes find each
    /// other through `retry_join`; once this many have met, the lowest `node_id` forms the
    /// cluster. A restarted member ignores it.
    pub bootstrap_expect: usize,
    /// Peers' gRPC addresses (`host:port`), tried every half second at start: to form a
    /// cluster with (see `bootstrap_expect`) or, when one exists, to join it.
    pub retry_join: Vec<String>,
    /// A peer to join through once (`trellis control --join ADDR` sets it): this node is
    /// added as a learner, catches up, then becomes a voter.
    pub join: Option<String>,
    /// The region written into ARNs (`arn:aws:appmesh:<region>:…`). Default `us-east-1`.
    pub region: String,
    /// The 12-digit account id written into ARNs, `meshOwner` and `resourceOwner`.
    /// Default `000000000000`.
    pub account_id: String,
    /// App Mesh's service quotas; each default is App Mesh's own (see `[quotas]` in the example).
    pub quotas: Quotas,
    /// Log filter in `RUST_LOG` syntax. Default `info,openraft=warn,sled=warn`. Release builds
    /// have nothing below `debug`.
    pub log: String,
    /// The SPIFFE trust domain of the mesh CA's identities
    /// (`spiffe://<trust_domain>/mesh/<mesh>/virtualNode/<name>`). Fixed at bootstrap.
    /// Default `trellis.local`.
    pub trust_domain: String,
    /// Serve the API (HTTPS) and gRPC with a certificate from the mesh CA; clients pin the
    /// bundle (`trellis ca show`). Default true; `trellis dev` turns it off on loopback.
    pub tls: bool,
    /// The cluster CA (PEM certificate and key, `trellis ca create --out DIR` makes them),
    /// the same files on every control node. A node issues itself its control-node
    /// certificate from it at start, before it belongs to a cluster, and peers accept only
    /// certificates of it on the raft port; the first node to bootstrap makes it the mesh CA
    /// root. Required with `tls = true` in a cluster of several nodes; a lone node without it
    /// creates its own root.
    pub ca_cert_file: Option<PathBuf>,
    /// The cluster CA's private key (keep it 0600, readable by the service user only).
    pub ca_key_file: Option<PathBuf>,
    /// Extra names and addresses for this node's certificate (beyond `localhost`, 127.0.0.1,
    /// and the IPs of `api_addr`, `grpc_addr` and `advertise_addr`).
    pub tls_names: Vec<String>,
    /// How API callers prove who they are: `sigv4` (AWS Signature Version 4 with a trellis
    /// access key, as the aws CLI sends it) or `none` (every caller is admin; loopback only).
    /// Default `sigv4`; `trellis dev` uses `none`.
    pub auth: AuthMode,
    /// How far a request's `X-Amz-Date` may be from the server clock, in seconds. Default 300.
    pub sigv4_max_skew_seconds: u64,
    /// Lifetime of proxy certificates, in seconds (proxies renew at two thirds). Default
    /// 86400 (24 h).
    pub proxy_cert_seconds: u64,
    /// Build a raft snapshot (and compact the log behind it) every this many entries; a node
    /// that falls further behind than a fifth of it catches up from a snapshot. A snapshot
    /// writes the whole state (on every node at once): on a mesh of 10,000 virtual nodes
    /// that is some hundreds of milliseconds of CPU (at nice 10, so writes go first), which a
    /// low value pays often. On a state of more records than this, the interval is the number
    /// of records at the last snapshot (as Redis rewrites its append-only file once it has
    /// doubled), so a large mesh pays no more per write than a small one. Default 20000
    /// (Consul snapshots every 8192 entries, etcd every 100,000).
    pub snapshot_every: u64,
    /// Remove a voter that has not answered the leader for this many seconds (Consul
    /// autopilot's dead-server cleanup); 0 (the default) leaves it to `trellis members
    /// remove`.
    pub autopilot_dead_voter_seconds: u64,
    /// Autopilot never shrinks the cluster below this many voters. Default 3.
    pub autopilot_min_voters: usize,
}

/// How API callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Sigv4,
    None,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from("/var/lib/trellis"),
            api_addr: ([127, 0, 0, 1], 7070).into(),
            grpc_addr: ([127, 0, 0, 1], 7071).into(),
            dns_addr: ([127, 0, 0, 1], 8600).into(),
            dns_ttl: 5,
            lease_seconds: 15,
            advertise_addr: None,
            bootstrap_expect: 1,
            retry_join: Vec::new(),
            join: None,
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
            quotas: Quotas::default(),
            log: "info,openraft=warn,sled=warn".into(),
            trust_domain: "trellis.local".into(),
            tls: true,
            ca_cert_file: None,
            ca_key_file: None,
            tls_names: Vec::new(),
            auth: AuthMode::Sigv4,
            sigv4_max_skew_seconds: 300,
            proxy_cert_seconds: 86400,
            snapshot_every: 20_000,
            autopilot_dead_voter_seconds: 0,
            autopilot_min_voters: 3,
        }
    }
}

impl ControlConfig {
    /// Reads and checks a `control.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, false)
    }

    /// The settings `trellis dev` starts from: plaintext and no authentication on loopback.
    pub fn dev() -> Self {
        Self {
            tls: false,
            auth: AuthMode::None,
            ..Self::default()
        }
    }

    /// Reads a `control.toml` for `trellis dev`: keys the file leaves out take
    /// [`ControlConfig::dev`]'s values.
    pub fn load_dev(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, true)
    }

    fn load_with(path: &Path, dev: bool) -> Result<Self, ConfigError> {
        let text = super::read_text(path)?;
        let parse_error = |e| super::parse_error(path, e);
        let cfg: ControlConfig = if dev {
            let mut table: toml::Table = toml::from_str(&text).map_err(parse_error)?;
            table.entry("tls").or_insert(toml::Value::Boolean(false));
            table
                .entry("auth")
                .or_insert(toml::Value::String("none".into()));
            toml::Value::Table(table).try_into().map_err(parse_error)?
        } else {
            toml::from_str(&text).map_err(parse_error)?
        };
        cfg.check().map_err(|problems| ConfigError::Invalid {
            path: path.into(),
            problems,
        })?;
        Ok(cfg)
    }

    /// Every problem with the settings, each naming its key.
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        // Without TLS and SigV4 the API trusts every caller: keep it off the network.
        if !(self.api_addr.ip().is_loopback() || self.tls && self.auth == AuthMode::Sigv4) {
            problems.push(format!(
                "api_addr: must be a loopback address unless tls = true and auth = \"sigv4\", got {}",
                self.api_addr
            ));
        }
        let domain_ok = !self.trust_domain.is_empty()
            && self.trust_domain.len() <= 255
            && self.trust_domain.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            });
        if !domain_ok {
            problems.push(format!(
                "trust_domain: must be lower-case letters, digits, '.', '-' or '_', got {:?}",
                self.trust_domain
            ));
        }
        if !(10..=3600).contains(&self.sigv4_max_skew_seconds) {
            problems.push(format!(
                "sigv4_max_skew_seconds: must be between 10 and 3600, got {}",
                self.sigv4_max_skew_seconds
            ));
        }
        if !(10..=365 * 86400).contains(&self.proxy_cert_seconds) {
            problems.push(format!(
                "proxy_cert_seconds: must be between 10 and 31536000 (a year), got {}",
                self.proxy_cert_seconds
            ));
        }
        if !(3..=3600).contains(&self.lease_seconds) {
            problems.push(format!(
                "lease_seconds: must be between 3 and 3600, got {}",
                self.lease_seconds
            ));
        }
        if self.dns_ttl > 3600 {
            problems.push(format!(
                "dns_ttl: must be at most 3600 seconds, got {}",
                self.dns_ttl
            ));
        }
        if !(100..=1_000_000).contains(&self.snapshot_every) {
            problems.push(format!(
                "snapshot_every: must be between 100 and 1000000 entries, got {}",
                self.snapshot_every
            ));
        }
        if self.autopilot_min_voters == 0 {
            problems.push("autopilot_min_voters: must be at least 1".to_string());
        }
        if self.node_id == 0 {
            problems.push("node_id: must be at least 1".to_string());
        }
        if self.account_id.len() != 12 || !self.account_id.chars().all(|c| c.is_ascii_digit()) {
            problems.push(format!(
                "account_id: must be 12 digits, got {:?}",
                self.account_id
            ));
        }
        if self.region.is_empty()
            || !self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            problems.push(format!(
                "region: must look like us-east-1, got {:?}",
                self.region
            ));
        }
        if !matches!(self.bootstrap_expect, 1..=7) {
            problems.push(format!(
                "bootstrap_expect: must be between 1 and 7 (3 or 5 for a cluster), got {}",
                self.bootstrap_expect
            ));
        }
        if self.bootstrap_expect > 1 && self.retry_join.is_empty() {
            problems.push(format!(
                "retry_join: bootstrap_expect = {} needs the peers' gRPC addresses to find them",
                self.bootstrap_expect
            ));
        }
        for (i, peer) in self.retry_join.iter().chain(self.join.iter()).enumerate() {
            let key = if i < self.retry_join.len() {
                format!("retry_join[{i}]")
            } else {
                "join".to_string()
            };
            if !peer.contains(':')
                || peer
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .is_none()
            {
                problems.push(format!(
                    "{key}: must be host:port of a peer's gRPC listener, got {peer:?}"
                ));
            }
        }
        if self.ca_cert_file.is_some() != self.ca_key_file.is_some() {
            problems.push(
                "ca_cert_file, ca_key_file: give both (the cluster CA's certificate and key) or neither"
                    .to_string(),
            );
        }
        let clustered =
            self.bootstrap_expect > 1 || !self.retry_join.is_empty() || self.join.is_some();
        if self.tls && clustered && self.ca_cert_file.is_none() {
            problems.push(
                "ca_cert_file: a cluster with tls = true needs the cluster CA on every node \
                 (make it once with `trellis ca create --out DIR`)"
                    .to_string(),
            );
        }
        let q = &self.quotas;
        for (key, v) in [
            ("quotas.meshes", q.meshes),
            ("quotas.virtual_nodes_per_mesh", q.virtual_nodes_per_mesh),
            (
                "quotas.virtual_services_per_mesh",
                q.virtual_services_per_mesh,
            ),
            (
                "quotas.virtual_routers_per_mesh",
                q.virtual_routers_per_mesh,
            ),
            (
                "quotas.routes_per_virtual_router",
                q.routes_per_virtual_router,
            ),
            (
                "quotas.virtual_gateways_per_mesh",
                q.virtual_gateways_per_mesh,
            ),
            (
                "quotas.gateway_routes_per_virtual_gateway",
                q.gateway_routes_per_virtual_gateway,
            ),
            (
                "quotas.backends_per_virtual_node",
                q.backends_per_virtual_node,
            ),
        ] {
            if v == 0 {
                problems.push(format!("{key}: must be at least 1"));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            problems.push(format!("log: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/control.toml");
        let cfg = ControlConfig::load(&path).unwrap();
        assert_eq!(cfg.quotas, Quotas::default());
    }

    #[test]
    fn problems_name_their_keys() {
        let cfg = ControlConfig {
            account_id: "12".into(),
            node_id: 0,
            ..Default::default()
        };
        let e = cfg.check().unwrap_err();
        assert!(e.contains("account_id: must be 12 digits"), "{e}");
        assert!(e.contains("node_id: must be at least 1"), "{e}");
        let e = toml::from_str::<ControlConfig>("api_adr = '1'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("api_adr"), "{e}");
    }
}
