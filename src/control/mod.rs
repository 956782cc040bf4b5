//! A control-plane node: raft consensus over the sled store; the App Mesh REST API (TLS, SigV4)
//! and the admin API served from the applied state; DNS; config push (`xds`); the mesh CA and
//! proxy certificates (`ca`, `certs`); the proxies' traffic summaries (`traffic`).

pub mod api;
pub mod ca;
pub mod certs;
pub mod dns;
pub mod node;
pub mod raft;
pub mod store;
pub mod traffic;
pub mod xds;
