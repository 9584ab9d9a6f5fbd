//! A client of a settlegate cluster: it follows `MOVED` to the partition's owner, and on a
//! connection lost, `SHUTTING_DOWN` or `BUSY` sends the same request again (to another node
//! where that helps) until it gets an answer or its patience runs out.
//!
//! Sending a request again is safe because every request that changes state carries a client
//! request ID: a request the old owner recorded is answered with its first outcome by the new
//! owner (`docs/CLUSTER.md`, "What a client sees").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{Client, ClientError};
use crate::messages::{Request, Response};

/// How a [`ClusterClient`] retries.
#[derive(Debug, Clone)]
pub struct Patience {
    /// How long one request may take, retries and moves included.
    pub total: Duration,
    /// The pause before trying again after a failure (doubled up to 16 times that).
    pub backoff: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience { total: Duration::from_secs(30), backoff: Duration::from_millis(20) }
    }
}

/// A client of a cluster's nodes (or of one router): one connection per node, made when first
/// needed and authenticated with the client's API key.
pub struct ClusterClient {
    seeds: Vec<SocketAddr>,
    key: String,
    patience: Patience,
    connections: Mutex<HashMap<SocketAddr, Arc<Client>>>,
    /// The node that answered last: tried first.
    preferred: Mutex<SocketAddr>,
}

impl ClusterClient {
    /// A client of the nodes at `seeds` (at least one), authenticating with `key`.
    pub fn new(seeds: Vec<SocketAddr>, key: &str, patience: Patience) -> ClusterClient {
        assert!(!seeds.is_empty(), "a cluster client needs at least one node address");
        let preferred = Mutex::new(seeds[0]);
        ClusterClient {
            seeds,
            key: key.to_owned(),
            patience,
            connections: Mutex::default(),
            preferred,
        }
    }

    async fn connection(&self, addr: SocketAddr) -> Result<Arc<Client>, ClientError> {
        if let Some(client) = self.connections.lock().expect("connections lock").get(&addr) {
            return Ok(Arc::clone(client));
        }
        let connect = tokio::time::timeout(Duration::from_secs(2), Client::connect(addr));
        let client = match connect.await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(ClientError::Closed(error.to_string())),
            Err(_) => return Err(ClientError::Closed(format!("connecting to {addr} timed out"))),
        };
        match client.authenticate(&self.key).await {
            Ok(()) => {}
            // A node (or a router) that cannot serve now: like a lost connection, try again.
            Err(ClientError::Unexpected(response))
                if matches!(*response, Response::ShuttingDown | Response::Busy { .. }) =>
            {
                return Err(ClientError::Closed(format!("{addr} answered AUTH {response:?}")))
            }
            Err(error) => return Err(error),
        }
        let client = Arc::new(client);
        self.connections.lock().expect("connections lock").insert(addr, Arc::clone(&client));
        Ok(client)
    }

    fn forget(&self, addr: SocketAddr) {
        self.connections.lock().expect("connections lock").remove(&addr);
    }

    /// The node after `addr` among the seeds.
    fn next_seed(&self, addr: SocketAddr) -> SocketAddr {
        let at = self.seeds.iter().position(|s| *s == addr).map_or(0, |i| i + 1);
        self.seeds[at % self.seeds.len()]
    }

    /// Sends `request` until a node answers it with anything but `MOVED`, `BUSY` or
    /// `SHUTTING_DOWN`, or the patience runs out (then the last error, or the last answer).
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let started = Instant::now();
        let mut target = *self.preferred.lock().expect("preferred lock");
        let mut pause = self.patience.backoff;
        let mut moves = 0;
        loop {
            let outcome = match self.connection(target).await {
                Ok(client) => client.call(request).await,
                Err(error) => Err(error),
            };
            let retry = match &outcome {
                Ok(Response::Moved { address, .. }) => match address.parse::<SocketAddr>() {
                    // Straight to the owner, unless moves go round in circles.
                    Ok(owner) => {
                        target = owner;
                        moves += 1;
                        moves > 3
                    }
                    Err(_) => {
                        target = self.next_seed(target);
                        true
                    }
                },
                Ok(Response::Busy { retry_after_ms }) => {
                    tokio::time::sleep(Duration::from_millis((*retry_after_ms).into())).await;
                    false
                }
                Ok(Response::ShuttingDown) | Err(ClientError::Closed(_)) => {
                    self.forget(target);
                    target = self.next_seed(target);
                    true
                }
                Ok(_) | Err(_) => {
                    *self.preferred.lock().expect("preferred lock") = target;
                    return outcome;
                }
            };
            if started.elapsed() >= self.patience.total {
                return outcome;
            }
            if retry {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(self.patience.backoff * 16);
            }
        }
    }
}
