//! The data-plane proxy for one virtual node or virtual gateway: `discovery` (its only link to
//! the control plane), `identity` (its certificate), `health` (the local app's checks), `admin`
//! (its admin server), `stats` and `access` (metrics and access logs on the request path), and the
//! request path: `dataplane` (listeners and the compiled routing), `outbound` (route, target,
//! retries), `inbound` (mTLS, access, pools), `tunnel` (upgrades, TCP, CONNECT), `route`,
//! `balance`, `outlier`, `retry`, `tls`, `upstream` and `pool` (connection pools), `local_reply`
//! (the proxy's own answers, remade for gRPC callers), `shard` (the
//! threads connections are served on), `timer` (hyper's timer, with slack) and `trim` (memory
//! given back when idle).

pub mod access;
pub mod admin;
pub mod balance;
pub mod dataplane;
pub mod discovery;
pub mod drain;
pub mod fuzz;
pub mod gateway;
pub mod gateway_tls;
pub mod guard;
pub mod h1chunk;
pub mod h1client;
pub mod h1response;
pub mod h1server;
pub mod h2server;
pub mod h2stream;
pub mod health;
pub mod identity;
pub mod idle;
pub mod inbound;
pub mod local_reply;
pub mod outbound;
pub mod outlier;
pub mod pool;
pub mod replay;
pub mod retry;
pub mod route;
pub mod shard;
pub mod stats;
pub mod timer;
pub mod tls;
pub mod trim;
pub mod tunnel;
pub mod upstream;

use std::collections::{HashMap, HashSet};

/// A map looked up on every request (routing tables, pools, per-caller counters). foldhash
/// instead of SipHash: SipHash was about 2 % of each proxy's instructions per request. Keys come
/// from the config (addresses, service names, peer identities); a caller's Host or identity only
/// looks them up, so there are no attacker-chosen inserts to collide.
pub type RequestMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A set looked up on every request; see [`RequestMap`].
pub type RequestSet<K> = HashSet<K, foldhash::fast::RandomState>;
