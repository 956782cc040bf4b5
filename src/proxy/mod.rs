//! The data-plane proxy for one virtual node or virtual gateway. So far: `discovery`, its only
//! link to the control plane (the config stream, with an on-disk cache), and `health`, the
//! local app's health checks that the stream reports. Listeners, routing and
//! the rest of the request path come with the proxy issue.

pub mod balance;
pub mod dataplane;
pub mod discovery;
pub mod health;
pub mod identity;
pub mod route;
pub mod upstream;
