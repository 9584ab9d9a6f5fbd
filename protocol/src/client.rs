//! An async, pipelined client: many requests in flight on one connection, responses matched
//! by request ID, writes batched into one flush per burst.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use settlegate_types::{AuthOutcome, UserKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};

use crate::frame::{self, FrameRef, FLAG_PUSH};
use crate::messages::{opcode, Notice, Reply, Request, Response};
use crate::ops::{auth::Auth, authorize::Authorize, subscribe_notices::SubscribeNotices};

/// Frames queued for the writer before `call` waits.
const OUTGOING_QUEUE: usize = 4096;
/// Notices buffered per subscription before the connection's reader waits.
const NOTICE_QUEUE: usize = 256;

/// Why a call did not produce a response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The connection closed (or failed) before the response arrived.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The server sent something that does not follow the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The request cannot be sent as it is (its body is over the frame limit).
    #[error("request not sent: {0}")]
    Request(String),
    /// The server answered with a status other than OK, or an unexpected reply.
    #[error("unexpected response: {0:?}")]
    Unexpected(Box<Response>),
}

enum Waiter {
    Once {
        opcode: u16,
        reply: oneshot::Sender<Result<Response, ClientError>>,
    },
    Subscription {
        /// The subscribing request's opcode, to decode its first answer.
        opcode: u16,
        first: Option<oneshot::Sender<Result<Response, ClientError>>>,
        pushes: PushSink,
    },
}

/// Where a subscription's pushes go.
enum PushSink {
    /// `SUBSCRIBE_NOTICES`: settlement notices.
    Notices(mpsc::Sender<Notice>),
    /// Any other subscription: the pushed replies as decoded.
    Replies(mpsc::Sender<Reply>),
}

/// Waiters by request ID, and why the connection closed once it has: a call that registers
/// after the reader stopped must fail at once instead of waiting forever.
#[derive(Default)]
struct PendingMap {
    waiters: HashMap<u64, Waiter>,
    closed: Option<ClientError>,
}

type Pending = Arc<Mutex<PendingMap>>;

/// A connection to a settlegate server. Cheap to share: wrap in an `Arc` and call from many
/// tasks at once.
pub struct Client {
    outgoing: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
}

impl Client {
    /// Connects over TCP (no TLS).
    pub async fn connect(addr: impl ToSocketAddrs) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client::from_stream(stream))
    }

    /// Runs the protocol over any byte stream (a TLS stream, for example). Spawns a reader and a
    /// writer task on the current Tokio runtime.
    pub fn from_stream<S>(stream: S) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, write_half) = tokio::io::split(stream);
        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        let pending: Pending = Arc::default();
        tokio::spawn(write_loop(write_half, queue));
        tokio::spawn(read_loop(read_half, Arc::clone(&pending)));
        Client { outgoing, pending, next_id: AtomicU64::new(1) }
    }

    /// Sends `request` and waits for its response, whatever its status.
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let (reply, receiver) = oneshot::channel();
        self.send(request, Waiter::Once { opcode: request.opcode(), reply }).await?;
        receiver.await.map_err(|_| ClientError::Closed("reader stopped".into()))?
    }

    /// Sends `request` and returns its `OK` reply; any other status is an error.
    pub async fn call_ok(&self, request: &Request) -> Result<Reply, ClientError> {
        match self.call(request).await? {
            Response::Ok(reply) => Ok(reply),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Authenticates with an API key.
    pub async fn authenticate(&self, key: &str) -> Result<(), ClientError> {
        self.call_ok(&Auth { key: key.to_owned() }.into()).await.map(|_| ())
    }

    /// Authorizes a signed inherent ID.
    pub async fn authorize(
        &self,
        client_request_id: u128,
        inherent_id: Vec<u8>,
    ) -> Result<AuthOutcome, ClientError> {
        match self.call_ok(&Authorize { client_request_id, inherent_id }.into()).await? {
            Reply::Authorize(outcome) => Ok(outcome),
            other => Err(ClientError::Unexpected(Box::new(Response::Ok(other)))),
        }
    }

    /// Subscribes to a user's completion notices; they arrive on the returned channel.
    pub async fn subscribe_notices(
        &self,
        user: &UserKey,
        password: &str,
    ) -> Result<mpsc::Receiver<Notice>, ClientError> {
        let request: Request =
            SubscribeNotices { user: user.clone(), password: password.to_owned() }.into();
        let (first, receiver) = oneshot::channel();
        let (notices, stream) = mpsc::channel(NOTICE_QUEUE);
        let waiter = Waiter::Subscription {
            opcode: opcode::SUBSCRIBE_NOTICES,
            first: Some(first),
            pushes: PushSink::Notices(notices),
        };
        self.send(&request, waiter).await?;
        match receiver.await.map_err(|_| ClientError::Closed("reader stopped".into()))?? {
            Response::Ok(_) => Ok(stream),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Sends a subscribing request (`SUBSCRIBE_DEVICE`) and returns its first answer and the
    /// stream of what is pushed under it (`DEVICE_MESSAGE` replies).
    pub async fn subscribe_device(
        &self,
        request: &Request,
    ) -> Result<(Reply, mpsc::Receiver<Reply>), ClientError> {
        let (first, receiver) = oneshot::channel();
        let (pushes, stream) = mpsc::channel(NOTICE_QUEUE);
        let waiter = Waiter::Subscription {
            opcode: request.opcode(),
            first: Some(first),
            pushes: PushSink::Replies(pushes),
        };
        self.send(request, waiter).await?;
        match receiver.await.map_err(|_| ClientError::Closed("reader stopped".into()))?? {
            Response::Ok(reply) => Ok((reply, stream)),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    async fn send(&self, request: &Request, waiter: Waiter) -> Result<(), ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::new();
        request
            .encode_frame(request_id, &mut bytes)
            .map_err(|too_large| ClientError::Request(too_large.to_string()))?;
        {
            let mut pending = self.pending.lock().expect("pending lock");
            if let Some(reason) = &pending.closed {
                return Err(reason.clone());
            }
            pending.waiters.insert(request_id, waiter);
        }
        if self.outgoing.send(bytes).await.is_err() {
            self.pending.lock().expect("pending lock").waiters.remove(&request_id);
            return Err(ClientError::Closed("writer stopped".into()));
        }
        Ok(())
    }
}

async fn write_loop<W: AsyncWrite>(write_half: W, mut queue: mpsc::Receiver<Vec<u8>>) {
    tokio::pin!(write_half);
    let mut buffer = Vec::with_capacity(64 * 1024);
    while let Some(first) = queue.recv().await {
        buffer.clear();
        buffer.extend_from_slice(&first);
        // Everything already queued goes out in the same write.
        while buffer.len() < 256 * 1024 {
            match queue.try_recv() {
                Ok(more) => buffer.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if write_half.write_all(&buffer).await.is_err() || write_half.flush().await.is_err() {
            return;
        }
    }
    let _ = write_half.shutdown().await;
}

async fn read_loop<R: AsyncRead>(read_half: R, pending: Pending) {
    tokio::pin!(read_half);
    let mut buffer = Vec::with_capacity(64 * 1024);
    let reason = loop {
        let mut used = 0;
        let stop = loop {
            match frame::decode_ref(&buffer[used..]) {
                Ok(Some((frame, len))) => {
                    used += len;
                    if let Err(error) = deliver(&pending, frame) {
                        break Some(error);
                    }
                }
                Ok(None) => break None,
                Err(error) => {
                    break Some(ClientError::Protocol(format!("bad frame from server: {error}")))
                }
            }
        };
        if let Some(error) = stop {
            break error;
        }
        // Only the partial frame at the end (if any) moves to the front.
        buffer.drain(..used);
        buffer.reserve(16 * 1024);
        match read_half.read_buf(&mut buffer).await {
            Ok(0) => break ClientError::Closed("server closed the connection".into()),
            Ok(_) => {}
            Err(error) => break ClientError::Closed(error.to_string()),
        }
    };
    let mut pending = pending.lock().expect("pending lock");
    pending.closed = Some(reason.clone());
    for (_, waiter) in pending.waiters.drain() {
        if let Waiter::Once { reply, .. } | Waiter::Subscription { first: Some(reply), .. } = waiter
        {
            let _ = reply.send(Err(reason.clone()));
        }
    }
}

fn deliver(pending: &Pending, frame: FrameRef<'_>) -> Result<(), ClientError> {
    if frame.request_id == 0 && frame.opcode == 0 {
        // A FRAME_ERROR: the server is about to close; report it to everyone waiting.
        let response = Response::decode(0, frame.status, frame.body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        return Err(ClientError::Unexpected(Box::new(response)));
    }
    let mut pending = pending.lock().expect("pending lock");
    if frame.flags & FLAG_PUSH != 0 {
        let Some(Waiter::Subscription { pushes, .. }) = pending.waiters.get(&frame.request_id)
        else {
            return Ok(()); // A push for a subscription nobody holds any more.
        };
        let response = Response::decode(frame.opcode, frame.status, frame.body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let delivered = match (pushes, response) {
            (PushSink::Notices(notices), Response::Ok(Reply::Notice(notice))) => {
                notices.try_send(notice).is_ok()
            }
            (PushSink::Replies(replies), Response::Ok(reply)) => replies.try_send(reply).is_ok(),
            _ => true,
        };
        if !delivered {
            pending.waiters.remove(&frame.request_id); // Receiver gone or too far behind.
        }
        return Ok(());
    }
    match pending.waiters.remove(&frame.request_id) {
        Some(Waiter::Once { opcode, reply }) => {
            let response = Response::decode(opcode, frame.status, frame.body)
                .map_err(|e| ClientError::Protocol(format!("response to {opcode:#06x}: {e}")));
            let _ = reply.send(response);
        }
        Some(Waiter::Subscription { opcode, first, pushes }) => {
            let response = Response::decode(opcode, frame.status, frame.body)
                .map_err(|e| ClientError::Protocol(e.to_string()));
            let subscribed = matches!(response, Ok(Response::Ok(_)));
            if let Some(first) = first {
                let _ = first.send(response);
            }
            if subscribed {
                let waiter = Waiter::Subscription { opcode, first: None, pushes };
                pending.waiters.insert(frame.request_id, waiter);
            }
        }
        None => {
            return Err(ClientError::Protocol(format!(
                "response for unknown request ID {}",
                frame.request_id
            )))
        }
    }
    Ok(())
}
