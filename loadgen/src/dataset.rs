//! The dataset, prepared before anything is measured: providers (checked to exist), stores
//! (terminal IDs listed with every provider), and users, each with a device key and means.

use settlegate_engine::{AddMeansOptions, ProviderCode, RequestId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use indicatif::ProgressBar;
use settlegate_engine::age::{Date, VerificationMethod};
use settlegate_engine::limits::TERMINALS_PER_REQUEST_MAX;
use settlegate_engine::{
    AcceptedMethod, AgeRecord, DeviceCredential, DeviceKey, EnrollRequest, MeansInput, MeansKind,
    SigningKey, Store, TerminalEntry, UserIdType, UserKey,
};
use settlegate_protocol::messages::{self as wire, Reply, Request};
use settlegate_protocol::ops::server_info::GetServerInfo;
use settlegate_protocol::ops::{AddMeans, Enroll, RegisterAge, RegisterTerminals, UpsertStore};
use settlegate_protocol::values;

use crate::target::Target;

/// Users enrolled concurrently while preparing.
const ENROLL_CONCURRENCY: usize = 64;

/// How big the dataset is.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Users, each with one device.
    pub users: usize,
    /// Means per user: a card (the default), then e-money purses.
    pub means_per_user: usize,
    /// Store terminals, listed with every provider.
    pub stores: usize,
    /// Prefix of the stores' terminal IDs (`PREFIX-1`, `PREFIX-2`, ...).
    pub terminal_prefix: String,
    /// Provider designation codes payments spread over.
    pub providers: Vec<u32>,
}

/// A user the load generator pays as.
pub struct Payer {
    /// The user.
    pub user: UserKey,
    /// Their device's key.
    pub credential: DeviceCredential,
    /// The same key, prepared for signing.
    pub signing: SigningKey,
    /// The device counter last used.
    pub counter: AtomicU64,
}

/// What requests are made of.
pub struct Dataset {
    /// Users.
    pub payers: Vec<Payer>,
    /// Store terminal IDs.
    pub stores: Vec<String>,
    /// Provider codes.
    pub providers: Vec<u32>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Prepares the dataset on `target`, ticking `progress` once per user.
pub async fn prepare(
    target: &Target,
    sizes: &Sizes,
    progress: &ProgressBar,
) -> anyhow::Result<Dataset> {
    check_providers(target, &sizes.providers).await?;
    let run = now_ms() as u64;
    let stores: Vec<String> =
        (1..=sizes.stores).map(|k| format!("{}-{k}", sizes.terminal_prefix)).collect();
    list_stores(target, run, &sizes.providers, &stores).await?;
    upsert_stores(target, run, &stores).await;
    let mut payers = Vec::with_capacity(sizes.users);
    for chunk in (0..sizes.users).collect::<Vec<_>>().chunks(ENROLL_CONCURRENCY) {
        let enrolled = futures::future::join_all(
            chunk.iter().map(|&i| enroll(target, run, i, sizes.means_per_user)),
        )
        .await;
        for payer in enrolled {
            payers.push(payer?);
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(Dataset { payers, stores, providers: sizes.providers.clone() })
}

/// A server must already have the providers (they are configured, not created over the wire).
async fn check_providers(target: &Target, codes: &[u32]) -> anyhow::Result<()> {
    let Target::Remote(clients) = target else { return Ok(()) };
    let Reply::ServerInfo(info) = clients[0].call_ok(&GetServerInfo.into()).await? else {
        bail!("unexpected SERVER_INFO reply")
    };
    let known: Vec<u32> = info.providers.iter().map(|(code, _)| *code).collect();
    if let Some(missing) = codes.iter().find(|code| !known.contains(code)) {
        bail!(
            "the server has no provider {missing} (it has {known:?}); see --provider/--providers"
        );
    }
    Ok(())
}

/// Lists the stores' terminals with every provider, without a service. A server identity
/// without the `providers` permission cannot: then the terminals stay unlisted, which the
/// authorize path accepts (no discount), and a warning says so.
async fn list_stores(
    target: &Target,
    run: u64,
    providers: &[u32],
    stores: &[String],
) -> anyhow::Result<()> {
    for (p, &provider) in providers.iter().enumerate() {
        for (n, chunk) in stores.chunks(TERMINALS_PER_REQUEST_MAX).enumerate() {
            let id = (u128::from(run) << 64) | (1 << 63) | ((p as u128) << 32) | n as u128;
            let listed = match target {
                Target::Embedded(engine) => {
                    let terminals: Vec<TerminalEntry> = chunk
                        .iter()
                        .map(|id| TerminalEntry { terminal_id: id.clone(), service: None })
                        .collect();
                    engine
                        .register_terminals(RequestId(id), ProviderCode(provider), terminals)
                        .await
                        .map_err(anyhow::Error::new)
                }
                Target::Remote(clients) => {
                    let terminals = chunk
                        .iter()
                        .map(|id| wire::TerminalEntry { terminal_id: id.clone(), service: None })
                        .collect();
                    let request: Request = RegisterTerminals {
                        client_request_id: id,
                        provider_code: provider,
                        terminals,
                    }
                    .into();
                    clients[0].call_ok(&request).await.map(|_| ()).map_err(anyhow::Error::new)
                }
            };
            if let Err(error) = listed {
                eprintln!("warning: stores not listed with provider {provider}: {error}");
                break;
            }
        }
    }
    Ok(())
}

async fn enroll(target: &Target, run: u64, i: usize, means: usize) -> anyhow::Result<Payer> {
    let user = UserKey::new(UserIdType::Mail, format!("lg{run}-{i}@example.com"))
        .map_err(anyhow::Error::new)?;
    let idm = ((run << 24) ^ i as u64).to_be_bytes();
    let base = (u128::from(run) << 64) | (i as u128) << 5;
    let password = "loadgen password".to_owned();
    let credential = match target {
        Target::Embedded(engine) => {
            let request = EnrollRequest {
                client_request_id: RequestId(base),
                user: user.clone(),
                password,
                card_idm: idm,
            };
            engine.enroll(request).await?
        }
        Target::Remote(clients) => {
            let request: Request =
                Enroll { client_request_id: base, user: user.clone(), password, card_idm: idm }
                    .into();
            let Reply::Enroll(credential) = clients[i % clients.len()].call_ok(&request).await?
            else {
                bail!("unexpected enroll reply")
            };
            DeviceCredential {
                card_idm: credential.card_idm,
                key_version: credential.key_version,
                device_key: DeviceKey::from_bytes(*credential.device_key.expose()),
            }
        }
    };
    for m in 0..means {
        add_means(target, base | (m as u128 + 1), &user, m, i).await.context("adding means")?;
    }
    let signing = SigningKey::new(credential.device_key.expose());
    let payer = Payer { user, credential, signing, counter: AtomicU64::new(0) };
    register_age(target, base | 31, &payer, i).await.context("registering an age")?;
    Ok(payer)
}

/// Registers the payer's terminal with a birth date (A1), as after biometric authentication:
/// nine in ten users are adults, one in ten is 16, so age-checked payments see both answers.
async fn register_age(target: &Target, id: u128, payer: &Payer, i: usize) -> anyhow::Result<()> {
    let now = now_ms();
    let birth_year = if i % 10 == 9 { 2010 } else { 1990 };
    let record = AgeRecord {
        key_version: payer.credential.key_version,
        card_idm: payer.credential.card_idm,
        user: payer.user.clone(),
        birth_date: Date::new(birth_year, 1, 1).expect("a date"),
        method: VerificationMethod::DocumentChip,
        verified_at_ms: now - 60_000,
        valid_until_ms: now + 30 * 86_400_000,
        counter: payer.counter.fetch_add(1, Ordering::Relaxed) + 1,
        timestamp_ms: now,
    }
    .sign(payer.credential.device_key.expose());
    match target {
        Target::Embedded(engine) => engine.register_age(RequestId(id), &record).await?,
        Target::Remote(clients) => {
            let request = RegisterAge { client_request_id: id, record }.into();
            clients[i % clients.len()].call_ok(&request).await?;
        }
    }
    Ok(())
}

/// Registers every store terminal as a store (W1) at a random spot in Japan, accepting cards
/// and e-money, for the usable-methods query. An identity without the `stores` permission
/// cannot: a warning says so and `usable` requests will be refused.
async fn upsert_stores(target: &Target, run: u64, stores: &[String]) {
    for (n, store_id) in stores.iter().enumerate() {
        let spread = (n as f64 * 0.618_033_988_75).fract();
        let store = Store {
            store_id: store_id.clone(),
            name: format!("Load store {n}"),
            industry: "5411".into(),
            address: String::new(),
            latitude: 31.0 + 14.0 * spread,
            longitude: 129.0 + 17.0 * (spread * 7.0).fract(),
            beacons: Vec::new(),
            wifi: Vec::new(),
            qr_code: None,
            accepts: vec![
                AcceptedMethod { kind: MeansKind::CreditCard, brand: String::new() },
                AcceptedMethod { kind: MeansKind::EMoney, brand: String::new() },
            ],
        };
        let id = (u128::from(run) << 64) | (1 << 62) | n as u128;
        let result = match target {
            Target::Embedded(engine) => {
                engine.upsert_store(RequestId(id), store).await.map_err(anyhow::Error::new)
            }
            Target::Remote(clients) => {
                let store = values::Store {
                    store_id: store.store_id,
                    name: store.name,
                    industry: store.industry,
                    address: store.address,
                    latitude: store.latitude,
                    longitude: store.longitude,
                    beacons: store.beacons,
                    wifi: store.wifi,
                    qr_code: store.qr_code,
                    accepts: store
                        .accepts
                        .into_iter()
                        .map(|a| values::AcceptedMethod { kind: a.kind, brand: a.brand })
                        .collect(),
                };
                let request = UpsertStore { client_request_id: id, store }.into();
                clients[0].call_ok(&request).await.map(|_| ()).map_err(anyhow::Error::new)
            }
        };
        if let Err(error) = result {
            eprintln!("warning: stores not registered (usable-methods queries will fail): {error}");
            return;
        }
    }
}

/// The user's `m`-th means: a card first (the default, which authorizations use), then purses.
async fn add_means(
    target: &Target,
    id: u128,
    user: &UserKey,
    m: usize,
    i: usize,
) -> anyhow::Result<()> {
    const CARD: &str = "4111111111111111";
    let purse = format!("purse-{m}");
    let make_default = m == 0;
    match target {
        Target::Embedded(engine) => {
            let means = match m {
                0 => MeansInput::CreditCard { pan: CARD.into() },
                _ => MeansInput::EMoney { emoney_type: purse },
            };
            engine.add_means(RequestId(id), user, &means, AddMeansOptions { make_default }).await?;
        }
        Target::Remote(clients) => {
            let means = match m {
                0 => wire::MeansInput::CreditCard { pan: CARD.into() },
                _ => wire::MeansInput::EMoney { emoney_type: purse },
            };
            let request: Request =
                AddMeans { client_request_id: id, user: user.clone(), make_default, means }.into();
            clients[i % clients.len()].call_ok(&request).await?;
        }
    }
    Ok(())
}
