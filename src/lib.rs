//! trellis: a self-hosted service mesh in one binary that speaks the AWS App Mesh API.
//!
//! `model` is the pure core (App Mesh resources, validation, the state machine); `control` runs
//! a control-plane node (raft, sled store, the App Mesh REST API); `config` holds node-local
//! settings. See DESIGN.md §7 for the layout and the dependency rules between modules.
#![deny(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
pub mod control;
pub mod echo;
pub mod identity;
pub mod model;
pub mod proxy;
pub mod service;
pub mod telemetry;
pub mod wire;
