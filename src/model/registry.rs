//! Registered proxy instances: a proxy registers itself when it connects (mesh, virtual node or
//! gateway, advertised address), heartbeats keep it, and it expires after its lease when the
//! proxy goes away. Updates arrive in batches (one replicated command per batch, however many
//! proxies), each carrying the proposer's clock so expiry is the same on every node.

use std::collections::{BTreeMap, BTreeSet};
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
#[serde(from = "StoredRegistry")]
pub struct Registry {
    instances: BTreeMap<String, Instance>,
    /// Proxy ids by (mesh, role): compiling a config looks up two or three roles among
    /// thousands of instances, for every proxy, on every change.
    #[serde(skip)]
    by_role: BTreeMap<(String, ProxyRole), BTreeSet<String>>,
}

/// What snapshots keep of a [`Registry`]; the index is rebuilt.
#[derive(Deserialize)]
struct StoredRegistry {
    instances: BTreeMap<String, Instance>,
}

impl From<StoredRegistry> for Registry {
    fn from(stored: StoredRegistry) -> Self {
        let mut r = Registry::default();
        for i in stored.instances.into_values() {
            r.insert(i);
        }
        r
    }
}

impl Registry {
    fn insert(&mut self, i: Instance) -> Option<Instance> {
        let key = (i.mesh.clone(), i.role.clone());
        let id = i.proxy_id.clone();
        let old = self.instances.insert(id.clone(), i);
        if let Some(o) = &old {
            self.unindex(o);
        }
        self.by_role.entry(key).or_default().insert(id);
        old
    }

    fn remove(&mut self, proxy_id: &str) -> Option<Instance> {
        let old = self.instances.remove(proxy_id)?;
        self.unindex(&old);
        Some(old)
    }

    fn unindex(&mut self, i: &Instance) {
        let key = (i.mesh.clone(), i.role.clone());
        if let Some(ids) = self.by_role.get_mut(&key) {
            ids.remove(&i.proxy_id);
            if ids.is_empty() {
                self.by_role.remove(&key);
            }
        }
    }

    /// Applies a batch; returns whether anything that callers can see changed (an instance came,
    /// went, moved or changed health), as opposed to a mere lease renewal.
    pub fn apply(&mut self, u: &RegistryUpdate) -> bool {
        let mut visible = false;
        for i in &u.upserts {
            match self.insert(i.clone()) {
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
            visible |= self.remove(id).is_some();
        }
        let expired: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.expires_at < u.now)
            .map(|i| i.proxy_id.clone())
            .collect();
        for id in &expired {
            self.remove(id);
        }
        visible || !expired.is_empty()
    }

    /// The healthy instances serving `role` in `mesh`, in proxy-id order.
    pub fn healthy<'a>(
        &'a self,
        mesh: &str,
        role: &ProxyRole,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        self.by_role
            .get(&(mesh.to_string(), role.clone()))
            .into_iter()
            .flatten()
            .filter_map(|id| self.instances.get(id))
            .filter(|i| i.healthy)
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
        let restored: Registry = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(restored, r, "a snapshot rebuilds the index");
        assert!(r.apply(&batch(16.0, vec![], vec![])), "b's lease ended");
        assert_eq!(r.len(), 1);
        // Moving to another node moves it in the index.
        r.apply(&batch(
            16.5,
            vec![inst("a", "blue", "127.0.0.2", true, 30.0)],
            vec![],
        ));
        assert_eq!(r.healthy("m", &red).count(), 0);
        let blue = ProxyRole::VirtualNode("blue".into());
        assert_eq!(r.healthy("m", &blue).count(), 1);
        assert!(r.apply(&batch(17.0, vec![], vec!["a".into()])));
        assert!(r.is_empty());
        assert!(r.by_role.is_empty());
        assert_eq!(
            inst("a", "red", "::1", true, 0.0)
                .endpoint()
                .address
                .to_string(),
            "[::1]:15000"
        );
    }
}
