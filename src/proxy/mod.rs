//! The data-plane proxy for one virtual node or virtual gateway. So far: `discovery`, its only
//! link to the control plane (the config stream, with an on-disk cache). Listeners, routing and
//! the rest of the request path come with the proxy issue.

pub mod discovery;
