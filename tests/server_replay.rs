//! Issue #20: a shard's state is a function of its own log. The real binary runs a mixed
//! workload over real sockets on four shards with a data directory; then each shard is
//! rebuilt by `settlegate replay-shard` in a fresh process, from that shard's snapshot and log
//! alone (no other shard loaded), and must reach the digest the running server reports for it
//! on `/digests`. Once with snapshots off (the whole history replays from the logs), once with
//! a snapshot every few records (a snapshot plus the log after it).

use std::path::Path;
use std::process::{Command, Stdio};

use settlegate_protocol::messages::TerminalEntry;
use settlegate_protocol::messages::{Request, Response};
use settlegate_protocol::ops::{Authorize, RegisterTerminals};
use settlegate_protocol::values::{Discount, TerminalService};
use settlegate_protocol::Client;

use crate::support::request_id;
use crate::support::server::{binary_config, enroll, now_ms, spawn_binary_serving, ADMIN_KEY};

/// Kills the server if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config_file(dir: &Path, snapshot_every: u64) -> std::path::PathBuf {
    let engine = format!(
        "shards = 4\ndurability = {{ data_dir = \"{}\", fsync = \"always\", snapshot_every_records = {snapshot_every} }}",
        dir.join("data").display()
    );
    binary_config(dir, "{ kind = \"simulated\", latency_us_min = 0, latency_us_max = 0 }", &engine)
}

/// `/digests` of the server at `http`: each shard's digest, in shard order.
fn digests_over_http(http: std::net::SocketAddr) -> Vec<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream
        .write_all(b"GET /digests HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    body.split("\"digest\":\"").skip(1).map(|rest| rest[..16].to_owned()).collect()
}

/// Runs `settlegate replay-shard` for `shard` in a fresh process and returns its digest and
/// the records it applied.
fn replay(config: &Path, shard: usize) -> (String, u64) {
    let output = Command::new(env!("CARGO_BIN_EXE_settlegate"))
        .args(["replay-shard", "--config"])
        .arg(config)
        .args(["--shard", &shard.to_string()])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let digest = text.split("\"digest\":\"").nth(1).unwrap()[..16].to_owned();
    let records = text.split("\"records\":").nth(1).unwrap();
    let records = records[..records.find(',').unwrap()].parse().unwrap();
    (digest, records)
}

/// Enrolments, cards, payments approved and declined, a retried payment, a terminal list with
/// a service (a discount the payments' shards read through their commands), a key rotation.
async fn workload(client: &Client) {
    let service = TerminalService {
        discount: Discount::Percent { bps: 500 },
        valid_from_ms: 0,
        valid_until_ms: i64::MAX,
        description: "five percent".into(),
    };
    let terminals = Request::RegisterTerminals(RegisterTerminals {
        client_request_id: request_id().get(),
        provider_code: 1,
        terminals: vec![
            TerminalEntry { terminal_id: "SHOP-1".into(), service: Some(service) },
            TerminalEntry { terminal_id: "SHOP-2".into(), service: None },
        ],
    });
    client.call_ok(&terminals).await.unwrap();
    for n in 0..12 {
        let mut payer = enroll(client, &format!("replay-{n}-{}", now_ms())).await;
        for (amount, terminal) in [(1_000, "SHOP-1"), (2_500, "SHOP-2"), (700, "SHOP-1")] {
            let id = request_id();
            let request = Request::Authorize(Authorize {
                client_request_id: id.get(),
                inherent_id: payer.sign(amount, 1, terminal),
            });
            let first = client.call(&request).await.unwrap();
            // A retry is answered from the idempotency record, and changes nothing.
            let again = client.call(&request).await.unwrap();
            assert_eq!(format!("{first:?}"), format!("{again:?}"));
        }
        // A payment to a provider that does not exist is declined in its shard.
        let unknown = Request::Authorize(Authorize {
            client_request_id: request_id().get(),
            inherent_id: payer.sign(100, 9, "SHOP-1"),
        });
        assert!(matches!(client.call(&unknown).await.unwrap(), Response::Ok(_)));
    }
}

async fn digests_match_replays(snapshot_every: u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), snapshot_every);
    let (child, addr, http) = spawn_binary_serving(&config, "error", Stdio::inherit());
    let _server = KillOnDrop(child);
    let client = Client::connect(addr).await.unwrap();
    client.authenticate(ADMIN_KEY).await.unwrap();
    workload(&client).await;
    let live = digests_over_http(http);
    assert_eq!(live.len(), 4, "one digest per shard");
    let mut total = 0;
    for (shard, digest) in live.iter().enumerate() {
        let (replayed, records) = replay(&config, shard);
        assert_eq!(&replayed, digest, "shard {shard}: its log alone rebuilds it");
        total += records;
    }
    if snapshot_every == 0 {
        assert!(total > 100, "the logs hold the workload: {total} records");
    }
    // The digest sees a change: one more payment moves its shard's digest.
    let mut payer = enroll(&client, &format!("replay-last-{}", now_ms())).await;
    let request = Request::Authorize(Authorize {
        client_request_id: request_id().get(),
        inherent_id: payer.sign(10, 1, "SHOP-2"),
    });
    client.call(&request).await.unwrap();
    let after = digests_over_http(http);
    assert_ne!(after, live, "a payment changes its shard's digest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_replays_from_its_own_log_alone_to_the_running_digest() {
    digests_match_replays(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_snapshots_each_shard_replays_to_the_running_digest() {
    digests_match_replays(7).await;
}
