//! App Mesh's resources and the rules they obey, with no I/O: the generated 2019-01-25 shapes,
//! field-path validation, App Mesh's cross-field rules, ARNs, quotas, the replicated commands and
//! the state machine that applies them. Everything else in trellis builds on these types.

pub mod access_log;
pub mod command;
pub mod compile;
pub mod error;
pub mod grpc;
pub mod proxy_config;
pub mod quota;
pub mod registry;
pub mod resource;
pub mod rules;
pub mod security;
pub mod shapes;
pub mod state;
pub mod validate;
pub mod vip;

pub use command::{Command, Outcome};
pub use error::{ApiError, ErrorKind};
pub use quota::Quotas;
pub use resource::{Owner, Record, ResourceKey, ResourceKind, Spec};
pub use state::MeshState;

#[cfg(test)]
mod tests;
