//! App Mesh's default service quotas, configurable per cluster.

use serde::{Deserialize, Serialize};

use super::resource::ResourceKind;

/// Limits answered with LimitExceededException. Defaults are App Mesh's Service Quotas defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// Meshes per account (App Mesh L-AC861A39).
    pub meshes: usize,
    /// Virtual nodes per mesh (L-E043DFB4).
    pub virtual_nodes_per_mesh: usize,
    /// Virtual services per mesh (L-DA7495A7).
    pub virtual_services_per_mesh: usize,
    /// Virtual routers per mesh (L-50F6C35A).
    pub virtual_routers_per_mesh: usize,
    /// Routes per virtual router (L-BB90B7FF).
    pub routes_per_virtual_router: usize,
    /// Virtual gateways per mesh (L-87E74146).
    pub virtual_gateways_per_mesh: usize,
    /// Gateway routes per virtual gateway (L-F6F26D09).
    pub gateway_routes_per_virtual_gateway: usize,
    /// Backends per virtual node (L-8775AB18).
    pub backends_per_virtual_node: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            meshes: 15,
            virtual_nodes_per_mesh: 200,
            virtual_services_per_mesh: 200,
            virtual_routers_per_mesh: 200,
            routes_per_virtual_router: 50,
            virtual_gateways_per_mesh: 3,
            gateway_routes_per_virtual_gateway: 10,
            backends_per_virtual_node: 50,
        }
    }
}

impl Quotas {
    /// How many resources of `kind` one parent may hold, with the quota's App Mesh name.
    pub fn limit(&self, kind: ResourceKind) -> (usize, &'static str) {
        match kind {
            ResourceKind::Mesh => (self.meshes, "meshes per account"),
            ResourceKind::VirtualNode => (self.virtual_nodes_per_mesh, "virtual nodes per mesh"),
            ResourceKind::VirtualService => {
                (self.virtual_services_per_mesh, "virtual services per mesh")
            }
            ResourceKind::VirtualRouter => {
                (self.virtual_routers_per_mesh, "virtual routers per mesh")
            }
            ResourceKind::Route => (self.routes_per_virtual_router, "routes per virtual router"),
            ResourceKind::VirtualGateway => {
                (self.virtual_gateways_per_mesh, "virtual gateways per mesh")
            }
            ResourceKind::GatewayRoute => (
                self.gateway_routes_per_virtual_gateway,
                "gateway routes per virtual gateway",
            ),
        }
    }
}
