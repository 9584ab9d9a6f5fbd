//! Crash test: the real binary under load is killed with SIGKILL at random moments, restarted
//! on the same data directory, and every acknowledged operation must still be there.
//!
//! The provider never declines, so every acknowledged payment is an approval: a decline would
//! mean the engine lost something (a card, a device key) and then recorded and replayed that
//! loss faithfully, which a check of "the same answer after the restart" alone would accept.
//! After every restart each acknowledged means is listed and each acknowledged device key
//! verifies a new payment, approved; and each acknowledged payment presented again (same
//! counter, a fresh timestamp) is refused as a replay, whatever the time since.
//!
//! `SETTLEGATE_CRASH_ROUNDS` (default 5) sets the number of kills; `scripts/crash.sh` runs a
//! long version.

use settlegate_protocol::messages::MeansList;
use settlegate_protocol::ops::code_state::GetCodeState;
use settlegate_protocol::ops::{AddMeans, Enroll, IssueCode, ListMeans, Login, ProvisionDevice};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use settlegate_engine::{AuthOutcome, InherentId, MeansKind, ReasonCode, UserIdType, UserKey};
use settlegate_protocol::messages::{CodeOutcome, CodeState, MeansInput, MeansOrder};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::values::{DeviceCredential, IssuedCode, Redemption};
use settlegate_protocol::Client;
use tokio::sync::Mutex;

use crate::support::server::{binary_config, now_ms, redeem_request, spawn_binary, ADMIN_KEY};
use crate::support::{jpy, PASSWORD};

const USERS: usize = 8;

fn config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let engine = format!(
        // Snapshots every 200 records: kills also land during snapshot and log rotation.
        "shards = 2\ndurability = {{ data_dir = \"{}\", fsync = \"always\", snapshot_every_records = 200 }}",
        data.display()
    );
    // A provider that approves everything.
    binary_config(
        dir,
        "{ kind = \"simulated\", latency_us_min = 0, latency_us_max = 2000, decline_rate = 0.0, \
         failure_rate = 0.0 }",
        &engine,
    )
}

/// The server process, killed when the test ends, also when a check fails.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Payer {
    user: UserKey,
    credential: DeviceCredential,
}

/// An authorization the client saw acknowledged.
#[derive(Clone)]
struct Acknowledged {
    client_request_id: u128,
    /// Whose enrollment device signed it.
    payer: usize,
    /// The record, and as signed.
    record: InherentId,
    bytes: Vec<u8>,
    outcome: AuthOutcome,
}

type Acked = Arc<Mutex<Vec<Acknowledged>>>;

/// Account changes the client saw acknowledged, the enrollments' included.
#[derive(Default)]
struct AccountsSeen {
    /// Every acknowledged means: payer, means ID, kind.
    means: Vec<(usize, u32, MeansKind)>,
    /// Every device key acknowledged after enrollment: payer, credential, its next counter.
    devices: Vec<(usize, DeviceCredential, u64)>,
}

type Accounts = Arc<Mutex<AccountsSeen>>;

/// Payment codes the client saw issued, and the redemptions it saw acknowledged.
#[derive(Default)]
struct CodesSeen {
    issued: Vec<IssuedCode>,
    /// Code requests answered with a decline (the provider never declines).
    declined: Vec<ReasonCode>,
    /// Issue number → the acknowledged redemptions (client request ID, redemption).
    redeemed: std::collections::HashMap<u64, Vec<(u128, Redemption)>>,
}

type Codes = Arc<Mutex<CodesSeen>>;

/// Issues payment codes and redeems each with two concurrent requests, until the connection
/// dies, recording what was acknowledged.
async fn load_codes(
    client: Arc<Client>,
    payers: Arc<Vec<Payer>>,
    counters: Arc<Mutex<Vec<u64>>>,
    codes: Codes,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        let index = rng.gen_range(0..payers.len());
        let counter = {
            let mut counters = counters.lock().await;
            counters[index] += 1;
            counters[index]
        };
        let payer = &payers[index];
        let amount = rng.gen_range(100..10_000);
        let inherent_id = InherentId {
            key_version: payer.credential.key_version,
            amount_minor: amount,
            currency: jpy(),
            means: MeansKind::CreditCard,
            means_id: 0,
            provider_code: 1,
            card_idm: payer.credential.card_idm,
            user: payer.user.clone(),
            terminal_id: "*".into(),
            counter,
            timestamp_ms: now_ms(),
        }
        .sign(payer.credential.device_key.expose());
        let issue = Request::IssueCode(IssueCode {
            client_request_id: rng.gen(),
            inherent_id,
            validity_ms: 3_600_000,
            deliver_to: None,
            order_ref: String::new(),
        });
        let code = match client.call_ok(&issue).await {
            Ok(Reply::IssueCode(CodeOutcome::Issued(code))) => *code,
            Ok(Reply::IssueCode(CodeOutcome::Declined(reason))) => {
                codes.lock().await.declined.push(reason);
                continue;
            }
            Ok(_) => continue,
            Err(_) => return,
        };
        codes.lock().await.issued.push(code.clone());
        let redeem = |id: u128| redeem_request(&code, id, amount, now_ms(), "CRASH-1");
        let (a, b): (u128, u128) = (rng.gen(), rng.gen());
        let (request_a, request_b) = (redeem(a), redeem(b));
        let (first, second) = tokio::join!(client.call(&request_a), client.call(&request_b));
        for (id, response) in [(a, first), (b, second)] {
            match response {
                Ok(Response::Ok(Reply::RedeemCode(redemption))) => codes
                    .lock()
                    .await
                    .redeemed
                    .entry(code.number)
                    .or_default()
                    .push((id, *redemption)),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

async fn connect(addr: std::net::SocketAddr) -> Option<Client> {
    let client = Client::connect(addr).await.ok()?;
    client.authenticate(ADMIN_KEY).await.ok()?;
    Some(client)
}

/// Sends authorizations until the connection dies, recording every acknowledged one.
async fn load(
    client: Arc<Client>,
    payers: Arc<Vec<Payer>>,
    counters: Arc<Mutex<Vec<u64>>>,
    acked: Acked,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        let index = rng.gen_range(0..payers.len());
        let counter = {
            let mut counters = counters.lock().await;
            counters[index] += 1;
            counters[index]
        };
        let payer = &payers[index];
        let record = payment(&payer.user, &payer.credential, counter, rng.gen_range(1..10_000));
        let bytes = record.sign(payer.credential.device_key.expose());
        let id: u128 = rng.gen();
        match client.authorize(id, bytes.clone()).await {
            Ok(outcome) => acked.lock().await.push(Acknowledged {
                client_request_id: id,
                payer: index,
                record,
                bytes,
                outcome,
            }),
            Err(_) => return,
        }
    }
}

/// A card payment of `amount` by `user`'s device `credential`, now, with `counter`.
fn payment(user: &UserKey, credential: &DeviceCredential, counter: u64, amount: u64) -> InherentId {
    InherentId {
        key_version: credential.key_version,
        amount_minor: amount,
        currency: jpy(),
        means: MeansKind::CreditCard,
        means_id: 0,
        provider_code: 1,
        card_idm: credential.card_idm,
        user: user.clone(),
        terminal_id: "CRASH-1".into(),
        counter,
        timestamp_ms: now_ms(),
    }
}

/// Adds e-money means and provisions devices now and then, until the connection dies,
/// recording what was acknowledged (a refusal at a per-user limit is not).
async fn load_accounts(
    client: Arc<Client>,
    payers: Arc<Vec<Payer>>,
    accounts: Accounts,
    round: usize,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for n in 0u32.. {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..30))).await;
        let index = rng.gen_range(0..payers.len());
        let user = payers[index].user.clone();
        let request = if rng.gen_bool(0.5) {
            let means = MeansInput::EMoney { emoney_type: "suica".into() };
            Request::AddMeans(AddMeans {
                client_request_id: rng.gen(),
                user,
                make_default: false,
                means,
            })
        } else {
            let [_, _, r1, r0] = (round as u32).to_be_bytes();
            let [_, n2, n1, n0] = n.to_be_bytes();
            let card_idm = [7, r1, r0, index as u8, n2, n1, n0, 0xd0];
            let password = PASSWORD.into();
            Request::ProvisionDevice(ProvisionDevice {
                client_request_id: rng.gen(),
                user,
                password,
                card_idm,
            })
        };
        match client.call(&request).await {
            Ok(Response::Ok(Reply::AddMeans(added))) => {
                accounts.lock().await.means.push((index, added.means_id, MeansKind::EMoney));
            }
            Ok(Response::Ok(Reply::ProvisionDevice(credential))) => {
                accounts.lock().await.devices.push((index, credential, 1));
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_operations_survive_sigkill() {
    let rounds: usize =
        std::env::var("SETTLEGATE_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let seed: u64 = std::env::var("SETTLEGATE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test: {rounds} rounds, seed {seed} (SETTLEGATE_CRASH_SEED={seed} to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let (child, mut addr) = spawn_binary(&config);
    let mut child = Server(child);
    let client = connect(addr).await.unwrap();
    let mut payers = Vec::new();
    let accounts: Accounts = Arc::default();
    for i in 0..USERS {
        let user = UserKey::new(UserIdType::Mail, format!("crash{i}@example.com")).unwrap();
        let enroll = Request::Enroll(Enroll {
            client_request_id: 10_000 + i as u128,
            user: user.clone(),
            password: PASSWORD.into(),
            card_idm: [9, 9, 9, 9, 0, 0, 0, i as u8],
        });
        let Reply::Enroll(credential) = client.call_ok(&enroll).await.unwrap() else { panic!() };
        let card = Request::AddMeans(AddMeans {
            client_request_id: 20_000 + i as u128,
            user: user.clone(),
            make_default: true,
            means: MeansInput::CreditCard { pan: "4111111111111111".into() },
        });
        let Reply::AddMeans(card) = client.call_ok(&card).await.unwrap() else { panic!() };
        accounts.lock().await.means.push((i, card.means_id, MeansKind::CreditCard));
        payers.push(Payer { user, credential });
    }
    drop(client);
    let payers = Arc::new(payers);
    let counters = Arc::new(Mutex::new(vec![0u64; USERS]));
    let acked: Acked = Arc::default();
    let codes: Codes = Arc::default();
    let means_at_enrollment = accounts.lock().await.means.len();
    let mut recycled = Recycled::default();
    // The claim covers logs written over an older log's file (`wal::start_log`): some kill must
    // find one. A round's load depends on the machine (under a busy test suite, fewer records
    // and so fewer snapshots), so rounds go on past `rounds`, a few at most, until one has.
    let extra_max = if rounds >= 3 { 15 } else { 0 };
    let mut round = 0;
    while round < rounds || (recycled.kills == 0 && round < rounds + extra_max) {
        let client = Arc::new(connect(addr).await.expect("server up"));
        let workers: Vec<_> = (0..4u64)
            .map(|w| {
                let worker_seed = seed ^ (round as u64 * 8 + w);
                tokio::spawn(load(
                    client.clone(),
                    payers.clone(),
                    counters.clone(),
                    acked.clone(),
                    worker_seed,
                ))
            })
            .chain(std::iter::once(tokio::spawn(load_codes(
                client.clone(),
                payers.clone(),
                counters.clone(),
                codes.clone(),
                seed ^ (round as u64 * 8 + 7),
            ))))
            .chain(std::iter::once(tokio::spawn(load_accounts(
                client.clone(),
                payers.clone(),
                accounts.clone(),
                round,
                seed ^ (round as u64 * 8 + 6),
            ))))
            .collect();
        // The shards' kept older logs are noted while the load runs, not only at the kill.
        let until = tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(50..400));
        while tokio::time::Instant::now() < until {
            recycled.note_free(&dir.path().join("data"));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        child.0.kill().expect("SIGKILL");
        let _ = child.0.wait();
        recycled.observe(&dir.path().join("data"));
        for worker in workers {
            let _ = worker.await;
        }
        drop(client);
        let restarted;
        (restarted, addr) = spawn_binary(&config);
        child = Server(restarted);
        // Counters move past anything sent before the crash, acknowledged or not.
        for counter in counters.lock().await.iter_mut() {
            *counter += 1_000;
        }
        verify(addr, &payers, &acked).await;
        verify_accounts(addr, &payers, &counters, &accounts).await;
        verify_codes(addr, &codes).await;
        round += 1;
    }
    drop(child);
    if rounds >= 3 {
        assert!(recycled.kills > 0, "no kill found a log written over an older log's file");
    }
    let total = acked.lock().await.len();
    assert!(total > 0, "the load produced acknowledged operations");
    let seen = codes.lock().await;
    let redeemed = seen.redeemed.len();
    assert!(redeemed > 0, "the load redeemed codes");
    let accounts = accounts.lock().await;
    let (means_added, devices) =
        (accounts.means.len() - means_at_enrollment, accounts.devices.len());
    assert!(
        means_added > 0 && devices > 0,
        "the load added means ({means_added}) and devices ({devices})"
    );
    eprintln!(
        "crash test: {total} acknowledged authorizations (all approved), {} codes issued and \
         {redeemed} redeemed, {means_added} means added and {devices} devices provisioned under \
         load, verified across {round} restarts ({} of them of a log written over an older \
         log's file)",
        seen.issued.len(),
        recycled.kills
    );
}

/// Which kills found a log written over the file of an older log (`wal::start_log`): one whose
/// file was an earlier kill's `shard-NNN.free` (the log kept to be written over), that is.
#[derive(Default)]
struct Recycled {
    /// The files (device, inode) seen as a shard's kept older log.
    free: std::collections::HashSet<(u64, u64)>,
    /// Kills that found a log in one of them.
    kills: usize,
}

impl Recycled {
    /// After a kill: whether a shard's log is in a file seen as a kept older log before.
    fn observe(&mut self, data: &std::path::Path) {
        let found = (0..2).any(|shard| {
            file_id(data, &format!("shard-{shard:03}.wal")).is_some_and(|l| self.free.contains(&l))
        });
        self.note_free(data);
        self.kills += usize::from(found);
    }

    /// Notes the shards' kept older logs, as they are now.
    fn note_free(&mut self, data: &std::path::Path) {
        self.free.extend((0..2).filter_map(|s| file_id(data, &format!("shard-{s:03}.free"))));
    }
}

/// The (device, inode) of file `name` in `data`, if it is there.
fn file_id(data: &std::path::Path, name: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(data.join(name)).ok().map(|meta| (meta.dev(), meta.ino()))
}

/// Every acknowledged means is still listed, and every acknowledged device key (each
/// enrollment's and each provisioned one) still verifies a new payment, which the provider
/// approves: approvals continue after the restart.
async fn verify_accounts(
    addr: std::net::SocketAddr,
    payers: &[Payer],
    counters: &Mutex<Vec<u64>>,
    accounts: &Accounts,
) {
    let client = connect(addr).await.expect("restarted server answers");
    let mut accounts = accounts.lock().await;
    for (index, payer) in payers.iter().enumerate() {
        let list = Request::ListMeans(ListMeans {
            user: payer.user.clone(),
            order: MeansOrder::Registration,
        });
        let Reply::ListMeans(MeansList(listed)) = client.call_ok(&list).await.unwrap() else {
            panic!()
        };
        for (_, means_id, kind) in accounts.means.iter().filter(|(owner, _, _)| *owner == index) {
            assert!(
                listed.iter().any(|m| m.means_id == *means_id && m.kind == *kind),
                "acknowledged means {means_id} of {} lost: {listed:?}",
                payer.user.id()
            );
        }
        let counter = {
            let mut counters = counters.lock().await;
            counters[index] += 1;
            counters[index]
        };
        let bytes = payment(&payer.user, &payer.credential, counter, 100)
            .sign(payer.credential.device_key.expose());
        let outcome = client.authorize(rand::random(), bytes).await.unwrap();
        assert!(
            matches!(outcome, AuthOutcome::Approved(_)),
            "the enrollment key of {} no longer pays: {outcome:?}",
            payer.user.id()
        );
    }
    for (index, credential, counter) in accounts.devices.iter_mut() {
        let user = &payers[*index].user;
        let bytes = payment(user, credential, *counter, 100).sign(credential.device_key.expose());
        *counter += 1;
        let outcome = client.authorize(rand::random(), bytes).await.unwrap();
        assert!(
            matches!(outcome, AuthOutcome::Approved(_)),
            "acknowledged device {:02x?} of {} no longer pays: {outcome:?}",
            credential.card_idm,
            user.id()
        );
    }
}

/// No code was ever redeemed twice; every acknowledged redemption is still there (its retry
/// returns it, a new attempt is refused as redeemed), and every acknowledged code is known.
async fn verify_codes(addr: std::net::SocketAddr, codes: &Codes) {
    let client = connect(addr).await.expect("restarted server answers");
    let seen = codes.lock().await;
    assert!(seen.declined.is_empty(), "code requests declined: {:?}", seen.declined);
    for (number, redemptions) in &seen.redeemed {
        assert_eq!(redemptions.len(), 1, "code {number} redeemed {} times", redemptions.len());
        let (id, redemption) = &redemptions[0];
        let state =
            client.call_ok(&Request::CodeState(GetCodeState { number: *number })).await.unwrap();
        assert_eq!(
            state,
            Reply::CodeState(CodeState::Redeemed(Box::new(redemption.clone()))),
            "an acknowledged redemption changed after a crash"
        );
        let code = seen.issued.iter().find(|c| c.number == *number).expect("issued");
        let retry =
            redeem_request(code, *id, redemption.captured_minor, redemption.sale_at_ms, "CRASH-1");
        assert_eq!(
            client.call_ok(&retry).await.unwrap(),
            Reply::RedeemCode(Box::new(redemption.clone()))
        );
        let mut again = retry.clone();
        if let Request::RedeemCode(request) = &mut again {
            request.client_request_id = rand::random();
        }
        assert_eq!(
            client.call(&again).await.unwrap(),
            Response::Refused(ReasonCode::CodeRedeemed),
            "a redeemed code must never be redeemed again"
        );
    }
    for code in &seen.issued {
        let state = client.call_ok(&Request::CodeState(GetCodeState { number: code.number })).await;
        assert!(
            matches!(state, Ok(Reply::CodeState(_))),
            "issued code {} lost: {state:?}",
            code.number
        );
    }
}

/// Every acknowledged authorization is still there and is an approval: its retry returns the
/// very same outcome (auth code included), and the same record presented anew (the same
/// counter, signed again with a fresh timestamp so that the timestamp window cannot be what
/// refuses it) is refused as a replay, never a second settlement. Every enrolled user can still
/// log in.
async fn verify(addr: std::net::SocketAddr, payers: &[Payer], acked: &Acked) {
    let client = connect(addr).await.expect("restarted server answers");
    for payer in payers {
        let login = Request::Login(Login { user: payer.user.clone(), password: PASSWORD.into() });
        assert_eq!(client.call_ok(&login).await.unwrap(), Reply::Login(()), "enrollment survived");
    }
    let acked = acked.lock().await.clone();
    let client = Arc::new(client);
    let checks = futures::stream::iter(acked).map(|ack| {
        let client = client.clone();
        async move {
            let id = ack.client_request_id;
            assert!(
                matches!(ack.outcome, AuthOutcome::Approved(_)),
                "request {id} was declined by a provider that never declines: {:?}",
                ack.outcome
            );
            let again = client.authorize(id, ack.bytes.clone()).await.unwrap();
            assert_eq!(
                again, ack.outcome,
                "acknowledged outcome of request {id} changed after a crash"
            );
            let fresh = InherentId { timestamp_ms: now_ms(), ..ack.record };
            let key = &payers[ack.payer].credential.device_key;
            let replayed = client.authorize(rand::random(), fresh.sign(key.expose())).await;
            assert_eq!(
                replayed.unwrap(),
                AuthOutcome::Declined(ReasonCode::ReplayedNonce),
                "an acknowledged record must never settle again"
            );
        }
    });
    checks.buffer_unordered(32).collect::<Vec<()>>().await;
}
