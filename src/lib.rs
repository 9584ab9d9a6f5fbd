//! settlegate: the server around `settlegate-engine`.
//!
//! Layers, from the socket inwards (mini-redis style): [`server`] accepts and caps connections;
//! [`connection`] turns bytes into frames and frames into batches; [`ops`] checks each
//! operation's permission and calls the engine, mapping the wire's types to the engine's
//! ([`wire_map`]); [`handler`] holds what they share and the batched authorizations;
//! `settlegate-protocol` holds the pure codec. [`http`]
//! serves metrics and health; [`config`] reads the TOML file.
#![deny(missing_docs)]

pub mod config;
pub mod connection;
pub mod demo;
pub mod handler;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod outbox;
pub mod report;
pub mod route;
pub mod server;
pub mod tls;
pub mod wire_map;
