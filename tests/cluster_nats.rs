//! The NATS test cluster (`support::nats`) and the fencing primitive the cluster design rests
//! on: a publish carrying `Nats-Expected-Last-Sequence` is appended only when the stream's last
//! sequence is the one expected, a check the stream leader makes with the append, so an owner
//! that lost its partition cannot append after the new owner's fence.

use std::time::{Duration, Instant};

use async_nats::header::NATS_EXPECTED_LAST_SEQUENCE;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream, ErrorCode};
use async_nats::HeaderMap;

use crate::support::nats::NatsCluster;

/// A partition's stream, as the cluster mode creates one: R3, file storage.
fn partition_stream(name: &str) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.log")],
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Creates partition stream `name` and waits until it has a leader: a publish before that can
/// find no stream to take it (`StreamNotFound`: no responder on its subject yet). Returns the
/// leader.
async fn create_partition_stream(
    js: &jetstream::Context,
    cluster: &NatsCluster,
    name: &str,
) -> usize {
    js.create_stream(partition_stream(name)).await.expect("create stream");
    cluster.wait_stream_leader(name, None, Duration::from_secs(10))
}

/// A JetStream context on `urls` (requests and acks time out after async-nats's 5 s).
async fn jetstream_on(urls: Vec<String>) -> jetstream::Context {
    jetstream::new(async_nats::connect(urls).await.expect("connect to nats"))
}

/// Headers that make a publish append only if the stream's last sequence is `expected_last`.
fn expecting(expected_last: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_EXPECTED_LAST_SEQUENCE, expected_last.to_string().as_str());
    headers
}

/// Publishes `payload` to `stream`'s subject, appended only if the stream's last sequence is
/// `expected_last`.
async fn append(
    js: &jetstream::Context,
    stream: &str,
    expected_last: u64,
    payload: &str,
) -> Result<PublishAck, PublishError> {
    let subject = format!("{stream}.log");
    js.publish_with_headers(subject, expecting(expected_last), payload.to_owned().into())
        .await?
        .await
}

/// The JetStream error code a refused publish carries.
fn error_code(error: &PublishError) -> Option<ErrorCode> {
    let source = std::error::Error::source(error)?;
    source.downcast_ref::<jetstream::Error>().map(|error| error.error_code())
}

/// Asserts that `result` is the refusal of a stale expected sequence: error 10071.
fn assert_wrong_last_sequence(result: Result<PublishAck, PublishError>) {
    let error = result.expect_err("a stale expected sequence is refused");
    assert_eq!(error.kind(), PublishErrorKind::WrongLastSequence, "{error:?}");
    assert_eq!(error_code(&error), Some(ErrorCode(10071)), "{error:?}");
    assert_eq!(ErrorCode::STREAM_WRONG_LAST_SEQUENCE, ErrorCode(10071));
}

/// The payloads of messages 1..=`last` of `stream`, read back from the stream.
async fn payloads(js: &jetstream::Context, stream: &str, last: u64) -> Vec<String> {
    let stream = js.get_stream(stream).await.expect("stream info");
    let mut out = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.expect("stored message");
        out.push(String::from_utf8(message.payload.to_vec()).unwrap());
    }
    out
}

/// The last sequence of `stream` in server `i`'s own replica, from its monitoring port.
fn replica_last_seq(cluster: &NatsCluster, i: usize, stream: &str) -> Option<u64> {
    let jsz = cluster.monitor(i, "/jsz?accounts=true&streams=true")?;
    let accounts = jsz["account_details"].as_array()?;
    let mut details =
        accounts.iter().flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
    details.find(|d| d["name"] == stream)?["state"]["last_seq"].as_u64()
}

/// Waits up to 30 s until server `i`'s replica of `stream` ends at `last`.
fn wait_replica_caught_up(cluster: &NatsCluster, i: usize, stream: &str, last: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    crate::support::nats::poll_until(deadline, || {
        Ok::<_, String>((replica_last_seq(cluster, i, stream) == Some(last)).then_some(()))
    })
    .unwrap_or_else(|_| {
        panic!("{}'s replica of {stream} did not reach {last}", cluster.server_name(i))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_sequence_is_refused_and_acks_survive_killing_the_stream_leader() {
    const STREAM: &str = "FENCE";
    const ACKED: u64 = 10;
    let mut cluster = NatsCluster::start(3);
    let js = jetstream_on(cluster.client_urls()).await;
    create_partition_stream(&js, &cluster, STREAM).await;

    let mut written = Vec::new();
    for last in 0..ACKED {
        let payload = format!("m{}", last + 1);
        let ack = append(&js, STREAM, last, &payload).await.expect("the expected sequence acks");
        assert_eq!((ack.stream.as_str(), ack.sequence), (STREAM, last + 1));
        written.push(payload);
    }
    // Behind the stream's end (a zombie owner) and ahead of it: both refused, nothing appended.
    assert_wrong_last_sequence(append(&js, STREAM, ACKED - 3, "zombie").await);
    assert_wrong_last_sequence(append(&js, STREAM, ACKED + 1, "ahead").await);
    let mut stream = js.get_stream(STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.last_sequence, ACKED);

    // SIGKILL the stream's leader: another is elected, and every acknowledged message is there.
    let leader = cluster.wait_stream_leader(STREAM, None, Duration::from_secs(10));
    let killed = Instant::now();
    cluster.kill(leader);
    let new_leader = cluster.wait_stream_leader(STREAM, Some(leader), Duration::from_secs(30));
    eprintln!(
        "stream leader {} killed; {} elected after {:?}",
        cluster.server_name(leader),
        cluster.server_name(new_leader),
        killed.elapsed()
    );
    // The client may still be reconnecting from the killed server: retry until acked. A retry
    // refused with 10071 means the previous try was stored though its ack was lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match append(&js, STREAM, ACKED, "after failover").await {
            Ok(ack) => {
                assert_eq!(ack.sequence, ACKED + 1);
                break;
            }
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => break,
            Err(error) if Instant::now() < deadline => eprintln!("retrying: {error}"),
            Err(error) => panic!("no ack after failover: {error}"),
        }
    }
    eprintln!("first ack after the kill: {:?}", killed.elapsed());
    written.push("after failover".into());
    assert_eq!(payloads(&js, STREAM, ACKED + 1).await, written);
    assert_wrong_last_sequence(append(&js, STREAM, ACKED, "zombie after failover").await);

    // The killed server comes back on its own store and catches up.
    cluster.restart(leader);
    wait_replica_caught_up(&cluster, leader, STREAM, ACKED + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_follower_does_not_stop_acks_and_catches_up_when_resumed() {
    const STREAM: &str = "PAUSE";
    let mut cluster = NatsCluster::start(3);
    let js = jetstream_on(cluster.client_urls()).await;
    let leader = create_partition_stream(&js, &cluster, STREAM).await;

    // A client on the leader's server, so the paused server carries none of its traffic.
    let js = jetstream_on(vec![cluster.url(leader)]).await;
    let follower = (leader + 1) % cluster.len();
    cluster.pause(follower);
    for last in 0..5 {
        let ack = append(&js, STREAM, last, "while paused").await.expect("a quorum of 2 acks");
        assert_eq!(ack.sequence, last + 1);
    }
    assert_eq!(cluster.stream_leader(STREAM), Some(leader));
    cluster.resume(follower);
    wait_replica_caught_up(&cluster, follower, STREAM, 5);
}

/// An owner keeps several appends in flight, each expecting the sequence the one before it
/// will get: the stream leader counts appends it has not yet committed, so all are acked in
/// order; one expecting a sequence already taken is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_appends_each_expecting_the_previous_ones_sequence_are_all_acked() {
    const STREAM: &str = "PIPELINE";
    const IN_FLIGHT: u64 = 32;
    let cluster = NatsCluster::start(3);
    let js = jetstream_on(cluster.client_urls()).await;
    create_partition_stream(&js, &cluster, STREAM).await;

    let mut pending = Vec::new();
    for last in 0..IN_FLIGHT {
        let payload = format!("m{}", last + 1).into();
        let ack = js.publish_with_headers(format!("{STREAM}.log"), expecting(last), payload).await;
        pending.push(ack.expect("sent"));
    }
    for (last, ack) in (0..IN_FLIGHT).zip(pending) {
        assert_eq!(ack.await.expect("acked").sequence, last + 1);
    }
    assert_wrong_last_sequence(append(&js, STREAM, IN_FLIGHT - 1, "stale").await);
    let expected: Vec<String> = (1..=IN_FLIGHT).map(|n| format!("m{n}")).collect();
    assert_eq!(payloads(&js, STREAM, IN_FLIGHT).await, expected);
}
