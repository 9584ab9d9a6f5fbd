//! Model-based property test: random operation sequences against the real engine (actors,
//! verification, providers) and a plain reference model; every outcome must agree, and at the
//! end so must every user's means and usage counts.

use settlegate_engine::{AddMeansOptions, ProviderCode, RequestId};
use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, Discount, EngineError, MeansInput, MeansKind, MeansOrder,
    ReasonCode, TerminalEntry, TerminalService,
};

use crate::support::*;

const USERS: usize = 3;
const UNKNOWN_PROVIDER: u32 = 999;

#[derive(Debug, Clone)]
enum Op {
    Authorize {
        user: usize,
        amount: u64,
        provider: u32,
        discounted_terminal: bool,
        tamper: bool,
        stale: bool,
    },
    /// Presents an earlier request again: as a retry (same client request ID) or as a replay.
    Again {
        index: usize,
        same_id: bool,
    },
    AddEMoney {
        user: usize,
        make_default: bool,
    },
    SetDefault {
        user: usize,
        means_id: u32,
    },
    SetDiscount {
        bps: u16,
    },
    Login {
        user: usize,
        correct: bool,
    },
    Advance {
        ms: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            0..USERS,
            prop_oneof![1u64..5_000, (APPROVE_LIMIT - 10)..(APPROVE_LIMIT + 200_000)],
            prop::sample::select(vec![PROVIDER_OK, PROVIDER_OK, PROVIDER_DECLINE, UNKNOWN_PROVIDER]),
            any::<bool>(),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(user, amount, provider, discounted_terminal, tamper, stale)| {
                Op::Authorize { user, amount, provider, discounted_terminal, tamper, stale }
            }),
        2 => (any::<prop::sample::Index>(), any::<bool>())
            .prop_map(|(i, same_id)| Op::Again { index: i.index(usize::MAX), same_id }),
        1 => (0..USERS, any::<bool>()).prop_map(|(user, make_default)| Op::AddEMoney { user, make_default }),
        1 => (0..USERS, 1u32..5).prop_map(|(user, means_id)| Op::SetDefault { user, means_id }),
        1 => (1u16..=10_000).prop_map(|bps| Op::SetDiscount { bps }),
        1 => (0..USERS, any::<bool>()).prop_map(|(user, correct)| Op::Login { user, correct }),
        1 => (0i64..120_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// One authorization as the model sees it.
#[derive(Clone, Copy)]
struct Draw {
    user: usize,
    counter: u64,
    ts: i64,
    amount: u64,
    provider: u32,
    discounted: bool,
    tamper: bool,
}

#[derive(Clone)]
struct Sent {
    id: u128,
    bytes: Vec<u8>,
    timestamp_ms: i64,
    tampered: bool,
    outcome: AuthOutcome,
}

/// The reference model: plain data, no concurrency, written from the spec.
#[derive(Default)]
struct ModelUser {
    means: Vec<(u32, MeansKind)>,
    default: Option<u32>,
    uses: HashMap<u32, u64>,
    counters_used: HashSet<u64>,
    failed_logins: u32,
    locked_until_ms: i64,
}

struct Model {
    users: Vec<ModelUser>,
    discount_bps: Option<u16>,
    now_ms: i64,
    /// Every authorization sent, to present again.
    sent: Vec<Sent>,
    window_ms: i64,
    failures_max: u32,
    lockout_ms: i64,
}

impl Model {
    fn authorize(&mut self, draw: &Draw) -> AuthOutcome {
        let Draw { user, counter, ts, amount, provider, discounted, tamper } = *draw;
        use AuthOutcome::Declined;
        if tamper {
            return Declined(ReasonCode::ForgedTag);
        }
        let u = &mut self.users[user];
        if (self.now_ms - ts).abs() > self.window_ms {
            return Declined(ReasonCode::StaleTimestamp);
        }
        if !u.counters_used.insert(counter) {
            return Declined(ReasonCode::ReplayedNonce);
        }
        let Some(means_id) = u.default else { return Declined(ReasonCode::MeansNotRegistered) };
        let kind = u.means.iter().find(|(id, _)| *id == means_id).unwrap().1;
        if kind != MeansKind::CreditCard {
            return Declined(ReasonCode::MeansMismatch);
        }
        if provider == UNKNOWN_PROVIDER {
            return Declined(ReasonCode::UnknownProvider);
        }
        let discount = match (discounted, self.discount_bps) {
            (true, Some(bps)) => amount * u64::from(bps) / 10_000,
            _ => 0,
        };
        let final_amount = amount - discount;
        // The simulator checks its approval limit before rolling for a decline.
        if final_amount > APPROVE_LIMIT {
            return Declined(ReasonCode::ProviderInsufficientFunds);
        }
        if provider == PROVIDER_DECLINE {
            return Declined(ReasonCode::ProviderDoNotHonor);
        }
        *u.uses.entry(means_id).or_default() += 1;
        AuthOutcome::Approved(settlegate_engine::Approval {
            auth_code: settlegate_engine::AuthCode(*b"??????"),
            provider_code: provider,
            amount_requested_minor: amount,
            discount_minor: discount,
            amount_final_minor: final_amount,
            currency: jpy(),
        })
    }

    fn login(&mut self, user: usize, correct: bool) -> Result<(), EngineError> {
        let u = &mut self.users[user];
        if self.now_ms < u.locked_until_ms {
            return Err(EngineError::Refused(ReasonCode::UserLocked));
        }
        if correct {
            u.failed_logins = 0;
            return Ok(());
        }
        u.failed_logins += 1;
        if u.failed_logins >= self.failures_max {
            u.failed_logins = 0;
            u.locked_until_ms = self.now_ms + self.lockout_ms;
        }
        Err(EngineError::Refused(ReasonCode::WrongPassword))
    }
}

/// Outcomes agree when they are the same up to the provider's authorization code.
fn same(engine: &AuthOutcome, model: &AuthOutcome) -> bool {
    match (engine, model) {
        (AuthOutcome::Approved(a), AuthOutcome::Approved(b)) => {
            (a.amount_requested_minor, a.discount_minor, a.amount_final_minor, a.provider_code)
                == (
                    b.amount_requested_minor,
                    b.discount_minor,
                    b.amount_final_minor,
                    b.provider_code,
                )
        }
        (a, b) => a == b,
    }
}

/// `provider_latency_us`: 0 has the shard complete each payment at once; more takes the path
/// through the caller and the provider's future (both must agree with the model).
async fn run(ops: Vec<Op>, provider_latency_us: u64) -> Result<(), TestCaseError> {
    let h = Harness::with_config(config_answering_after(provider_latency_us));
    let config = h.engine.config().clone();
    let mut model = Model {
        users: (0..USERS).map(|_| ModelUser::default()).collect(),
        discount_bps: None,
        now_ms: T0_MS,
        sent: Vec::new(),
        window_ms: config.timestamp_window_ms,
        failures_max: config.login_failures_max,
        lockout_ms: config.lockout_ms,
    };
    let mut users = Vec::new();
    for (i, m) in model.users.iter_mut().enumerate() {
        users.push(h.user(&format!("model{i}")).await);
        m.means.push((1, MeansKind::CreditCard));
        m.default = Some(1);
    }
    for op in ops {
        match op {
            Op::Authorize { user, amount, provider, discounted_terminal, tamper, stale } => {
                let terminal = if discounted_terminal { "DISC-1" } else { "PLAIN-1" };
                let ts = if stale { model.now_ms - model.window_ms - 1 } else { model.now_ms };
                let record = users[user].record(ts, amount, provider, terminal);
                let mut bytes = record.sign(users[user].credential.device_key.expose());
                if tamper {
                    let at = bytes.len() - 1;
                    bytes[at] ^= 0x80;
                }
                let expected = model.authorize(&Draw {
                    user,
                    counter: record.counter,
                    ts,
                    amount,
                    provider,
                    discounted: discounted_terminal,
                    tamper,
                });
                let id = request_id();
                let got = h
                    .engine
                    .authorize(AuthorizeRequest {
                        client_request_id: id,
                        inherent_id: bytes.clone(),
                    })
                    .await
                    .unwrap();
                prop_assert!(
                    same(&got, &expected),
                    "authorize: engine {got:?}, model {expected:?}"
                );
                model.sent.push(Sent {
                    id: id.get(),
                    bytes,
                    timestamp_ms: ts,
                    tampered: tamper,
                    outcome: got,
                });
            }
            Op::Again { index, same_id } => {
                if model.sent.is_empty() {
                    continue;
                }
                let sent = model.sent[index % model.sent.len()].clone();
                let id = if same_id { sent.id } else { request_id().get() };
                let got = h
                    .engine
                    .authorize(AuthorizeRequest {
                        client_request_id: RequestId(id),
                        inherent_id: sent.bytes,
                    })
                    .await
                    .unwrap();
                // A retry gets the first outcome. A replay is checked like any request: the tag,
                // then the timestamp window, then the (already spent) counter.
                let expected = if same_id {
                    sent.outcome
                } else if sent.tampered {
                    AuthOutcome::Declined(ReasonCode::ForgedTag)
                } else if (model.now_ms - sent.timestamp_ms).abs() > model.window_ms {
                    AuthOutcome::Declined(ReasonCode::StaleTimestamp)
                } else {
                    AuthOutcome::Declined(ReasonCode::ReplayedNonce)
                };
                prop_assert!(
                    same(&got, &expected),
                    "again(same_id={same_id}): engine {got:?}, model {expected:?}"
                );
            }
            Op::AddEMoney { user, make_default } => {
                let means = MeansInput::EMoney { emoney_type: "Suica".into() };
                let got = h
                    .engine
                    .add_means(
                        request_id(),
                        &users[user].user,
                        &means,
                        AddMeansOptions { make_default },
                    )
                    .await;
                let m = &mut model.users[user];
                if m.means.len() >= settlegate_engine::limits::MEANS_PER_USER_MAX {
                    prop_assert_eq!(got, Err(EngineError::Refused(ReasonCode::TooManyMeans)));
                } else {
                    let id = m.means.len() as u32 + 1;
                    m.means.push((id, MeansKind::EMoney));
                    if make_default {
                        m.default = Some(id);
                    }
                    prop_assert_eq!(got.unwrap().means_id, id);
                }
            }
            Op::SetDefault { user, means_id } => {
                let got =
                    h.engine.set_default_means(request_id(), &users[user].user, means_id).await;
                let m = &mut model.users[user];
                if m.means.iter().any(|(id, _)| *id == means_id) {
                    m.default = Some(means_id);
                    prop_assert_eq!(got, Ok(()));
                } else {
                    prop_assert_eq!(got, Err(EngineError::Refused(ReasonCode::MeansNotRegistered)));
                }
            }
            Op::SetDiscount { bps } => {
                let entry = TerminalEntry {
                    terminal_id: "DISC-1".into(),
                    service: Some(TerminalService {
                        discount: Discount::Percent { bps },
                        valid_from_ms: i64::MIN,
                        valid_until_ms: i64::MAX,
                        description: String::new(),
                    }),
                };
                h.engine
                    .register_terminals(
                        request_id(),
                        ProviderCode(PROVIDER_OK),
                        vec![entry.clone()],
                    )
                    .await
                    .unwrap();
                h.engine
                    .register_terminals(request_id(), ProviderCode(PROVIDER_DECLINE), vec![entry])
                    .await
                    .unwrap();
                model.discount_bps = Some(bps);
            }
            Op::Login { user, correct } => {
                let password = if correct { PASSWORD } else { "not the password" };
                let got = h.engine.login(&users[user].user, password).await;
                prop_assert_eq!(got, model.login(user, correct));
            }
            Op::Advance { ms } => {
                h.clock.advance(ms);
                model.now_ms += ms;
            }
        }
    }
    for (i, user) in users.iter().enumerate() {
        let means = h.engine.list_means(&user.user, MeansOrder::Registration).await.unwrap();
        let m = &model.users[i];
        prop_assert_eq!(means.len(), m.means.len());
        for view in means {
            prop_assert_eq!(view.is_default, m.default == Some(view.means_id));
            prop_assert_eq!(view.uses, m.uses.get(&view.means_id).copied().unwrap_or(0));
        }
    }
    h.engine.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_reference_model(
        ops in prop::collection::vec(op(), 1..60),
        provider_latency_us in prop_oneof![Just(0u64), Just(200u64)],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(ops, provider_latency_us))?;
    }
}
