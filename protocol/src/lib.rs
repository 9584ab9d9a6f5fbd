//! settlegate-protocol: the binary wire protocol of `docs/PROTOCOL.md`.
//!
//! - [`frame`]: the 28-byte header and frame validation (pure, no I/O);
//! - [`wire`]: bounds-checked body reading and writing;
//! - [`messages`]: typed requests and responses;
//! - [`client`]: an async, pipelined client for processors and the load generator;
//! - [`threads`]: single-threaded runtimes on threads of their own, for connections that stay
//!   on one thread (the server's connection threads, the load generator's lanes).
#![deny(missing_docs)]

pub mod client;
pub mod frame;
pub mod messages;
pub mod threads;
pub mod wire;

pub use client::{Client, ClientError};
pub use frame::{Frame, FrameError};
pub use messages::{opcode, status, DecodeError, Reply, Request, Response, ServerInfo};
