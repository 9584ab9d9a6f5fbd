//! settlegate-protocol: the binary wire protocol of `docs/PROTOCOL.md`.
//!
//! - [`frame`]: the 28-byte header and frame validation (pure, no I/O);
//! - [`wire`]: bounds-checked body reading and writing;
//! - [`ops`]: one file per operation, its request and reply types and their encodings, and
//!   the dispatch tables generated from the list of operations;
//! - [`values`]: the wire values several operations share;
//! - [`messages`]: statuses, [`Response`], and every wire type by name;
//! - [`client`]: an async, pipelined client for processors and the load generator;
//! - [`threads`]: single-threaded runtimes on threads of their own, for connections that stay
//!   on one thread (the server's connection threads, the load generator's lanes).
//!
//! The codec depends on `settlegate-types` only, not on the engine: the server maps the wire's
//! types to the engine's.
#![deny(missing_docs)]

pub mod client;
pub mod cluster_client;
pub mod frame;
pub mod messages;
pub mod ops;
pub mod threads;
pub mod values;
pub mod wire;

pub use client::{Client, ClientError};
pub use cluster_client::{ClusterClient, Patience};
pub use frame::{Frame, FrameError};
pub use messages::{opcode, status, DecodeError, Reply, Request, Response, ServerInfo};
pub use ops::Operation;
pub use settlegate_types as types;
