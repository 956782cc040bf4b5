//! `proxy.toml`: the settings of one proxy (one virtual node or virtual gateway on one host),
//! every key documented here and in config/proxy.toml. Every key is also a `trellis proxy`
//! flag of the same name (`inbound_addr` is `--inbound-addr`; the two switches on by default
//! have `--no-vip-listeners` and `--no-request-metrics`); a flag given, or the environment
//! variable a flag names, overrides the file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::model::proxy_config::ProxyRole;
use crate::proxy::balance::Balancer;

/// Settings of one proxy (`trellis proxy --config proxy.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Control nodes' gRPC addresses (`host:port`), tried in turn. Required.
    pub control: Vec<String>,
    /// The mesh the proxy's virtual node or gateway belongs to. Required.
    pub mesh: String,
    /// The virtual node this proxy serves (give this or `virtual_gateway`).
    pub virtual_node: Option<String>,
    /// The virtual gateway this proxy serves (give this or `virtual_node`).
    pub virtual_gateway: Option<String>,
    /// Where the proxy keeps its key, certificate and last good config (it starts from that
    /// config when no control node answers). Required: one directory per proxy, since two
    /// sharing one would share an identity. The packaged proxy.toml says
    /// `/var/lib/trellis/proxy`.
    pub data_dir: PathBuf,
    /// The address peer proxies reach this one at (registered with the instance). Default
    /// `127.0.0.1`.
    pub advertise_addr: IpAddr,
    /// The inbound listener for peer proxies (mTLS); its port is registered with the
    /// instance. Default `0.0.0.0:15000`.
    pub inbound_addr: SocketAddr,
    /// The explicit outbound listener: apps send here with `HTTP_PROXY`, or with a Host naming
    /// a backend virtual service. `"off"` disables it. Default `127.0.0.1:15001`.
    pub outbound_addr: String,
    /// The admin server (`/ready`, `/live`, `/metrics`, `/config`, `/clusters`); keep it on
    /// loopback. `"off"` disables it. Default `127.0.0.1:9901`.
    pub admin_addr: String,
    /// The mesh CA bundle (`trellis ca show > ca.pem`): control nodes are reached over TLS and
    /// the config stream presents this proxy's certificate.
    pub ca_file: Option<PathBuf>,
    /// A join token (`trellis token create`) to buy a certificate with. It is read whenever
    /// one is bought, so a new token needs no restart; not needed while `data_dir` holds a
    /// valid certificate.
    pub token_file: Option<PathBuf>,
    /// The address the app listens on (its listener ports there); health checks and inbound
    /// requests go to it. Default `127.0.0.1`.
    pub app_host: IpAddr,
    /// Bind the backends' virtual-service VIP:ports. Off when several proxies share a host
    /// and only one may own the VIPs. Default true.
    pub vip_listeners: bool,
    /// Count requests per edge (the `trellis_proxy_requests_*` series and `trellis top`).
    /// Off is Envoy's stats reject_all. Default true.
    pub request_metrics: bool,
    /// Export a span per proxied request over OTLP/gRPC to this collector
    /// (`http://127.0.0.1:4317`). Without it, trace headers pass untouched.
    pub otlp_endpoint: Option<String>,
    /// On SIGTERM, how long requests in flight may take to finish (`10s`, `2m`). Default
    /// `10s`.
    pub drain_time: String,
    /// Threads that serve connections (Envoy's `--concurrency`), each with its own
    /// connection pools; a connection stays on one. Default: one per CPU.
    pub concurrency: Option<u16>,
    /// Where a virtual gateway's listeners are bound (their ports come from its spec).
    /// Default `0.0.0.0`.
    pub gateway_host: IpAddr,
    /// Retries may add at most this fraction of requests (the retry budget), 0 to 10.
    /// Default 0.2.
    pub retry_budget_ratio: f64,
    /// Retries always allowed per second, beside the ratio. Default 10.
    pub retry_budget_min_per_second: u32,
    /// How an endpoint of a target is chosen: `round-robin` (the default) or `p2c-ewma` (the
    /// less loaded of two drawn at random, Linkerd's balancer).
    pub balancer: Balancer,
    /// Log filter in `RUST_LOG` syntax (`RUST_LOG` in the environment overrides it); SIGHUP
    /// rereads it. Default `info`. Release builds have nothing below `debug`.
    pub log: String,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            control: Vec::new(),
            mesh: String::new(),
            virtual_node: None,
            virtual_gateway: None,
            data_dir: PathBuf::new(),
            advertise_addr: [127, 0, 0, 1].into(),
            inbound_addr: ([0, 0, 0, 0], 15000).into(),
            outbound_addr: "127.0.0.1:15001".into(),
            admin_addr: "127.0.0.1:9901".into(),
            ca_file: None,
            token_file: None,
            app_host: [127, 0, 0, 1].into(),
            vip_listeners: true,
            request_metrics: true,
            otlp_endpoint: None,
            drain_time: "10s".into(),
            concurrency: None,
            gateway_host: [0, 0, 0, 0].into(),
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 10,
            balancer: Balancer::RoundRobin,
            log: "info".into(),
        }
    }
}

impl ProxyConfig {
    /// Reads and checks a `proxy.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::read(path)?;
        cfg.check().map_err(|problems| ConfigError::Invalid {
            path: path.into(),
            problems,
        })?;
        Ok(cfg)
    }

    /// Reads a `proxy.toml` without checking it: flags may still complete it.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(&super::read_text(path)?).map_err(|e| super::parse_error(path, e))
    }

    /// Every problem with the settings, each naming its key.
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.control.is_empty() {
            problems.push(
                "control: name at least one control node's gRPC address (host:port)".to_string(),
            );
        }
        for (i, c) in self.control.iter().enumerate() {
            let port_ok = c
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                problems.push(format!(
                    "control[{i}]: must be host:port of a control node's gRPC listener, got {c:?}"
                ));
            }
        }
        if self.mesh.is_empty() {
            problems.push("mesh: required (the mesh of this proxy's virtual node)".to_string());
        }
        match (&self.virtual_node, &self.virtual_gateway) {
            (Some(_), Some(_)) => problems.push(
                "virtual_node, virtual_gateway: a proxy serves one of them, not both".to_string(),
            ),
            (None, None) => problems
                .push("virtual_node, virtual_gateway: name the one this proxy serves".to_string()),
            (Some(n), None) | (None, Some(n)) if n.is_empty() => {
                let key = if self.virtual_node.is_some() {
                    "virtual_node"
                } else {
                    "virtual_gateway"
                };
                problems.push(format!("{key}: must not be empty"));
            }
            _ => {}
        }
        if self.data_dir.as_os_str().is_empty() {
            problems.push(
                "data_dir: required (one directory per proxy: it holds the proxy's identity)"
                    .to_string(),
            );
        }
        for (key, value) in [
            ("outbound_addr", &self.outbound_addr),
            ("admin_addr", &self.admin_addr),
        ] {
            if let Err(e) = optional_addr(value) {
                problems.push(format!("{key}: {e}"));
            }
        }
        if let Err(e) = super::parse_duration(&self.drain_time) {
            problems.push(format!("drain_time: {e}"));
        }
        if !(0.0..=10.0).contains(&self.retry_budget_ratio) {
            problems.push(format!(
                "retry_budget_ratio: must be between 0 and 10, got {}",
                self.retry_budget_ratio
            ));
        }
        if let Some(n) = self.concurrency.filter(|n| !(1..=1024).contains(n)) {
            problems.push(format!("concurrency: must be between 1 and 1024, got {n}"));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            problems.push(format!(
                "otlp_endpoint: must be an http:// or https:// URL, got {e:?}"
            ));
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

    /// The virtual node or gateway served (after [`check`](Self::check)).
    pub fn role(&self) -> Option<ProxyRole> {
        match (&self.virtual_node, &self.virtual_gateway) {
            (Some(n), None) => Some(ProxyRole::VirtualNode(n.clone())),
            (None, Some(g)) => Some(ProxyRole::VirtualGateway(g.clone())),
            _ => None,
        }
    }

    /// The explicit outbound listener's address, `None` when off.
    pub fn outbound(&self) -> Option<SocketAddr> {
        optional_addr(&self.outbound_addr).ok().flatten()
    }

    /// The admin server's address, `None` when off.
    pub fn admin(&self) -> Option<SocketAddr> {
        optional_addr(&self.admin_addr).ok().flatten()
    }

    /// How long a stopping proxy lets requests finish.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(super::parse_duration(&self.drain_time).unwrap_or(10))
    }
}

/// `"off"`, or an `ip:port`.
fn optional_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    match s {
        "off" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .map_err(|e| format!("{e}: want ip:port or \"off\", got {a:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/proxy.toml");
        let cfg = ProxyConfig::load(&path).unwrap();
        assert_eq!(
            cfg.role(),
            Some(ProxyRole::VirtualNode("colorteller-red".into()))
        );
        assert_eq!(cfg.admin(), Some(([127, 0, 0, 1], 9901).into()));
        assert_eq!(cfg.drain(), Duration::from_secs(10));
    }

    #[test]
    fn problems_name_their_keys() {
        let cfg: ProxyConfig = toml::from_str(
            r#"
            control = ["nohost"]
            virtual_node = "a"
            virtual_gateway = "b"
            admin_addr = "localhost"
            drain_time = "5w"
            retry_budget_ratio = 11.0
            log = "info,[bad"
            "#,
        )
        .unwrap();
        let e = cfg.check().unwrap_err();
        for want in [
            "control[0]: must be host:port",
            "mesh: required",
            "virtual_node, virtual_gateway: a proxy serves one of them",
            "admin_addr: ",
            "drain_time: unknown unit",
            "retry_budget_ratio: must be between 0 and 10",
            "log: ",
        ] {
            assert!(e.contains(want), "{want:?} missing from {e}");
        }
        let e = toml::from_str::<ProxyConfig>("inbound_adr = '1'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("inbound_adr"), "{e}");
        let e = toml::from_str::<ProxyConfig>("balancer = 'random'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("round-robin"), "{e}");
    }

    /// Every key the struct takes, from serde's own list (deny_unknown_fields names them).
    pub(crate) fn fields() -> Vec<String> {
        let e = toml::from_str::<ProxyConfig>("not_a_key = 1")
            .unwrap_err()
            .to_string();
        let list = e.split("expected one of").nth(1).unwrap_or_default();
        list.split(',')
            .map(|f| f.trim().trim_matches('`').trim().to_string())
            .filter(|f| !f.is_empty())
            .collect()
    }

    #[test]
    fn the_shipped_example_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/proxy.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let fields = fields();
        assert!(fields.len() > 20, "{fields:?}");
        for f in &fields {
            let set = text.lines().any(|l| {
                let l = l.trim_start_matches("# ");
                l.starts_with(&format!("{f} = "))
            });
            assert!(set, "config/proxy.toml does not show `{f} = …`");
        }
    }
}
