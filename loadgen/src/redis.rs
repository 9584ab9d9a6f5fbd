//! The baseline: Redis `SET` of 100-byte values over RESP, with the same connections, depth,
//! durations and loop as a settlegate run, so a run can be set beside a reference server's.
//!
//! The open loop (`--rate`) and the closed loop in batches (the default, `redis-benchmark -P`'s
//! way) run through lanes ([`crate::lanes`]), exactly as settlegate runs do: the same schedule,
//! the same timing, the same client cost. The `window` closed loop runs each SET as its own
//! request on a pipelined connection whose replies are matched in order, like settlegate's
//! protocol client.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use settlegate_protocol::ClientError;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::driver::{drive, ClosedLoop, Execute, Live, Plan};
use crate::lanes::{self, Found, Wire};
use crate::tally::{Outcome, Tally};

/// Bytes of each value.
const VALUE_LEN: usize = 100;
/// Most bytes the open-loop writer gathers into one write.
const WRITE_BATCH_MAX: usize = 256 * 1024;

/// Runs the baseline against the Redis at `addr`: through lanes ([`crate::lanes`]) in the
/// open loop and the batch closed loop, as settlegate runs go; through the per-request driver
/// for `--closed-loop window`.
pub async fn baseline(addr: &str, plan: Arc<Plan>, live: Arc<Live>) -> anyhow::Result<Tally> {
    let value = "v".repeat(VALUE_LEN);
    if plan.closed_loop == Some(ClosedLoop::Window) {
        let mut connections = Vec::with_capacity(plan.connections);
        for _ in 0..plan.connections {
            connections.push(RespConnection::connect(addr).await?);
        }
        let workload = Arc::new(RedisSet { connections, value });
        return Ok(drive(workload, plan, live).await);
    }
    lanes::drive(Arc::new(RespWire { value }), plan, live, || connect(addr)).await
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A RESP `SET key value` command.
pub fn resp_set(key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    resp_set_into(&mut out, key, value);
    out
}

/// Appends a RESP `SET key value` command to `out`.
fn resp_set_into(out: &mut Vec<u8>, key: &str, value: &str) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
        key.len(),
        value.len()
    );
}

/// Redis SET over RESP for a lane: answers come in order, one line each.
struct RespWire {
    value: String,
}

/// A slot's connection, its key prefix and counter, and the key being built.
struct RespSlot {
    connection: usize,
    prefix: String,
    next: u64,
    key: String,
}

impl RespSlot {
    fn new(connection: usize, slot: usize) -> RespSlot {
        let prefix = format!("lg:{connection}:{slot}:");
        RespSlot { connection, prefix, next: 0, key: String::new() }
    }

    /// The slot's next key: every SET writes a new one.
    fn next_key(&mut self) -> &str {
        use std::fmt::Write as _;
        self.next += 1;
        self.key.clear();
        let _ = write!(self.key, "{}{}", self.prefix, self.next);
        &self.key
    }
}

impl Wire for RespWire {
    type Slot = RespSlot;

    fn slot(&self, connection: usize, slot: usize) -> RespSlot {
        RespSlot::new(connection, slot)
    }

    fn encode(&self, _op: usize, slot: &mut RespSlot, _id: u64, out: &mut Vec<u8>) -> u16 {
        resp_set_into(out, slot.next_key(), &self.value);
        0
    }

    type Answer<'a> = &'a [u8];

    fn split<'a>(&self, input: &'a [u8]) -> Result<Option<Found<&'a [u8]>>, ClientError> {
        let line = input.windows(2).position(|w| w == b"\r\n");
        Ok(line.map(|at| Found { id: None, len: at + 2, answer: &input[..at + 2] }))
    }

    fn judge(&self, _op: usize, _tag: u16, answer: &[u8]) -> Outcome {
        if answer == b"+OK\r\n" {
            Outcome::Ok
        } else {
            Outcome::Error("redis error reply".into())
        }
    }
}

/// Reply waiters in send order, and the writer's queue.
type Sending = (VecDeque<oneshot::Sender<bool>>, mpsc::UnboundedSender<Vec<u8>>);

/// A pipelined RESP connection: commands go out in order through one writer task, and the
/// reader answers the oldest waiter with each reply line (SET replies are one line).
struct RespConnection {
    /// Waiters in send order, and the writer's queue: pushed together under the lock so the
    /// order of the queue is the order of the waiters.
    sending: Mutex<Sending>,
}

impl RespConnection {
    async fn connect(addr: &str) -> anyhow::Result<Arc<RespConnection>> {
        let (read_half, mut write_half) = connect(addr).await?.into_split();
        let (outgoing, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        let connection =
            Arc::new(RespConnection { sending: Mutex::new((VecDeque::new(), outgoing)) });
        tokio::spawn(async move {
            let mut buffer = Vec::with_capacity(64 * 1024);
            while let Some(first) = queue.recv().await {
                buffer.clear();
                buffer.extend_from_slice(&first);
                while buffer.len() < WRITE_BATCH_MAX {
                    match queue.try_recv() {
                        Ok(more) => buffer.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if write_half.write_all(&buffer).await.is_err() {
                    return;
                }
            }
        });
        let reader = Arc::downgrade(&connection);
        tokio::spawn(async move {
            let mut lines = BufReader::new(read_half).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(connection) = reader.upgrade() else { return };
                let waiter = connection.sending.lock().expect("lock").0.pop_front();
                if let Some(waiter) = waiter {
                    let _ = waiter.send(line == "+OK");
                }
            }
            // Closed: dropping the waiters tells every caller.
            if let Some(connection) = reader.upgrade() {
                connection.sending.lock().expect("lock").0.clear();
            }
        });
        Ok(connection)
    }

    async fn send(&self, command: Vec<u8>) -> Outcome {
        let (reply, answer) = oneshot::channel();
        {
            let mut sending = self.sending.lock().expect("lock");
            if sending.1.send(command).is_err() {
                return Outcome::Error("connection closed".into());
            }
            sending.0.push_back(reply);
        }
        match answer.await {
            Ok(true) => Outcome::Ok,
            Ok(false) => Outcome::Error("redis error reply".into()),
            Err(_) => Outcome::Error("connection closed".into()),
        }
    }
}

/// The open-loop Redis workload: one operation, SET.
struct RedisSet {
    connections: Vec<Arc<RespConnection>>,
    value: String,
}

impl Execute for RedisSet {
    type Slot = RespSlot;

    fn slot(&self, connection: usize, slot: usize) -> RespSlot {
        RespSlot::new(connection, slot)
    }

    fn execute<'a>(
        &'a self,
        _op: usize,
        slot: &'a mut RespSlot,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        let connection = &self.connections[slot.connection];
        connection.send(resp_set(slot.next_key(), &self.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt as _;

    /// How long the tests wait for a fake Redis.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn resp_set_is_well_formed() {
        assert_eq!(resp_set("k1", "vv"), b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$2\r\nvv\r\n".to_vec());
    }

    /// A fake Redis answering `+OK` to every command (counting `*3` headers), and `-ERR` to
    /// every tenth.
    async fn fake_redis() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64 * 1024];
                    let mut seen = 0u64;
                    let mut carry = Vec::new();
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 {
                            return;
                        }
                        carry.extend_from_slice(&buffer[..n]);
                        let mut replies = Vec::new();
                        while let Some(at) = carry.windows(4).position(|w| w == b"SET\r") {
                            carry.drain(..at + 4);
                            seen += 1;
                            replies.extend_from_slice(if seen.is_multiple_of(10) {
                                b"-ERR x\r\n"
                            } else {
                                b"+OK\r\n"
                            });
                        }
                        if stream.write_all(&replies).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn open_loop_baseline_matches_replies_in_order() {
        let addr = fake_redis().await;
        let plan = Arc::new(Plan {
            connections: 2,
            pipeline: 4,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(300),
            rate_per_s: Some(1_000.0),
            pacing: crate::driver::Pacing::Spin,
            closed_loop: None,
            timeout: Duration::from_secs(5),
            seed: 1,
            weights: vec![1],
        });
        let run = baseline(&addr, plan, Arc::default());
        let tally = tokio::time::timeout(TEST_TIMEOUT, run).await.unwrap().unwrap();
        let op = &tally.ops[0];
        let errors = op.errors.get("redis error reply").copied().unwrap_or(0);
        let total = op.corrected_us.len() + errors;
        // 300 due; a loaded machine may leave a few unsent at the end.
        assert!((100..=300).contains(&total), "{total}");
        // Every tenth reply of each connection is an error, and each reply reached its caller.
        assert!(errors + 2 >= total / 10 && errors <= total / 10, "{errors} of {total}");
    }
}
