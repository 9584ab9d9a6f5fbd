//! The owner's side of a partition's replicated log: the shard's jobs become messages, one per
//! group commit, each published with `Nats-Expected-Last-Sequence` (several in flight, the
//! k-th expecting `last + k - 1`), and a job's replies are released only once the stream has
//! acknowledged the message holding its last record, in order.
//!
//! A refused append (`wrong last sequence`, JetStream error 10071) means another node fenced
//! the partition: every reply still held is dropped (its caller answers `MOVED`) and the
//! partition is [`Role::Lost`] here. An acknowledgement that does not come (a stream leader's
//! election, a lost connection) is not a refusal: the messages in flight are sent again, in
//! order, with the same message IDs, which the stream's duplicate window recognises; after
//! [`ClusterConfig::append_give_up_ms`] of that the partition is dropped as well.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::{ClusterConfig, Partitions, Role};
use crate::shard::Reply;
use crate::wal::{self, Job, FORMAT_VERSION};

/// A message's payload stays below this (NATS's default `max_payload` is 1 MiB); a group commit
/// larger than that becomes several messages.
const MESSAGE_BYTES_MAX: usize = 512 * 1024;

/// The header naming the epoch of the owner that appended a message.
pub(super) const EPOCH_HEADER: &str = "Sg-Epoch";
/// The header that makes a message a fence: the node and epoch taking the partition.
pub(super) const FENCE_HEADER: &str = "Sg-Fence";
/// The header naming how a message's records are encoded: `lz4` (LZ4's block format, the
/// records' length first, as little-endian `u32`); absent: the framed records as they are.
pub(super) const ENCODING_HEADER: &str = "Sg-Encoding";
const LZ4: &str = "lz4";
/// The header naming the record format of a message's records: the appending build's
/// [`FORMAT_VERSION`], in decimal. A node refuses (does not apply) records of a format newer
/// than its own, rather than read them as if they were of its own.
pub(super) const FORMAT_HEADER: &str = "Sg-Format";
/// The record format of a message without [`FORMAT_HEADER`] (appended by a build before the
/// header): such builds wrote formats 8 to 11, whose records all read as format 11's (9 only
/// promised what a command made afresh, as an owner appends them, always carries; 10 changed
/// the log file's framing; 11 added a record kind).
const UNVERSIONED_FORMAT: u16 = 11;
/// A message's records, decompressed, are at most this long (a message holds up to
/// [`MESSAGE_BYTES_MAX`] of them, or one record longer than that on its own).
const RECORDS_BYTES_MAX: usize = 64 << 20;

/// A message's records as they go to NATS: LZ4-compressed when that makes them shorter (the
/// records of a group compress several times over: rkyv's padding, repeated IDs and names),
/// so that the stream's servers replicate and sync fewer bytes.
#[derive(Clone)]
struct Wire {
    bytes: Bytes,
    lz4: bool,
}

impl Wire {
    fn of(records: &[u8]) -> Wire {
        let compressed = lz4_flex::block::compress_prepend_size(records);
        if compressed.len() < records.len() {
            Wire { bytes: Bytes::from(compressed), lz4: true }
        } else {
            Wire { bytes: Bytes::copy_from_slice(records), lz4: false }
        }
    }
}

/// A message's records: framed as a log frames them, in the record format they were written
/// in (empty for a fence or a hand-over, which hold none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Records {
    /// Their format ([`FORMAT_VERSION`] of the build that appended them).
    pub(super) format: u16,
    /// The framed records.
    pub(super) framed: Bytes,
}

impl Records {
    /// Records this build framed.
    pub(super) fn current(framed: Bytes) -> Records {
        Records { format: FORMAT_VERSION, framed }
    }

    /// Records of `format`, if this build reads it: not one newer than its own.
    pub(super) fn of_format(format: u16, framed: Bytes) -> Result<Records, String> {
        if format > FORMAT_VERSION {
            return Err(format!(
                "records of format {format}, newer than this build's {FORMAT_VERSION}: this \
                 node must be upgraded to apply them"
            ));
        }
        Ok(Records { format, framed })
    }
}

/// The records of a message as the stream delivered it (`headers`, `payload`): decompressed,
/// in the format its header names. Refused if that format is newer than this build's.
pub(super) fn records_of(
    headers: Option<&async_nats::HeaderMap>,
    payload: &Bytes,
) -> Result<Records, String> {
    let format = match headers.and_then(|h| h.get(FORMAT_HEADER)) {
        None => UNVERSIONED_FORMAT,
        Some(value) => value.as_str().parse::<u16>().map_err(|_| {
            format!("a message of record format {:?}, not a number", value.as_str())
        })?,
    };
    Records::of_format(format, framed_of(headers, payload)?)
}

/// The framed records of a message's `payload`, decompressed as its `headers` say.
fn framed_of(headers: Option<&async_nats::HeaderMap>, payload: &Bytes) -> Result<Bytes, String> {
    let encoding = headers.and_then(|h| h.get(ENCODING_HEADER)).map(|v| v.as_str());
    match encoding {
        None => Ok(payload.clone()),
        Some(LZ4) => {
            let len = payload
                .get(..4)
                .map(|n| u32::from_le_bytes(n.try_into().expect("4")) as usize)
                .ok_or("an lz4 message shorter than its length")?;
            if len > RECORDS_BYTES_MAX {
                return Err(format!("an lz4 message of {len} bytes of records"));
            }
            lz4_flex::block::decompress_size_prepended(payload)
                .map(Bytes::from)
                .map_err(|e| format!("an lz4 message that does not decompress: {e}"))
        }
        Some(other) => Err(format!("a message encoded as {other:?}, unknown to this build")),
    }
}

/// An acknowledgement awaited.
type AckFuture = <PublishAckFuture as std::future::IntoFuture>::IntoFuture;

type Replies = Vec<(oneshot::Sender<Vec<Reply>>, Vec<Reply>)>;

/// A message published and not yet acknowledged.
struct Pending {
    /// The records, as published.
    wire: Wire,
    /// The records, framed (for the restart cache).
    payload: Bytes,
    /// The sequence it expects the stream to end at (it takes the next).
    expected_last: u64,
    /// Released once it is acknowledged.
    replies: Replies,
    /// When it was (last) published.
    sent: Instant,
}

/// What one append task needs.
pub(super) struct Appender {
    pub(super) js: async_nats::jetstream::Context,
    pub(super) config: Arc<ClusterConfig>,
    pub(super) partitions: Arc<Partitions>,
    pub(super) partition: usize,
    pub(super) epoch: u64,
    /// The partitions' count (in a snapshot's header).
    pub(super) count: usize,
    /// Where snapshots go.
    pub(super) store: async_nats::jetstream::object_store::ObjectStore,
    /// The last sequence the stream acknowledged: snapshots wait for it.
    pub(super) acked: tokio::sync::watch::Sender<u64>,
}

/// A message for `partition` at `epoch` expecting the stream to end at `expected_last`: its ID
/// makes a resend of the same message a duplicate the stream drops.
fn message(
    config: &ClusterConfig,
    partition: usize,
    epoch: u64,
    expected_last: u64,
    wire: &Wire,
) -> PublishMessage {
    let message = PublishMessage::build()
        .payload(wire.bytes.clone())
        .expected_last_sequence(expected_last)
        .message_id(message_id(config, partition, epoch, expected_last))
        .header(EPOCH_HEADER, epoch.to_string().as_str())
        .header(FORMAT_HEADER, FORMAT_VERSION.to_string().as_str());
    if wire.lz4 {
        message.header(ENCODING_HEADER, LZ4)
    } else {
        message
    }
}

/// The ID of the message of `partition` at `epoch` that expects the stream to end at
/// `expected_last`.
fn message_id(config: &ClusterConfig, partition: usize, epoch: u64, expected_last: u64) -> String {
    format!("{}-{partition}-{epoch}-{expected_last}", config.name)
}

/// Why appends stopped.
enum Stop {
    /// The engine stopped (the queue closed).
    Closed,
    /// Another node fenced the partition, or appends failed for too long.
    Fenced(String),
    /// Everything queued is appended and acknowledged, and a hand-over was asked for.
    HandOver(HandOver, u64),
}

/// A planned move's request to the append task: once everything queued is acknowledged,
/// append the hand-over record and give the queue back.
pub(super) struct HandOver {
    /// The node the partition goes to.
    pub(super) to: String,
    /// The queue and the hand-over record's sequence; or why not.
    pub(super) reply: oneshot::Sender<Result<Handed, String>>,
}

/// What a hand-over gives back: the partition's queue, and the stream sequence it ends at.
pub(super) struct Handed {
    pub(super) jobs: mpsc::UnboundedReceiver<Job<Vec<Reply>>>,
    pub(super) sequence: u64,
}

impl Appender {
    /// Appends the partition's jobs from `jobs` after stream sequence `last` until the engine
    /// stops or the partition is lost.
    pub(super) async fn run(
        self,
        mut jobs: mpsc::UnboundedReceiver<Job<Vec<Reply>>>,
        mut handovers: mpsc::UnboundedReceiver<HandOver>,
        last: u64,
    ) {
        let partition = self.partition;
        match self.append(&mut jobs, &mut handovers, last).await {
            Stop::Closed => {}
            Stop::HandOver(ask, last) => {
                let handover = PublishMessage::build()
                    .expected_last_sequence(last)
                    .message_id(format!("{}-{partition}-handover-{}", self.config.name, self.epoch))
                    .header(FENCE_HEADER, format!("handover {} {}", ask.to, self.epoch).as_str());
                let acked =
                    match self.js.send_publish(self.config.subject(partition), handover).await {
                        Ok(ack) => ack.await.map_err(|e| e.to_string()),
                        Err(error) => Err(error.to_string()),
                    };
                if let Ok(ack) = &acked {
                    self.partitions.cached(partition, ack.sequence, &Records::default());
                }
                let handed = acked.map(|ack| Handed { jobs, sequence: ack.sequence });
                if handed.is_err() {
                    // Not appended (or not known to be): the partition is not this node's to
                    // keep serving, nor to hand on.
                    self.partitions.set_role(partition, Role::Lost);
                }
                let _ = ask.reply.send(handed);
            }
            Stop::Fenced(why) => {
                tracing::warn!(
                    partition,
                    epoch = self.epoch,
                    why,
                    "partition lost: this node no longer appends to it"
                );
                // Jobs still queued are dropped with their replies: their callers answer MOVED.
                jobs.close();
                while jobs.recv().await.is_some() {}
            }
        }
    }

    /// The front message is acknowledged at `sequence`: its replies leave.
    fn release(&self, pending: &mut VecDeque<Pending>, sequence: u64) {
        let done = pending.pop_front().expect("an acknowledged message is pending");
        self.partitions.slots[self.partition].appends.ack.record_duration(done.sent.elapsed());
        self.partitions.cached(self.partition, sequence, &Records::current(done.payload));
        let slot = &self.partitions.slots[self.partition];
        slot.applied.store(sequence, std::sync::atomic::Ordering::Release);
        self.acked.send_replace(sequence);
        for (reply, replies) in done.replies {
            let _ = reply.send(replies);
        }
    }

    /// Stores `payload`, a capture covering the stream up to `covered`, once the stream has
    /// acknowledged that far, and purges the stream behind it (`cluster/snapshots.rs`).
    fn snapshot(&self, payload: crate::wal::SnapshotPayload, covered: u64) {
        let pending = super::snapshots::Pending {
            js: self.js.clone(),
            store: self.store.clone(),
            config: Arc::clone(&self.config),
            partition: self.partition,
            count: self.count,
            covered,
            payload,
        };
        tokio::spawn(pending.store(self.acked.subscribe()));
    }

    /// The partition is lost here: marked so before the replies held are dropped, so that
    /// their callers answer `MOVED`.
    fn fenced(&self, why: String) -> Stop {
        self.partitions.set_role(self.partition, Role::Lost);
        Stop::Fenced(why)
    }

    async fn append(
        &self,
        jobs: &mut mpsc::UnboundedReceiver<Job<Vec<Reply>>>,
        handovers: &mut mpsc::UnboundedReceiver<HandOver>,
        mut last: u64,
    ) -> Stop {
        let mut handing: Option<HandOver> = None;
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut acks: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        // The sequence the next message expects the stream to end at.
        let mut next_last = last;
        loop {
            // Asked to hand over (the shard applies nothing more by then): done once all that
            // was queued is acknowledged.
            if handing.is_some() && pending.is_empty() && jobs.is_empty() {
                return Stop::HandOver(handing.take().expect("asked"), last);
            }
            tokio::select! {
                biased;
                ask = handovers.recv(), if handing.is_none() => {
                    match ask {
                        Some(ask) => handing = Some(ask),
                        None => return Stop::Closed,
                    }
                }
                ack = acks.next(), if !acks.is_empty() => {
                    let front = pending.front().expect("an ack per pending message");
                    match ack.expect("not empty") {
                        Ok(ack) if ack.sequence == front.expected_last + 1 || ack.duplicate => {
                            last = ack.sequence;
                            self.release(&mut pending, last);
                        }
                        Ok(ack) => {
                            return self.fenced(format!("acknowledged at sequence {} where {} was expected", ack.sequence, front.expected_last + 1));
                        }
                        Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                            return self.fenced(format!("append refused: {error}"));
                        }
                        Err(error) => {
                            tracing::warn!(partition = self.partition, %error, in_flight = pending.len(), "append not acknowledged; sending again");
                            acks = FuturesOrdered::new();
                            match self.resend(&mut pending, &mut last).await {
                                Ok(()) => {}
                                Err(stop) => return stop,
                            }
                            next_last = last;
                        }
                    }
                }
                job = jobs.recv(), if pending.len() < self.config.inflight_max => {
                    let Some(job) = job else { return Stop::Closed };
                    let mut group = vec![job];
                    while let Ok(job) = jobs.try_recv() {
                        group.push(job);
                    }
                    for piece in messages(group) {
                        let (payload, replies, records) = match piece {
                            Piece::Message(payload, replies, records) => (payload, replies, records),
                            Piece::Snapshot(payload) => {
                                // It covers every message published before it.
                                self.snapshot(payload, next_last);
                                continue;
                            }
                        };
                        if payload.is_empty() {
                            // Replies with no records (queries, refusals) wait for the messages
                            // before them, never overtaking a change they observed.
                            match pending.back_mut() {
                                Some(back) => back.replies.extend(replies),
                                None => replies.into_iter().for_each(|(reply, replies)| _ = reply.send(replies)),
                            }
                            continue;
                        }
                        let wire = Wire::of(&payload);
                        let stats = &self.partitions.slots[self.partition].appends;
                        stats.records.record(records as f64);
                        stats.kib.record(wire.bytes.len() as f64 / 1024.0);
                        stats.in_flight.record(pending.len() as f64);
                        let publish = message(&self.config, self.partition, self.epoch, next_last, &wire);
                        match self.js.send_publish(self.config.subject(self.partition), publish).await {
                            Ok(ack) => acks.push_back(ack.into_future()),
                            Err(error) => {
                                // Not sent: the resend below sends it with the rest.
                                tracing::warn!(partition = self.partition, %error, "append not sent");
                                acks = FuturesOrdered::new();
                                pending.push_back(Pending { wire, payload, expected_last: next_last, replies, sent: Instant::now() });
                                if let Err(stop) = self.resend(&mut pending, &mut last).await {
                                    return stop;
                                }
                                next_last = last;
                                continue;
                            }
                        }
                        pending.push_back(Pending { wire, payload, expected_last: next_last, replies, sent: Instant::now() });
                        next_last += 1;
                    }
                }
            }
        }
    }

    /// Sends every pending message again, in order, one at a time, each awaited; the stream
    /// drops one it already holds as a duplicate (same ID) and acknowledges it with its
    /// sequence. Gives up after `append_give_up_ms`.
    async fn resend(&self, pending: &mut VecDeque<Pending>, last: &mut u64) -> Result<(), Stop> {
        let started = Instant::now();
        let give_up = Duration::from_millis(self.config.append_give_up_ms);
        while let Some(front) = pending.front() {
            let expected_last = *last;
            if started.elapsed() > give_up {
                return Err(self.fenced(format!("no acknowledgement for {give_up:?}")));
            }
            let publish =
                message(&self.config, self.partition, self.epoch, expected_last, &front.wire);
            let sent = self.js.send_publish(self.config.subject(self.partition), publish).await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(error) => Err(error),
            };
            // The stream checks the expected sequence before it looks for duplicates: a resend of
            // a message that landed (its acknowledgement lost) is refused as if fenced. So a
            // refusal is checked against the stream: is the message after `last` this one?
            let acked = match acked {
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    let id = message_id(&self.config, self.partition, self.epoch, expected_last);
                    if self.landed(expected_last + 1, &id).await {
                        Ok(expected_last + 1)
                    } else {
                        return Err(self.fenced(format!("append refused: {error}")));
                    }
                }
                Ok(ack) if ack.sequence == expected_last + 1 || ack.duplicate => Ok(ack.sequence),
                Ok(ack) => {
                    return Err(
                        self.fenced(format!("resend acknowledged at sequence {}", ack.sequence))
                    )
                }
                Err(error) => Err(error),
            };
            match acked {
                Ok(sequence) => {
                    *last = sequence;
                    self.release(pending, sequence);
                }
                Err(error) => {
                    tracing::warn!(partition = self.partition, %error, "append not acknowledged; sending again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(())
    }
}

impl Appender {
    /// Whether the stream holds, at `sequence`, the message with ID `id`.
    async fn landed(&self, sequence: u64, id: &str) -> bool {
        let Ok(stream) = self.js.get_stream(self.config.stream(self.partition)).await else {
            return false;
        };
        let Ok(message) = stream.get_raw_message(sequence).await else { return false };
        let header = message.headers.get(async_nats::header::NATS_MESSAGE_ID);
        header.is_some_and(|value| value.as_str() == id)
    }
}

/// Splits a group of jobs into message payloads of at most [`MESSAGE_BYTES_MAX`] (a job's own
/// records may span messages), each with the replies of the jobs whose last record it holds.
fn messages(group: Vec<Job<Vec<Reply>>>) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut payload = Vec::new();
    let mut replies: Replies = Vec::new();
    let mut records_in = 0;
    for job in group {
        match job {
            Job::Records { records, reply, replies: values } => {
                for (record, crc) in records.iter() {
                    if !payload.is_empty() && payload.len() + record.len() + 8 > MESSAGE_BYTES_MAX {
                        out.push(Piece::Message(
                            Bytes::from(std::mem::take(&mut payload)),
                            std::mem::take(&mut replies),
                            std::mem::take(&mut records_in),
                        ));
                    }
                    wal::frame_records(std::iter::once((record, crc)), &mut payload);
                    records_in += 1;
                }
                replies.push((reply, values));
            }
            // A capture of the state after every record before it: what is queued so far goes
            // out first.
            Job::Snapshot { payload: capture, .. } => {
                if !payload.is_empty() || !replies.is_empty() {
                    let message = Bytes::from(std::mem::take(&mut payload));
                    let records = std::mem::take(&mut records_in);
                    out.push(Piece::Message(message, std::mem::take(&mut replies), records));
                }
                out.push(Piece::Snapshot(capture));
            }
        }
    }
    if !payload.is_empty() || !replies.is_empty() {
        out.push(Piece::Message(Bytes::from(payload), replies, records_in));
    }
    out
}

/// A message to append (its framed records, the replies it releases, and how many records it
/// holds), or a snapshot of the state after every message before it.
enum Piece {
    Message(Bytes, Replies, usize),
    Snapshot(crate::wal::SnapshotPayload),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(encoding: &str) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(ENCODING_HEADER, encoding);
        headers
    }

    #[test]
    fn records_compress_and_come_back_whole_and_a_message_without_the_header_is_taken_as_is() {
        let mut framed = Vec::new();
        for n in 0..200u32 {
            let mut record = rkyv::util::AlignedVec::<16>::new();
            record.extend_from_slice(format!("user-{} terminal-0001 JPY", n % 7).as_bytes());
            wal::frame_records(
                std::iter::once((&record[..], crc32fast::hash(&record))),
                &mut framed,
            );
        }
        let wire = Wire::of(&framed);
        assert!(wire.lz4 && wire.bytes.len() < framed.len() / 2, "{} bytes", wire.bytes.len());
        let back = records_of(Some(&headers(LZ4)), &wire.bytes).unwrap();
        assert_eq!(&back.framed[..], &framed[..]);
        let raw = Bytes::from(framed.clone());
        assert_eq!(records_of(None, &raw).unwrap().framed, raw);
        // Records that do not compress go as they are.
        let noise: Vec<u8> =
            (0..64u32).map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        assert!(!Wire::of(&noise).lz4);
    }

    #[test]
    fn a_message_claiming_too_much_or_damaged_or_of_an_unknown_encoding_is_refused() {
        let mut huge = ((RECORDS_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        let error = records_of(Some(&headers(LZ4)), &Bytes::from(huge)).unwrap_err();
        assert!(error.contains("bytes of records"), "{error}");
        let cut = Wire::of(&[7u8; 4096]).bytes.slice(..8);
        assert!(records_of(Some(&headers(LZ4)), &cut).is_err());
        assert!(records_of(Some(&headers(LZ4)), &Bytes::from_static(b"ab")).is_err());
        let error = records_of(Some(&headers("zstd")), &Bytes::from_static(b"x")).unwrap_err();
        assert!(error.contains("unknown"), "{error}");
    }

    /// What the stream delivered with `format` (a header value) as its record format.
    fn of_format(format: Option<&str>) -> Result<Records, String> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(format) = format {
            headers.insert(FORMAT_HEADER, format);
        }
        records_of(Some(&headers), &Bytes::from_static(b"records"))
    }

    /// A node reads records of its own format and older ones (a message without the header as
    /// format 11, what builds before the header wrote), and refuses a newer one or a header
    /// that is not a number, rather than read it as its own. (That every appended message
    /// names its format is shown on the wire: `tests/cluster.rs`.)
    #[test]
    fn a_newer_record_format_is_refused() {
        let own = of_format(Some(&FORMAT_VERSION.to_string())).unwrap();
        assert_eq!((own.format, &own.framed[..]), (FORMAT_VERSION, &b"records"[..]));
        assert_eq!(of_format(Some("9")).unwrap().format, 9);
        assert_eq!(of_format(None).unwrap().format, UNVERSIONED_FORMAT);
        let newer = (FORMAT_VERSION + 1).to_string();
        let error = of_format(Some(&newer)).unwrap_err();
        assert!(error.contains(&format!("format {newer}, newer than this build's")), "{error}");
        let error = of_format(Some("eleven")).unwrap_err();
        assert!(error.contains("not a number"), "{error}");
    }
}
