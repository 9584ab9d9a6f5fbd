//! One protocol connection: bytes to frames, frames to the handler in batches, responses back
//! with one flush per burst.
//!
//! Limits: a started frame must complete within `frame_read_timeout` of its first byte (the
//! bytes after it do not move the deadline); a connection must authenticate within
//! `auth_timeout` of its accept, whatever it has buffered, and sends something within
//! `idle_timeout`; at most `in_flight_max` requests are being processed (reading pauses at the
//! limit). Before authentication only `AUTH`, `PING` and `SERVER_INFO` bodies are parsed. A
//! framing error gets a `FRAME_ERROR` frame and closes this connection only.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use settlegate_engine::{DeviceMessage, Notice, ReasonCode};
use settlegate_protocol::frame::{self, FrameError, FrameRef, FLAG_RESPONSE};
use settlegate_protocol::messages::{opcode, DecodeError, Reply, Request, Response};
use settlegate_protocol::ops::{Authorize, AuthorizeBasket, SubscribeDevice, SubscribeNotices};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::handler::{self, Context, PendingAuthorize};
use crate::identity::{Identities, Identity};
use crate::metrics::{BatchCounts, FrameErrorLabels};
use crate::ops;
use crate::outbox::{self, Backlog, Outbox, Queued};
use crate::wire_map::{ToEngine as _, ToWire as _};

/// Frames decoded from one read before they are handed on as a batch.
const FRAMES_PER_BATCH_MAX: usize = 1024;
/// A deadline that does not come.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);
/// Notice subscriptions one connection may hold.
const SUBSCRIPTIONS_MAX: usize = 16;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// Queued replies written together at most.
const WRITE_BURST_MAX: usize = 4 * READ_CHUNK;

/// Per-connection limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Requests in flight.
    pub in_flight_max: usize,
    /// Silence before the connection is closed.
    pub idle_timeout: Duration,
    /// Time to complete a started frame.
    pub frame_read_timeout: Duration,
    /// Time to authenticate.
    pub auth_timeout: Duration,
    /// Unsent reply bytes before reading pauses.
    pub replies: outbox::Budget,
}

/// Everything a connection shares with the server.
pub struct Shared {
    /// The handler context.
    pub ctx: Context,
    /// Identities for `AUTH`.
    pub identities: Identities,
    /// Limits.
    pub limits: ConnectionLimits,
    /// Every connection's unsent reply bytes together.
    pub replies: Arc<Backlog>,
}

/// The socket's writing half, shared by the writer task (responses to other requests, pushes,
/// errors, and what is queued while it writes) and the tasks of `AUTHORIZE` batches (a batch's
/// answers, or a group of them, written at once).
type SharedWriter = Arc<tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>>;

struct Connection {
    shared: Arc<Shared>,
    identity: Option<Identity>,
    writer: SharedWriter,
    out: Outbox,
    permits: Arc<Semaphore>,
    closed: watch::Receiver<bool>,
    subscriptions: usize,
    /// Set when the connection must close once the current responses are out.
    closing: bool,
    /// The connection's place among the unauthenticated ones (`unauthenticated_max`), given
    /// up when it authenticates.
    unauthenticated_slot: Option<OwnedSemaphorePermit>,
    /// Its count in `settlegate_connections{state}`.
    state: StateGauge,
}

/// A connection's count in the connections-by-state gauge, moved as its state changes and
/// taken away when it closes.
struct StateGauge {
    family: prometheus_client::metrics::family::Family<
        crate::metrics::ConnectionLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    state: &'static str,
}

impl StateGauge {
    fn new(shared: &Shared, state: &'static str) -> StateGauge {
        let family = shared.ctx.metrics.connections.clone();
        family.get_or_create(&crate::metrics::ConnectionLabels { state }).inc();
        StateGauge { family, state }
    }

    fn set(&mut self, state: &'static str) {
        if state != self.state {
            self.family
                .get_or_create(&crate::metrics::ConnectionLabels { state: self.state })
                .dec();
            self.family.get_or_create(&crate::metrics::ConnectionLabels { state }).inc();
            self.state = state;
        }
    }
}

impl Drop for StateGauge {
    fn drop(&mut self) {
        self.family.get_or_create(&crate::metrics::ConnectionLabels { state: self.state }).dec();
    }
}

/// Serves one connection until the peer leaves, a limit or error closes it, or shutdown.
/// `identity` is set when TLS client authentication already established it;
/// `unauthenticated_slot` is held until the connection authenticates.
pub async fn serve<S>(
    stream: S,
    shared: Arc<Shared>,
    identity: Option<Identity>,
    unauthenticated_slot: Option<OwnedSemaphorePermit>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let limits = shared.limits;
    let unauthenticated_slot = unauthenticated_slot.filter(|_| identity.is_none());
    let (mut reader, writer) = tokio::io::split(stream);
    let writer: SharedWriter = Arc::new(tokio::sync::Mutex::new(Box::pin(writer)));
    let (out, queue) = Outbox::new(Arc::clone(&shared.replies), limits.replies);
    let mut writer_task = tokio::spawn(write_loop(Arc::clone(&writer), queue, out.counter()));
    let (closed_tx, closed) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(limits.in_flight_max));
    let state = StateGauge::new(
        &shared,
        if identity.is_some() { "authenticated" } else { "unauthenticated" },
    );
    let mut conn = Connection {
        state,
        shared,
        identity,
        writer,
        out,
        permits: Arc::clone(&permits),
        closed,
        subscriptions: 0,
        closing: false,
        unauthenticated_slot,
    };
    let auth_deadline = Instant::now() + limits.auth_timeout;
    // A batch is admitted whole, so it can be no larger than the in-flight limit.
    let batch_max = FRAMES_PER_BATCH_MAX.min(limits.in_flight_max);
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // When the frame at the front of `buffer` must be complete: set when its first byte
    // arrives, never moved by the bytes that follow it (a trickle of one byte a second does
    // not keep a frame open), cleared when the buffer empties.
    let mut frame_deadline: Option<Instant> = None;
    let mut last_read = Instant::now();
    // Set when the peer has taken no reply for the idle time: the close then waits no more.
    let mut stalled = false;
    loop {
        let (frames, used, error, more) =
            decode_available(&buffer, batch_max, conn.identity.is_some());
        buffer.drain(..used);
        if buffer.is_empty() {
            frame_deadline = None;
        } else if used > 0 {
            // Frames were completed by the last read, so what is left began in it.
            frame_deadline = Some(last_read + limits.frame_read_timeout);
        }
        if !frames.is_empty() {
            let paused = Instant::now();
            conn.dispatch(frames).await;
            // Time spent waiting for the server's own in-flight limit is not the peer's.
            if let Some(deadline) = frame_deadline.as_mut() {
                *deadline += paused.elapsed();
            }
        }
        if let Some(error) = error {
            conn.send_frame_error(error).await;
            break;
        }
        if conn.closing {
            break;
        }
        if more {
            // A full batch, or one cut short after an `AUTH`, left frames behind: they go
            // before the next read.
            continue;
        }
        if conn.out.over() {
            // The peer is not taking its replies: read no more requests until it does, and
            // close if it has not made room within the idle time.
            let paused = Instant::now();
            let drained = tokio::select! {
                _ = shutdown.changed() => break,
                drained = conn.out.room(paused + limits.idle_timeout) => drained,
            };
            if !drained {
                tracing::debug!("the peer does not read its replies; closing");
                stalled = true;
                break;
            }
            if let Some(deadline) = frame_deadline.as_mut() {
                *deadline += paused.elapsed();
            }
        }
        let deadline = match (frame_deadline, conn.identity.is_some()) {
            (Some(frame), true) => frame,
            (Some(frame), false) => frame.min(auth_deadline),
            (None, true) => Instant::now() + limits.idle_timeout,
            (None, false) => auth_deadline,
        };
        buffer.reserve(READ_CHUNK);
        tokio::select! {
            _ = shutdown.changed() => break,
            read = tokio::time::timeout_at(deadline, reader.read_buf(&mut buffer)) => match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {
                    last_read = Instant::now();
                    frame_deadline.get_or_insert(last_read + limits.frame_read_timeout);
                }
                Err(_elapsed) => {
                    // A frame past its deadline gets a FRAME_ERROR; the authentication
                    // deadline and the idle time close without one (PROTOCOL.md section 3).
                    if frame_deadline.is_some_and(|frame| frame <= Instant::now()) {
                        conn.send_frame_error(FrameError::ReadTimeout).await;
                    }
                    break;
                }
            },
        }
    }
    if *shutdown.borrow() {
        conn.state.set("draining");
    }
    // Finish what was read: every admitted request gets its response before the close, unless
    // the peer has not taken its replies within the idle time. The signal then stops the
    // subscriptions and any write still waiting on the peer.
    let patience = if stalled { Duration::ZERO } else { limits.idle_timeout };
    let all = limits.in_flight_max as u32;
    let _all = tokio::time::timeout(patience, permits.acquire_many(all)).await;
    let _ = closed_tx.send(true);
    drop(conn);
    if tokio::time::timeout(patience, &mut writer_task).await.is_err() {
        writer_task.abort();
    }
}

/// A request as read: its frame's opcode and request ID, and the request, or the response it
/// gets at once when it is not one (bad header fields, unknown opcode, bad body).
struct Incoming {
    opcode: u16,
    request_id: u64,
    request: Result<Request, Box<Response>>,
}

/// Decodes every complete frame at the front of `buffer`, and each one's request straight from
/// the buffer; returns them, the bytes used, and the framing error that stopped decoding, if
/// any, and whether decoding stopped with more frames to read (a batch of `max`). Before
/// authentication only `AUTH`, `PING` and `SERVER_INFO` bodies are parsed, and decoding stops
/// after an `AUTH`, so that the frames behind it are read under its outcome.
fn decode_available(
    buffer: &[u8],
    max: usize,
    authenticated: bool,
) -> (Vec<Incoming>, usize, Option<FrameError>, bool) {
    let mut incoming = Vec::new();
    let mut used = 0;
    while incoming.len() < max {
        match frame::decode_ref(&buffer[used..]) {
            Ok(Some((frame, len))) => {
                used += len;
                incoming.push(Incoming {
                    opcode: frame.opcode,
                    request_id: frame.request_id,
                    request: decode_request(&frame, authenticated),
                });
                if !authenticated && frame.opcode == opcode::AUTH {
                    return (incoming, used, None, used < buffer.len());
                }
            }
            Ok(None) => return (incoming, used, None, false),
            Err(error) => return (incoming, used, Some(error), false),
        }
    }
    (incoming, used, None, used < buffer.len())
}

fn decode_request(frame: &FrameRef<'_>, authenticated: bool) -> Result<Request, Box<Response>> {
    if frame.request_id == 0 || frame.status != 0 || frame.flags & FLAG_RESPONSE != 0 {
        let detail = "a request has a nonzero request ID, status 0 and no RESPONSE flag";
        return Err(Box::new(Response::BadRequest(detail.into())));
    }
    if !authenticated && !opcode::allowed_unauthenticated(frame.opcode) {
        // The body is not looked at: its parser and its errors are for identified callers.
        return Err(Box::new(if opcode::is_request(frame.opcode) {
            Response::Unauthenticated(UNAUTHENTICATED_DETAIL.into())
        } else {
            Response::UnknownOpcode
        }));
    }
    Request::decode(frame.opcode, frame.body).map_err(|error| {
        Box::new(match error {
            DecodeError::UnknownOpcode(_) => Response::UnknownOpcode,
            DecodeError::Body(error) => Response::BadRequest(error.to_string()),
        })
    })
}

/// The frames of a group of `AUTHORIZE` answers to requests read at `started`, counted in the
/// request metrics.
fn encode_authorize_answers(
    ctx: &handler::Context,
    answers: Vec<(u64, u16, Response)>,
    started: Instant,
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(answers.len() * 128);
    let mut counts = BatchCounts::default();
    let elapsed = started.elapsed().as_secs_f64();
    let mut per_op: Vec<(u16, u64)> = Vec::new();
    for (request_id, op, response) in answers {
        let status = response.encode_frame(op, request_id, &mut bytes);
        counts.add(handler::request_labels(op, status));
        match per_op.iter_mut().find(|(known, _)| *known == op) {
            Some((_, n)) => *n += 1,
            None => per_op.push((op, 1)),
        }
    }
    counts.flush(&ctx.metrics.requests);
    // One lookup per operation; every answer of the group waited as long.
    for (op, n) in per_op {
        let histogram = ctx.metrics.request_duration.get_or_create(&handler::op_labels(op));
        for _ in 0..n {
            histogram.observe(elapsed);
        }
    }
    bytes
}

/// The detail of the answer to a request sent before authentication.
const UNAUTHENTICATED_DETAIL: &str = "authenticate first (AUTH or a TLS client certificate)";

impl Connection {
    /// Sorts a batch of frames: connection-level requests are answered now, `AUTHORIZE`s go to
    /// the engine together, other requests run concurrently beside them.
    async fn dispatch(&mut self, frames: Vec<Incoming>) {
        let mut now = Vec::new();
        let mut authorizes = Vec::new();
        let mut others = Vec::new();
        for frame in frames {
            let request = match frame.request {
                Ok(request) => request,
                Err(response) => {
                    now.push((frame.opcode, frame.request_id, *response));
                    continue;
                }
            };
            match request {
                Request::Auth(auth) => {
                    let response = self.authenticate(&auth.key);
                    now.push((frame.opcode, frame.request_id, response));
                }
                Request::Ping(_) | Request::ServerInfo(_) => {
                    others.push((frame.request_id, request))
                }
                _ if self.identity.is_none() => now.push((
                    frame.opcode,
                    frame.request_id,
                    Response::Unauthenticated(UNAUTHENTICATED_DETAIL.into()),
                )),
                Request::Authorize(Authorize { client_request_id, inherent_id }) => authorizes
                    .push(PendingAuthorize {
                        request_id: frame.request_id,
                        client_request_id,
                        inherent_id,
                        basket: None,
                    }),
                Request::AuthorizeBasket(AuthorizeBasket {
                    client_request_id,
                    inherent_id,
                    basket,
                }) => authorizes.push(PendingAuthorize {
                    request_id: frame.request_id,
                    client_request_id,
                    inherent_id,
                    basket: Some(basket.to_engine()),
                }),
                Request::SubscribeNotices(_) | Request::SubscribeDevice(_) => {
                    self.subscribe(frame.request_id, request).await
                }
                other => others.push((frame.request_id, other)),
            }
        }
        if !now.is_empty() {
            let mut bytes = Vec::new();
            for (op, request_id, response) in now {
                self.encode(op, request_id, &response, &mut bytes);
            }
            self.out.push(bytes);
        }
        self.run_work(authorizes, others).await;
    }

    fn authenticate(&mut self, key: &str) -> Response {
        match self.shared.identities.by_api_key(key) {
            Some(identity) => {
                let reply = Reply::Auth(settlegate_protocol::ops::auth::Authenticated {
                    identity: identity.name.clone(),
                    permissions: identity.permissions,
                });
                tracing::debug!(identity = %identity.name, "connection authenticated");
                self.identity = Some(identity);
                self.state.set("authenticated");
                self.unauthenticated_slot = None;
                Response::Ok(reply)
            }
            None => {
                self.closing = true;
                Response::Unauthenticated("unknown API key".into())
            }
        }
    }

    /// Admits the batch's work against the in-flight limit (waiting, and so not reading, while
    /// the connection is at its limit), then runs it: at once as far as it goes without
    /// waiting, the rest on tasks of its own, so that the connection reads on meanwhile (a slow
    /// provider must not hold up the next batch). The batch's `AUTHORIZE`s go to the engine
    /// together and their answers are written as they stand, with no hand-over to the writer
    /// task (a group that stands while others wait for the writer is queued behind them:
    /// `write_or_queue`).
    async fn run_work(&mut self, authorizes: Vec<PendingAuthorize>, others: Vec<(u64, Request)>) {
        let admitted = (authorizes.len() + others.len()) as u32;
        if admitted == 0 {
            return;
        }
        let Ok(mut permit) = Arc::clone(&self.permits).acquire_many_owned(admitted).await else {
            return;
        };
        if !others.is_empty() {
            let others_permit = permit.split(others.len()).expect("admitted above");
            self.spawn_others(others, others_permit);
        }
        if authorizes.is_empty() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let started = Instant::now();
        let identity = self.identity.clone().expect("authorize admitted only when authenticated");
        let writer = Arc::clone(&self.writer);
        let out = self.out.clone();
        let mut closed = self.closed.clone();
        let work = async move {
            let ctx = &shared.ctx;
            let mut answers = handler::authorize_start(ctx, &identity, authorizes).await;
            // Each group is written as it stands (the whole batch at once when no provider
            // keeps any of it), so that a slow provider holds back only its own answers, and
            // its permits are given back.
            let mut group = answers.take_ready(ctx);
            loop {
                let answered = group.len();
                if answered > 0 {
                    let bytes = encode_authorize_answers(ctx, group, started);
                    write_or_queue(&writer, &out, &mut closed, bytes).await;
                    drop(permit.split(answered));
                }
                match answers.next(ctx).await {
                    Some(next) => group = next,
                    None => break,
                }
            }
            drop(permit);
        };
        // Polled here once first: a batch whose answers all stand at reservation (a provider
        // that decides in the shard) is answered now, with no task spawned, scheduled and
        // woken for it. In the open loop, at a request or two a read, that took the median
        // latency down by a quarter or more at 170,000/s on one core; in the closed loop, 1–9%
        // more payments a second (`docs/BENCHMARKS.md`). Work still waiting (for a provider,
        // the writing half, a queued shard) goes on in a task of its own, which polls it again
        // and so takes over its wake-ups.
        let mut work = Box::pin(work);
        if futures::poll!(work.as_mut()).is_pending() {
            tokio::spawn(work);
        }
    }

    /// Runs requests other than `AUTHORIZE` concurrently on a task of their own; each answer is
    /// queued for the writer as it comes.
    fn spawn_others(&self, others: Vec<(u64, Request)>, permit: OwnedSemaphorePermit) {
        let shared = Arc::clone(&self.shared);
        let identity = self.identity.clone();
        let out = self.out.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ctx = &shared.ctx;
            join_all(others.into_iter().map(|(request_id, request)| {
                let out = out.clone();
                let identity = identity.clone();
                async move {
                    let op = request.opcode();
                    let anonymous = Identity::anonymous();
                    let started = Instant::now();
                    let response =
                        ops::handle(ctx, identity.as_ref().unwrap_or(&anonymous), request).await;
                    ctx.metrics
                        .request_duration
                        .get_or_create(&handler::op_labels(op))
                        .observe(started.elapsed().as_secs_f64());
                    let mut bytes = Vec::new();
                    encode_response(ctx, op, request_id, &response, &mut bytes);
                    out.push(bytes);
                }
            }))
            .await;
        });
    }

    /// `SUBSCRIBE_NOTICES`: checks the password, answers, then forwards the user's notices as
    /// `NOTICE` frames until the connection closes.
    /// `SUBSCRIBE_NOTICES` (a user's settlement notices) and `SUBSCRIBE_DEVICE` (one device's
    /// codes, coupons and delivery notices): the password is checked, then pushes follow
    /// under the subscription's request ID until the connection closes.
    async fn subscribe(&mut self, request_id: u64, request: Request) {
        let op = request.opcode();
        let (user, password, device) = match request {
            Request::SubscribeNotices(SubscribeNotices { user, password }) => {
                (user, password, None)
            }
            Request::SubscribeDevice(SubscribeDevice { user, password, card_idm }) => {
                (user, password, Some(card_idm))
            }
            _ => return,
        };
        let identity = self.identity.clone().expect("authenticated");
        let refusal = if self.subscriptions >= SUBSCRIPTIONS_MAX {
            Some(Response::BadRequest("too many subscriptions on this connection".into()))
        } else {
            ops::forbidden(
                &identity,
                &SubscribeNotices { user: user.clone(), password: String::new() }.into(),
            )
        };
        if let Some(response) = refusal {
            let mut bytes = Vec::new();
            self.encode(op, request_id, &response, &mut bytes);
            self.out.push(bytes);
            return;
        }
        self.subscriptions += 1;
        let shared = Arc::clone(&self.shared);
        let out = self.out.clone();
        let closed = self.closed.clone();
        tokio::spawn(async move {
            let engine = &shared.ctx.engine;
            let mut response = match engine.login(&user, &password).await {
                Ok(()) if device.is_some() => Response::Ok(Reply::SubscribeDevice(())),
                Ok(()) => Response::Ok(Reply::SubscribeNotices(())),
                Err(error) => handler::error_response(error),
            };
            if let (Some(idm), Response::Ok(_)) = (device, &response) {
                match engine.devices_of(&user).await {
                    Ok(devices) if devices.contains(&idm) => {}
                    Ok(_) => response = Response::Refused(ReasonCode::UserDeviceMismatch),
                    Err(error) => response = handler::error_response(error),
                }
            }
            let subscribed = matches!(response, Response::Ok(_));
            let mut bytes = Vec::new();
            encode_response(&shared.ctx, op, request_id, &response, &mut bytes);
            // Subscribe before the answer leaves, so nothing published after it is missed.
            let receiver = subscribed.then(|| match device {
                None => Stream::Notices(engine.subscribe(&user)),
                Some(idm) => Stream::Device(engine.subscribe_device(idm)),
            });
            if !out.push(bytes) {
                return;
            }
            match receiver {
                Some(Stream::Notices(notices)) => {
                    forward(notices, out, closed, |notice, bytes| {
                        Response::Ok(Reply::Notice(notice.to_wire())).encode_frame(
                            opcode::NOTICE,
                            request_id,
                            bytes,
                        );
                    })
                    .await
                }
                Some(Stream::Device(messages)) => {
                    forward(messages, out, closed, |message, bytes| {
                        Response::Ok(Reply::DeviceMessage(message.to_wire())).encode_frame(
                            opcode::DEVICE_MESSAGE,
                            request_id,
                            bytes,
                        );
                    })
                    .await
                }
                None => {}
            }
        });
    }

    async fn send_frame_error(&mut self, error: FrameError) {
        let kind = error as u16;
        self.shared.ctx.metrics.frame_errors.get_or_create(&FrameErrorLabels { kind }).inc();
        let response = Response::FrameError { kind, detail: error.to_string() };
        let mut bytes = Vec::new();
        self.encode(0, 0, &response, &mut bytes);
        self.out.push(bytes);
    }

    fn encode(&self, op: u16, request_id: u64, response: &Response, out: &mut Vec<u8>) {
        encode_response(&self.shared.ctx, op, request_id, response, out);
    }
}

fn encode_response(
    ctx: &Context,
    op: u16,
    request_id: u64,
    response: &Response,
    out: &mut Vec<u8>,
) {
    let status = response.encode_frame(op, request_id, out);
    handler::count_request(&ctx.metrics, op, status);
}

/// A subscription's stream.
enum Stream {
    Notices(broadcast::Receiver<Notice>),
    Device(broadcast::Receiver<DeviceMessage>),
}

/// Pushes every message of `stream` as a frame until the connection closes. A subscriber that
/// falls behind loses the oldest messages (logged), never blocks the publisher.
async fn forward<T: Clone>(
    mut stream: broadcast::Receiver<T>,
    out: Outbox,
    mut closed: watch::Receiver<bool>,
    encode: impl Fn(T, &mut Vec<u8>),
) {
    loop {
        tokio::select! {
            _ = closed.changed() => return,
            message = stream.recv() => match message {
                Ok(message) => {
                    // A subscriber that does not read waits here, and the oldest messages
                    // past the stream's buffer are dropped for it (Lagged), not queued.
                    tokio::select! {
                        _ = closed.changed() => return,
                        _ = out.room(Instant::now() + FOREVER) => {}
                    }
                    let mut bytes = Vec::new();
                    encode(message, &mut bytes);
                    if !out.push(bytes) {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "subscriber lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Writes whatever is queued with one write and one flush per burst. A burst's bytes stay
/// counted against the backlog until they are written.
async fn write_loop(
    writer: SharedWriter,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    counter: outbox::Counter,
) {
    let mut buffer = Vec::with_capacity(READ_CHUNK);
    while let Some(first) = queue.recv().await {
        buffer.clear();
        buffer.extend_from_slice(&first.bytes);
        drop(first);
        while buffer.len() < WRITE_BURST_MAX {
            match queue.try_recv() {
                Ok(more) => buffer.extend_from_slice(&more.bytes),
                Err(_) => break,
            }
        }
        // The replies copied in gave their bytes back as they were dropped; the burst holds
        // them until the peer has taken them.
        let _charge = counter.charge(buffer.len());
        if write_all(&writer, &buffer).await.is_err() {
            return;
        }
        if buffer.capacity() > READ_CHUNK {
            // A burst after a backlog: do not keep its memory for the connection's life.
            buffer = Vec::with_capacity(READ_CHUNK);
        }
    }
    let _ = writer.lock().await.shutdown().await;
}

/// Writes `bytes` on the calling task when nothing waits for the writer task and the writing
/// half is free, with no hand-over to the writer task (a wake-up and a copy); otherwise queues
/// them for the writer task, which writes whatever is queued by then together. A write the peer
/// never takes ends when the connection gives up on it.
async fn write_or_queue(
    writer: &SharedWriter,
    out: &Outbox,
    closed: &mut watch::Receiver<bool>,
    bytes: Vec<u8>,
) {
    if out.idle() {
        if let Ok(mut writing) = writer.try_lock() {
            let _charge = out.charge(bytes.len());
            // A failed write means the peer is gone; the read side sees it too.
            tokio::select! {
                _ = async {
                    writing.write_all(&bytes).await?;
                    writing.flush().await
                } => {}
                _ = closed.changed() => {}
            }
            return;
        }
    }
    out.push(bytes);
}

/// Writes `bytes` and flushes, holding the writing half for both.
async fn write_all(writer: &SharedWriter, bytes: &[u8]) -> std::io::Result<()> {
    let mut writer = writer.lock().await;
    writer.write_all(bytes).await?;
    writer.flush().await
}
