//! The connection's two I/O tasks: the reader (socket to decoded messages) and the writer
//! (queued frames to the socket, gathered into one write). The session in `conn.rs` owns
//! everything else.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use zeroize::{Zeroize, Zeroizing};

use super::codec::{self, Message, LENGTH_HEADER_LEN, MESSAGE_LEN_MAX};
use super::{bump, Shared};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;
/// Most bytes gathered into one write.
const WRITE_BATCH_MAX: usize = 64 * 1024;

/// What the reader tells the session.
pub(crate) enum Inbound {
    /// A decoded message.
    Message(Message),
    /// The connection ended (or lost its framing), with why.
    Closed(String),
}

/// Reads frames, decodes them and queues them for the session. A message that does not decode
/// is logged (MTI and error only: never contents) and dropped; a bad length header loses the
/// framing, so it ends the connection.
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(
    mut read: R,
    inbound: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
) {
    // Holds at most one partial frame plus one read.
    let mut buf: Vec<u8> = Vec::with_capacity(LENGTH_HEADER_LEN + MESSAGE_LEN_MAX + READ_CHUNK);
    loop {
        let filled = buf.len();
        buf.resize(filled + READ_CHUNK, 0);
        let read_result = read.read(&mut buf[filled..]).await;
        let reason = match read_result {
            Ok(0) => Some("host closed the connection".to_owned()),
            Ok(n) => {
                buf.truncate(filled + n);
                None
            }
            Err(error) => Some(format!("read: {error}")),
        };
        if let Some(reason) = reason {
            buf.zeroize();
            let _ = inbound.send(Inbound::Closed(reason)).await;
            return;
        }
        let mut used = 0;
        loop {
            let (len, decoded) = match codec::split_frame(&buf[used..]) {
                Ok(Some((len, body))) => (len, codec::decode(body)),
                Ok(None) => break,
                Err(error) => {
                    bump(&shared.counters.malformed_replies);
                    buf.zeroize();
                    let _ = inbound.send(Inbound::Closed(format!("framing lost: {error}"))).await;
                    return;
                }
            };
            used += len;
            match decoded {
                Ok(message) => {
                    if inbound.send(Inbound::Message(message)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    bump(&shared.counters.malformed_replies);
                    tracing::warn!(%error, len, "iso8583: undecodable message dropped");
                }
            }
        }
        buf[..used].zeroize();
        buf.drain(..used);
    }
}

/// Writes queued frames, gathering whatever is queued into one write, and zeroizes them.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut write: W,
    mut out: mpsc::UnboundedReceiver<Zeroizing<Vec<u8>>>,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut batch = Zeroizing::new(Vec::with_capacity(WRITE_BATCH_MAX));
    while let Some(frame) = out.recv().await {
        batch.extend_from_slice(&frame);
        drop(frame);
        while batch.len() < WRITE_BATCH_MAX {
            match out.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        // A TLS stream may hold the last record until flushed; a TCP flush does nothing.
        let result = match write.write_all(&batch).await {
            Ok(()) => write.flush().await,
            Err(error) => Err(error),
        };
        batch.zeroize();
        if let Err(error) = result {
            let _ = inbound.send(Inbound::Closed(format!("write: {error}"))).await;
            return;
        }
    }
}
