//! Crash test: the real binary under load is killed with SIGKILL at random moments, restarted
//! on the same data directory, and every acknowledged operation must still be there.
//!
//! `SETTLEGATE_CRASH_ROUNDS` (default 5) sets the number of kills; `scripts/crash.sh` runs a
//! long version.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use settlegate_engine::{
    AuthOutcome, CodeOutcome, CodeState, InherentId, IssueCodeRequest, IssuedCode, MeansInput,
    MeansKind, ReasonCode, RedeemRequest, Redemption, UserIdType, UserKey,
};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::Client;
use tokio::sync::Mutex;

use crate::support::server::{binary_config, spawn_binary, ADMIN_KEY};
use crate::support::{jpy, PASSWORD};

const USERS: usize = 8;

fn config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let engine = format!(
        // Snapshots every 200 records: kills also land during snapshot and log rotation.
        "shards = 2\ndurability = {{ data_dir = \"{}\", fsync = \"always\", snapshot_every_records = 200 }}",
        data.display()
    );
    binary_config(
        dir,
        "{ kind = \"simulated\", latency_us_min = 0, latency_us_max = 2000 }",
        &engine,
    )
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

struct Payer {
    user: UserKey,
    credential: settlegate_engine::DeviceCredential,
}

/// What the client saw acknowledged: (client request ID, inherent ID, outcome).
type Acked = Arc<Mutex<Vec<(u128, Vec<u8>, AuthOutcome)>>>;

/// Payment codes the client saw issued, and the redemptions it saw acknowledged.
#[derive(Default)]
struct CodesSeen {
    issued: Vec<IssuedCode>,
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
        let issue = Request::IssueCode {
            request: IssueCodeRequest {
                client_request_id: rng.gen(),
                inherent_id,
                validity_ms: 3_600_000,
                deliver_to: None,
                order_ref: String::new(),
            },
        };
        let code = match client.call_ok(&issue).await {
            Ok(Reply::Code(CodeOutcome::Issued(code))) => *code,
            Ok(_) => continue,
            Err(_) => return,
        };
        codes.lock().await.issued.push(code.clone());
        let redeem = |id: u128| Request::RedeemCode {
            request: RedeemRequest {
                client_request_id: id,
                code: code.text.clone(),
                issuer: 1,
                number: code.number,
                amount_minor: amount,
                currency: jpy(),
                sale_at_ms: now_ms(),
                terminal_id: "CRASH-1".into(),
                items: Vec::new(),
                basket: None,
                coupon: None,
                order_ref: String::new(),
            },
        };
        let (a, b): (u128, u128) = (rng.gen(), rng.gen());
        let (request_a, request_b) = (redeem(a), redeem(b));
        let (first, second) = tokio::join!(client.call(&request_a), client.call(&request_b));
        for (id, response) in [(a, first), (b, second)] {
            match response {
                Ok(Response::Ok(Reply::Redeemed(redemption))) => codes
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
        let bytes = InherentId {
            key_version: payer.credential.key_version,
            amount_minor: rng.gen_range(1..10_000),
            currency: jpy(),
            means: MeansKind::CreditCard,
            means_id: 0,
            provider_code: 1,
            card_idm: payer.credential.card_idm,
            user: payer.user.clone(),
            terminal_id: "CRASH-1".into(),
            counter,
            timestamp_ms: now_ms(),
        }
        .sign(payer.credential.device_key.expose());
        let id: u128 = rng.gen();
        match client.authorize(id, bytes.clone()).await {
            Ok(outcome) => acked.lock().await.push((id, bytes, outcome)),
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
    let (mut child, mut addr) = spawn_binary(&config);
    let client = connect(addr).await.unwrap();
    let mut payers = Vec::new();
    for i in 0..USERS {
        let user = UserKey::new(UserIdType::Mail, format!("crash{i}@example.com")).unwrap();
        let enroll = Request::Enroll {
            client_request_id: 10_000 + i as u128,
            user: user.clone(),
            password: PASSWORD.into(),
            card_idm: [9, 9, 9, 9, 0, 0, 0, i as u8],
        };
        let Reply::Credential(credential) = client.call_ok(&enroll).await.unwrap() else {
            panic!()
        };
        let card = Request::AddMeans {
            client_request_id: 20_000 + i as u128,
            user: user.clone(),
            make_default: true,
            means: MeansInput::CreditCard { pan: "4111111111111111".into() },
        };
        client.call_ok(&card).await.unwrap();
        payers.push(Payer { user, credential });
    }
    drop(client);
    let payers = Arc::new(payers);
    let counters = Arc::new(Mutex::new(vec![0u64; USERS]));
    let acked: Acked = Arc::default();
    let codes: Codes = Arc::default();
    for round in 0..rounds {
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
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        for worker in workers {
            let _ = worker.await;
        }
        drop(client);
        (child, addr) = spawn_binary(&config);
        verify(addr, &payers, &acked).await;
        verify_codes(addr, &codes).await;
        // Counters move past anything sent before the crash, acknowledged or not.
        for counter in counters.lock().await.iter_mut() {
            *counter += 1_000;
        }
    }
    child.kill().ok();
    let _ = child.wait();
    let total = acked.lock().await.len();
    assert!(total > 0, "the load produced acknowledged operations");
    let seen = codes.lock().await;
    let redeemed = seen.redeemed.len();
    assert!(redeemed > 0, "the load redeemed codes");
    eprintln!(
        "crash test: {total} acknowledged authorizations, {} codes issued and {redeemed} \
         redeemed, verified across {rounds} restarts",
        seen.issued.len()
    );
}

/// No code was ever redeemed twice; every acknowledged redemption is still there (its retry
/// returns it, a new attempt is refused as redeemed), and every acknowledged code is known.
async fn verify_codes(addr: std::net::SocketAddr, codes: &Codes) {
    let client = connect(addr).await.expect("restarted server answers");
    let seen = codes.lock().await;
    for (number, redemptions) in &seen.redeemed {
        assert_eq!(redemptions.len(), 1, "code {number} redeemed {} times", redemptions.len());
        let (id, redemption) = &redemptions[0];
        let state = client.call_ok(&Request::CodeState { number: *number }).await.unwrap();
        assert_eq!(
            state,
            Reply::CodeState(Box::new(CodeState::Redeemed(Box::new(redemption.clone())))),
            "an acknowledged redemption changed after a crash"
        );
        let code = seen.issued.iter().find(|c| c.number == *number).expect("issued");
        let retry = Request::RedeemCode {
            request: RedeemRequest {
                client_request_id: *id,
                code: code.text.clone(),
                issuer: 1,
                number: *number,
                amount_minor: redemption.captured_minor,
                currency: jpy(),
                sale_at_ms: redemption.sale_at_ms,
                terminal_id: "CRASH-1".into(),
                items: Vec::new(),
                basket: None,
                coupon: None,
                order_ref: String::new(),
            },
        };
        assert_eq!(
            client.call_ok(&retry).await.unwrap(),
            Reply::Redeemed(Box::new(redemption.clone()))
        );
        let mut again = retry.clone();
        if let Request::RedeemCode { request } = &mut again {
            request.client_request_id = rand::random();
        }
        assert_eq!(
            client.call(&again).await.unwrap(),
            Response::Refused(ReasonCode::CodeRedeemed),
            "a redeemed code must never be redeemed again"
        );
    }
    for code in &seen.issued {
        let state = client.call_ok(&Request::CodeState { number: code.number }).await;
        assert!(
            matches!(state, Ok(Reply::CodeState(_))),
            "issued code {} lost: {state:?}",
            code.number
        );
    }
}

/// Every acknowledged authorization is still there: its retry returns the very same outcome
/// (auth code included), and presenting it anew is a replay, never a second settlement. Every
/// enrolled user can still log in.
async fn verify(addr: std::net::SocketAddr, payers: &[Payer], acked: &Acked) {
    let client = connect(addr).await.expect("restarted server answers");
    for payer in payers {
        let login = Request::Login { user: payer.user.clone(), password: PASSWORD.into() };
        assert_eq!(client.call_ok(&login).await.unwrap(), Reply::Empty, "enrollment survived");
    }
    let acked = acked.lock().await.clone();
    let client = Arc::new(client);
    let checks = futures::stream::iter(acked).map(|(id, bytes, outcome)| {
        let client = client.clone();
        async move {
            let again = client.authorize(id, bytes.clone()).await.unwrap();
            assert_eq!(
                again, outcome,
                "acknowledged outcome of request {id} changed after a crash"
            );
            let replayed = client.authorize(rand::random(), bytes).await.unwrap();
            let expected = [
                AuthOutcome::Declined(ReasonCode::ReplayedNonce),
                AuthOutcome::Declined(ReasonCode::StaleTimestamp),
            ];
            assert!(
                expected.contains(&replayed),
                "an acknowledged record must never settle again: {replayed:?}"
            );
        }
    });
    checks.buffer_unordered(32).collect::<Vec<()>>().await;
}
