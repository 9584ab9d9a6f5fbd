//! The closed loop over TCP in batches, the way the Redis baseline runs it (`redis-benchmark
//! -P`): each connection writes `--pipeline` requests in one write, reads their responses, and
//! only then writes the next batch. Every request of a batch is timed from the batch's write to
//! the arrival of the batch's last response, as the baseline times its SETs, so the two figures
//! are taken the same way.
//!
//! Only operations that are one request and one response can go in a batch
//! ([`Operation::is_single`]); a mix with `code` runs on the per-request driver instead. The
//! requests are built and their answers judged by the same functions the per-request driver
//! uses ([`Operation::request`], [`Operation::judge`]); this module only frames them and
//! matches responses to requests by request ID, on a socket of its own (the protocol
//! [`settlegate_protocol::Client`] is for one request at a time).

use std::sync::Arc;

use anyhow::{bail, Context as _};
use settlegate_protocol::frame::{self, FLAG_RESPONSE};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::ClientError;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};

use crate::driver::{count_live, Execute as _, Live, Plan};
use crate::mix::Chooser;
use crate::ops::{Operation, SlotCursor, Workload};
use crate::tally::{Outcome, Tally};

/// Runs the closed loop in batches over `plan.connections` new connections to `addr`, each
/// authenticated with `api_key`.
pub async fn drive(
    addr: &str,
    api_key: &str,
    workload: Arc<Workload>,
    plan: Arc<Plan>,
    live: Arc<Live>,
) -> anyhow::Result<Tally> {
    let mut streams = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        streams.push(connect(addr, api_key, plan.timeout).await?);
    }
    let measure_from = Instant::now() + plan.warmup;
    let window = (measure_from, measure_from + plan.duration);
    let lanes: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(c, stream)| {
            let lane = Lane { workload: workload.clone(), plan: plan.clone(), live: live.clone() };
            tokio::spawn(lane.run(stream, c, window))
        })
        .collect();
    let mut total = Tally::new(plan.weights.len());
    for lane in lanes {
        total.add(&lane.await.context("a connection task panicked")?);
    }
    Ok(total)
}

/// Opens a connection and authenticates it.
async fn connect(addr: &str, api_key: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let mut stream =
        TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut bytes = Vec::new();
    Request::Auth { key: api_key.to_owned() }.encode_frame(1, &mut bytes);
    stream.write_all(&bytes).await?;
    let mut buffer = Vec::new();
    let answer = tokio::time::timeout(timeout, async {
        loop {
            if let Some((frame, _)) = frame::decode_ref(&buffer)? {
                return anyhow::Ok(Response::decode(frame.opcode, frame.status, frame.body)?);
            }
            if stream.read_buf(&mut buffer).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    })
    .await
    .context("no answer to AUTH")?
    .context("authenticating")?;
    match answer {
        Response::Ok(Reply::Authenticated { .. }) => Ok(stream),
        other => bail!("authenticating: {other:?}"),
    }
}

/// One connection's loop.
struct Lane {
    workload: Arc<Workload>,
    plan: Arc<Plan>,
    live: Arc<Live>,
}

/// The request of one position of a batch, until its response.
struct Pending {
    /// Index into the mix.
    op: usize,
    /// The request's opcode, to decode its response.
    opcode: u16,
    outcome: Option<Outcome>,
}

impl Lane {
    async fn run(
        self,
        mut stream: TcpStream,
        c: usize,
        (measure_from, stop_at): (Instant, Instant),
    ) -> Tally {
        let Lane { workload, plan, live } = self;
        let operations = workload.operations();
        let depth = plan.pipeline;
        let mut chooser = Chooser::new(&plan.weights, plan.seed, c as u64);
        let mut slots: Vec<SlotCursor> = (0..depth).map(|s| workload.slot(c, s)).collect();
        let mut tally = Tally::new(plan.weights.len());
        let mut out = Vec::with_capacity(depth * 256);
        let mut input = Vec::with_capacity(64 * 1024);
        let mut pending: Vec<Pending> = Vec::with_capacity(depth);
        // Request IDs go up across batches, so a stray response of an earlier batch can
        // never be taken for one of this batch.
        let mut next_id = 1u64;
        while Instant::now() < stop_at {
            out.clear();
            pending.clear();
            let first_id = next_id;
            for slot in &mut slots {
                let op = chooser.next_index();
                let request = operations[op].request(&workload, slot).expect("single-request mix");
                request.encode_frame(next_id, &mut out);
                next_id += 1;
                pending.push(Pending { op, opcode: request.opcode(), outcome: None });
            }
            let sent = Instant::now();
            let exchanged = tokio::time::timeout(
                plan.timeout,
                exchange(&mut stream, &out, &mut input, first_id, operations, &mut pending),
            )
            .await;
            // Why the exchange stopped short, as each unanswered request counts it.
            let lost = match exchanged {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(Err(error)),
                Err(_elapsed) => Some(Ok(Outcome::Error("timeout".into()))),
            };
            let micros = sent.elapsed().as_micros() as u64;
            for request in &mut pending {
                let outcome = match (request.outcome.take(), &lost) {
                    (Some(outcome), _) => outcome,
                    (None, Some(Ok(outcome))) => outcome.clone(),
                    (None, Some(Err(error))) => operations[request.op].judge(Err(error.clone())),
                    (None, None) => unreachable!("a complete exchange answers every request"),
                };
                count_live(&live, &outcome);
                if sent >= measure_from || lost.is_some() {
                    tally.record(request.op, micros, micros, &outcome);
                }
            }
            if lost.is_some() {
                return tally; // The connection is in an unknown state: stop this lane.
            }
        }
        tally
    }
}

/// Writes a batch and reads until every one of its requests has its response.
async fn exchange(
    stream: &mut TcpStream,
    batch: &[u8],
    input: &mut Vec<u8>,
    first_id: u64,
    operations: &[Operation],
    pending: &mut [Pending],
) -> Result<(), ClientError> {
    let closed = |error: std::io::Error| ClientError::Closed(error.to_string());
    stream.write_all(batch).await.map_err(closed)?;
    let mut waiting = pending.len();
    while waiting > 0 {
        if stream.read_buf(input).await.map_err(closed)? == 0 {
            return Err(ClientError::Closed("server closed the connection".into()));
        }
        let mut used = 0;
        while let Some((frame, len)) = frame::decode_ref(&input[used..])
            .map_err(|error| ClientError::Protocol(format!("bad frame from server: {error}")))?
        {
            used += len;
            let position = frame.request_id.wrapping_sub(first_id) as usize;
            let request = pending.get_mut(position).filter(|p| p.outcome.is_none());
            let Some(request) = request.filter(|_| frame.flags & FLAG_RESPONSE != 0) else {
                return Err(ClientError::Protocol(format!(
                    "response for unknown request ID {}",
                    frame.request_id
                )));
            };
            let op = operations[request.op];
            let answer = Response::decode(request.opcode, frame.status, frame.body)
                .map_err(|error| ClientError::Protocol(format!("response to {op:?}: {error}")));
            request.outcome = Some(op.judge(answer));
            waiting -= 1;
        }
        input.drain(..used);
    }
    Ok(())
}
