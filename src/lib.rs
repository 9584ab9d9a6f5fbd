//! settlegate: the server around `settlegate-engine`.
//!
//! Layers, from the socket inwards (mini-redis style): [`server`] accepts and caps connections;
//! [`connection`] turns bytes into frames and frames into batches; [`handler`] checks
//! permissions and calls the engine; `settlegate-protocol` holds the pure codec. [`http`]
//! serves metrics and health; [`config`] reads the TOML file.
#![deny(missing_docs)]

pub mod config;
pub mod connection;
pub mod demo;
pub mod handler;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod outbox;
pub mod server;
pub mod tls;
