//! The gRPC contract between proxies and control nodes (generated from proto/ at build time) and
//! its conversion to and from the model.

#[allow(clippy::all, clippy::pedantic)]
pub mod discovery {
    tonic::include_proto!("trellis.discovery.v1");
}

/// Proxy certificates: a join token or the current certificate, and a CSR.
#[allow(clippy::all, clippy::pedantic)]
pub mod identity {
    tonic::include_proto!("trellis.identity.v1");
}

/// Control node to control node: raft RPCs and cluster operations, JSON inside.
#[allow(clippy::all, clippy::pedantic)]
pub mod cluster {
    tonic::include_proto!("trellis.cluster.v1");
}

/// The gRPC Health Checking Protocol, which `grpc` health checks speak to the app.
#[allow(clippy::all, clippy::pedantic)]
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// `trellis echo`'s streaming service (bidirectional and client streaming).
#[allow(clippy::all, clippy::pedantic)]
pub mod echo {
    tonic::include_proto!("trellis.echo.v1");
}

/// OpenTelemetry's OTLP/gRPC trace export (the subset trellis sends), for spans of proxied
/// requests.
#[allow(clippy::all, clippy::pedantic)]
pub mod otlp {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.common.v1");
        }
    }
    pub mod resource {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.resource.v1");
        }
    }
    pub mod trace {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.trace.v1");
        }
    }
    pub mod collector {
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
            }
        }
    }
}

use crate::model::proxy_config::{ProxyConfig, ProxyRole};

/// A config message body could not be read.
#[derive(Debug, thiserror::Error)]
#[error("config version {version}: {message}")]
pub struct DecodeError {
    pub version: u64,
    pub message: String,
}

pub fn decode_config(c: &discovery::Config) -> Result<ProxyConfig, DecodeError> {
    serde_json::from_slice(&c.config_json).map_err(|e| DecodeError {
        version: c.version,
        message: e.to_string(),
    })
}

/// The role a hello names, or `None` when it names neither a node nor a gateway.
pub fn hello_role(h: &discovery::Hello) -> Option<ProxyRole> {
    match &h.role {
        Some(discovery::hello::Role::VirtualNode(n)) => Some(ProxyRole::VirtualNode(n.clone())),
        Some(discovery::hello::Role::VirtualGateway(g)) => {
            Some(ProxyRole::VirtualGateway(g.clone()))
        }
        None => None,
    }
}

pub fn role_to_hello(role: &ProxyRole) -> discovery::hello::Role {
    match role {
        ProxyRole::VirtualNode(n) => discovery::hello::Role::VirtualNode(n.clone()),
        ProxyRole::VirtualGateway(g) => discovery::hello::Role::VirtualGateway(g.clone()),
    }
}
