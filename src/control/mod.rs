//! A control-plane node: raft consensus over the sled store, and the App Mesh REST API served
//! from the applied state. TLS, SigV4, DNS and config push attach here in later issues.

pub mod api;
pub mod dns;
pub mod node;
pub mod raft;
pub mod store;
pub mod xds;
