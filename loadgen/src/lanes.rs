//! Lanes: one task per connection that writes requests straight into its socket and reads the
//! answers back, with no per-request task, channel or lock. Both the settlegate runs and the
//! Redis baseline go through here (a [`Wire`] each), in both loops where they can:
//!
//! - **closed loop in batches** (`redis-benchmark -P`'s way): the lane writes `--pipeline`
//!   requests in one write, reads all their answers, then writes the next batch;
//! - **open loop** (`--rate`): the lane sends each request when it falls due (those due
//!   together go out in one write) while a slot of its `--pipeline` is free, and times it from
//!   when it was due, with the same schedule and the same coordinated-omission correction as the
//!   per-request driver ([`crate::driver`]).
//!
//! The lanes are spread, in turn, over one single-threaded runtime per core
//! ([`settlegate_protocol::threads`]): a lane's socket, timer and reads stay on one thread, and
//! nothing is stolen or woken across threads.
//!
//! Every request is timed to the arrival of its own answer. The point of a lane is that the load
//! generator's own cost per request stays small and alike for both servers: at a few hundred
//! thousand requests a second on the machine the server runs on, a per-request future, channel
//! and lock in the client cost as much as the server's work, and a run would measure the client.
//!
//! Only operations of one request and one response can go in a lane
//! ([`crate::ops::Operation::is_single`]); a mix with `code` runs on the per-request driver.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use settlegate_protocol::frame::{self, FrameRef, FLAG_RESPONSE};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::threads::{self, RuntimeThreads};
use settlegate_protocol::ClientError;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};

use crate::driver::{Cadence, Execute as _, Live, Plan, Ticket, Window};
use crate::mix::Chooser;
use crate::ops::{client_error, SlotCursor, Workload};
use crate::tally::{Outcome, Tally};

/// A protocol as a lane speaks it.
pub trait Wire: Send + Sync + 'static {
    /// Per-slot state (settlegate: the slot's users, so a device never has two requests in
    /// flight).
    type Slot: Send;

    /// The state of slot `slot` of connection `connection`.
    fn slot(&self, connection: usize, slot: usize) -> Self::Slot;

    /// Appends request `op` of `slot`, with request ID `id` where the protocol has one, to
    /// `out`; returns what [`Wire::judge`] needs to read its answer (settlegate: the opcode).
    fn encode(&self, op: usize, slot: &mut Self::Slot, id: u64, out: &mut Vec<u8>) -> u16;

    /// An answer as [`Wire::split`] finds it, still in the read buffer.
    type Answer<'a>;

    /// Finds the answer at the front of `input`: `Ok(None)` while it is incomplete.
    fn split<'a>(&self, input: &'a [u8]) -> Result<Option<Found<Self::Answer<'a>>>, ClientError>;

    /// How `answer` to a request of `op` (with `tag`, see [`Wire::encode`]) counts.
    fn judge(&self, op: usize, tag: u16, answer: Self::Answer<'_>) -> Outcome;
}

/// An answer found at the front of the read buffer.
pub struct Found<A> {
    /// The request it answers; `None`: the oldest, for a protocol answering in order.
    pub id: Option<u64>,
    /// Its length.
    pub len: usize,
    /// The answer.
    pub answer: A,
}

/// Opens `plan.connections` connections with `connect` and runs a lane on each.
pub async fn drive<W, F, Fut>(
    wire: Arc<W>,
    plan: Arc<Plan>,
    live: Arc<Live>,
    connect: F,
) -> anyhow::Result<Tally>
where
    W: Wire,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<TcpStream>>,
{
    let mut streams = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        streams.push(connect().await?);
    }
    // The lanes on threads of their own, in turn: a lane's socket, timer and reads stay on one
    // thread, with nothing stolen or woken across threads (as the server's connections do).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = RuntimeThreads::start("lane", cores)?;
    let window = Window::starting_now(&plan);
    let mut lanes = Vec::with_capacity(streams.len());
    for (c, stream) in streams.into_iter().enumerate() {
        let (wire, plan, live) = (wire.clone(), plan.clone(), live.clone());
        let stream = threads::release(stream)?;
        lanes.push(threads.spawn(async move {
            let stream = threads::adopt(stream)?;
            std::io::Result::Ok(lane(&*wire, stream, c, &plan, window, &live).await)
        }));
    }
    let mut total = Tally::new(plan.weights.len());
    let mut failed = None;
    for lane in lanes {
        match lane.await.context("a connection task panicked")? {
            Ok(tally) => total.add(&tally),
            Err(error) => failed = Some(error),
        }
    }
    tokio::task::spawn_blocking(move || threads.stop()).await?;
    match failed {
        Some(error) => Err(error).context("moving a connection to its thread"),
        None => Ok(total),
    }
}

/// A request between its write and its answer.
struct InFlight<S> {
    id: u64,
    slot: S,
    op: usize,
    tag: u16,
    ticket: Ticket,
}

async fn lane<W: Wire>(
    wire: &W,
    mut stream: TcpStream,
    c: usize,
    plan: &Plan,
    window: Window,
    live: &Live,
) -> Tally {
    let mut cadence = Cadence::new(plan, window, c, |s| wire.slot(c, s));
    let mut chooser = Chooser::new(&plan.weights, plan.seed, c as u64);
    let mut tally = Tally::new(plan.weights.len());
    let mut in_flight: VecDeque<InFlight<W::Slot>> = VecDeque::with_capacity(plan.pipeline);
    let (mut out, mut input) = (Vec::with_capacity(64 * 1024), Vec::with_capacity(64 * 1024));
    let mut next_id = 1u64;
    // Why the lane stopped short, as an error kind; `None` when it ran to the end.
    let lost: Option<Cow<'static, str>> = loop {
        let now = Instant::now();
        // Everything due now that has a free slot goes out in one write.
        out.clear();
        while let Some((mut slot, ticket)) = cadence.take(now) {
            let op = chooser.next_index();
            let tag = wire.encode(op, &mut slot, next_id, &mut out);
            in_flight.push_back(InFlight { id: next_id, slot, op, tag, ticket });
            next_id += 1;
        }
        if !out.is_empty() {
            if let Err(error) = stream.write_all(&out).await {
                break Some(client_error(ClientError::Closed(error.to_string())));
            }
        }
        let timer = cadence.timer(now);
        if in_flight.is_empty() && timer.is_none() {
            break None;
        }
        let give_up = in_flight.front().map(|oldest| oldest.ticket.sent() + plan.timeout);
        tokio::select! {
            read = stream.read_buf(&mut input), if !in_flight.is_empty() => match read {
                Ok(0) => break Some(client_error(ClientError::Closed("server closed".into()))),
                Err(error) => break Some(client_error(ClientError::Closed(error.to_string()))),
                Ok(_) => {
                    let finished = Instant::now();
                    let answered = match take_answers(wire, &mut input, &mut in_flight) {
                        Ok(answered) => answered,
                        Err(error) => break Some(client_error(error)),
                    };
                    for (request, outcome) in answered {
                        request.ticket.settle(&mut tally, live, request.op, &outcome, finished);
                        cadence.give_back(request.slot, finished);
                    }
                }
            },
            () = plan.pacing.until(timer.unwrap_or(now)), if timer.is_some() => {}
            () = tokio::time::sleep_until(give_up.unwrap_or(now)), if give_up.is_some() => {
                break Some("timeout".into());
            }
        }
    };
    tally.unsent = cadence.unsent();
    if let Some(kind) = lost {
        // The connection is in an unknown state: what is still in flight is lost, and the
        // lane stops.
        let finished = Instant::now();
        for request in in_flight {
            let outcome = Outcome::Error(kind.clone());
            request.ticket.settle(&mut tally, live, request.op, &outcome, finished);
        }
    }
    tally
}

/// Requests answered, each with how its answer counts.
type Answered<S> = Vec<(InFlight<S>, Outcome)>;

/// Takes every complete answer off the front of `input` and out of `in_flight`, each with how
/// it counts.
fn take_answers<W: Wire>(
    wire: &W,
    input: &mut Vec<u8>,
    in_flight: &mut VecDeque<InFlight<W::Slot>>,
) -> Result<Answered<W::Slot>, ClientError> {
    let mut answered = Vec::new();
    let mut used = 0;
    while let Some(Found { id, len, answer }) = wire.split(&input[used..])? {
        let position = match id {
            None => Some(0),
            Some(id) => in_flight.iter().position(|request| request.id == id),
        };
        let request = position
            .and_then(|at| in_flight.remove(at))
            .ok_or_else(|| ClientError::Protocol(format!("an answer to no request ({id:?})")))?;
        let outcome = wire.judge(request.op, request.tag, answer);
        used += len;
        answered.push((request, outcome));
    }
    input.drain(..used);
    Ok(answered)
}

/// settlegate's protocol: frames matched to requests by request ID.
pub struct Settlegate {
    /// What to send and how to judge it.
    pub workload: Arc<Workload>,
}

impl Wire for Settlegate {
    type Slot = SlotCursor;

    fn slot(&self, connection: usize, slot: usize) -> SlotCursor {
        self.workload.slot(connection, slot)
    }

    fn encode(&self, op: usize, slot: &mut SlotCursor, id: u64, out: &mut Vec<u8>) -> u16 {
        let operation = self.workload.operations()[op];
        let request =
            operation.request(&self.workload, slot).expect("a mix of one-request operations");
        request.encode_frame(id, out).expect("loadgen's requests fit a frame");
        request.opcode()
    }

    type Answer<'a> = FrameRef<'a>;

    fn split<'a>(&self, input: &'a [u8]) -> Result<Option<Found<FrameRef<'a>>>, ClientError> {
        match frame::decode_ref(input) {
            Ok(Some((frame, _))) if frame.flags & FLAG_RESPONSE == 0 => {
                Err(ClientError::Protocol("a frame without the RESPONSE flag".into()))
            }
            Ok(found) => Ok(found.map(|(frame, len)| Found {
                id: Some(frame.request_id),
                len,
                answer: frame,
            })),
            Err(error) => Err(ClientError::Protocol(format!("bad frame from server: {error}"))),
        }
    }

    fn judge(&self, op: usize, opcode: u16, frame: FrameRef<'_>) -> Outcome {
        let operation = self.workload.operations()[op];
        let answer = Response::decode(opcode, frame.status, frame.body)
            .map_err(|error| ClientError::Protocol(format!("response to {operation:?}: {error}")));
        operation.judge(answer)
    }
}

/// Opens a settlegate connection and authenticates it.
pub async fn connect(addr: &str, api_key: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let mut stream =
        TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut bytes = Vec::new();
    Request::from(settlegate_protocol::ops::Auth { key: api_key.to_owned() })
        .encode_frame(1, &mut bytes)
        .context("the API key does not fit a frame")?;
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
        Response::Ok(Reply::Auth(_)) => Ok(stream),
        other => bail!("authenticating: {other:?}"),
    }
}
