//! Registered proxy instances: a proxy registers itself when it connects (mesh, virtual node or
//! gateway, advertised address), heartbeats keep it, and it expires after its lease when the
//! proxy goes away. Updates arrive in batches (one replicated command per batch, however many
//! proxies), each carrying the proposer's clock so expiry is the same on every node.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::proxy_config::{Endpoint, ProxyRole};

/// One running proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique per proxy process.
    pub proxy_id: String,
    pub mesh: String,
    pub role: ProxyRole,
    /// Where peers reach the proxy's inbound listener.
    pub address: IpAddr,
    pub inbound_port: u16,
    /// Whether the local app passes its listener health checks.
    pub healthy: bool,
    /// Epoch seconds after which the instance is gone unless renewed.
    pub expires_at: f64,
}

impl Instance {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            address: SocketAddr::new(self.address, self.inbound_port),
        }
    }
}

/// One batch of registry changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryUpdate {
    /// Epoch seconds on the proposing node; instances whose lease ended before it expire.
    pub now: f64,
    /// New or renewed instances (by `proxy_id`).
    pub upserts: Vec<Instance>,
    /// Proxies that said goodbye.
    pub removals: Vec<String>,
}

/// The instances of every mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    instances: BTreeMap<String, Instance>,
}

impl Registry {
    /// Applies a batch; returns whether anything that callers can see changed (an instance came,
    /// went, moved or changed health), as opposed to a mere lease renewal.
    pub fn apply(&mut self, u: &RegistryUpdate) -> bool {
        let mut visible = false;
        for i in &u.upserts {
            match self.instances.insert(i.proxy_id.clone(), i.clone()) {
                Some(old) => {
                    visible |= old.address != i.address
                        || old.inbound_port != i.inbound_port
                        || old.healthy != i.healthy
                        || old.role != i.role
                        || old.mesh != i.mesh
                }
                None => visible = true,
            }
        }
        for id in &u.removals {
            visible |= self.instances.remove(id).is_some();
        }
        let before = self.instances.len();
        self.instances.retain(|_, i| i.expires_at >= u.now);
        visible || self.instances.len() != before
    }

    /// The healthy instances serving `role` in `mesh`, in address order.
    pub fn healthy<'a>(
        &'a self,
        mesh: &'a str,
        role: &'a ProxyRole,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances
            .values()
            .filter(move |i| i.healthy && i.mesh == mesh && i.role == *role)
    }

    pub fn all(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, node: &str, ip: &str, healthy: bool, expires_at: f64) -> Instance {
        Instance {
            proxy_id: id.into(),
            mesh: "m".into(),
            role: ProxyRole::VirtualNode(node.into()),
            address: ip.parse().unwrap(),
            inbound_port: 15000,
            healthy,
            expires_at,
        }
    }

    #[test]
    fn leases_health_and_goodbyes() {
        let mut r = Registry::default();
        let red = ProxyRole::VirtualNode("red".into());
        let batch = |now, upserts, removals| RegistryUpdate {
            now,
            upserts,
            removals,
        };
        assert!(r.apply(&batch(
            0.0,
            vec![
                inst("a", "red", "127.0.0.2", true, 15.0),
                inst("b", "red", "127.0.0.3", false, 15.0)
            ],
            vec![]
        )));
        let healthy: Vec<_> = r.healthy("m", &red).map(|i| i.proxy_id.as_str()).collect();
        assert_eq!(healthy, ["a"], "unhealthy instances are not served");
        assert!(
            !r.apply(&batch(
                5.0,
                vec![inst("a", "red", "127.0.0.2", true, 20.0)],
                vec![]
            )),
            "a renewal is invisible"
        );
        assert!(r.apply(&batch(16.0, vec![], vec![])), "b's lease ended");
        assert_eq!(r.len(), 1);
        assert!(r.apply(&batch(17.0, vec![], vec!["a".into()])));
        assert!(r.is_empty());
        assert_eq!(
            inst("a", "red", "::1", true, 0.0)
                .endpoint()
                .address
                .to_string(),
            "[::1]:15000"
        );
    }
}
