//! W3 the wallet: stored-value top-ups and which of a user's methods are usable at a store.

use super::*;

/// How the single best usable method is chosen (W3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BestBy {
    /// The most used (then the most recently used, then the oldest).
    #[default]
    MostUsed,
    /// The stored-value method with the largest available balance; when no usable method
    /// keeps a balance, the most used.
    LargestBalance,
}

/// One of the user's methods at a store (W3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodAtStore {
    /// The method, with its balance, uses and last use.
    pub means: MeansView,
    /// Whether the store accepts it (and, for stored value, whether it has a balance).
    pub usable: bool,
}

/// What a user can pay with at a store (W3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsableMethods {
    /// The store.
    pub store_id: String,
    /// Every registered method, marked usable or not.
    pub methods: Vec<MethodAtStore>,
    /// The best usable method by the asked policy, if any is usable.
    pub best: Option<u32>,
    /// When nothing is usable: the methods the store accepts, to suggest registering one.
    pub accepted: Vec<AcceptedMethod>,
}

/// One usable-methods query (W3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsableQuery {
    /// The user.
    pub user: UserKey,
    /// The store the user is in.
    pub store_id: String,
    /// How to choose the best method.
    pub best_by: BestBy,
}

/// Which query a lookup answers, and whether it is the query's means (else its store).
type Lookup = (usize, bool);

/// Marks each of the user's methods usable or not at `store` and picks the best.
fn usable_at(store: Store, means: Vec<MeansView>, best_by: BestBy) -> UsableMethods {
    let methods: Vec<MethodAtStore> = means
        .into_iter()
        .map(|means| {
            let accepted = store.accepts.iter().any(|a| a.accepts(means.kind, &means.label));
            let funded = means.balance.is_none_or(|b| b.available_minor > 0);
            MethodAtStore { usable: accepted && funded, means }
        })
        .collect();
    let usable = || methods.iter().filter(|m| m.usable).map(|m| &m.means);
    let most_used = usable()
        .max_by(|a, b| {
            (a.uses, a.last_used_ms)
                .cmp(&(b.uses, b.last_used_ms))
                .then(b.means_id.cmp(&a.means_id))
        })
        .map(|m| m.means_id);
    let best = match best_by {
        BestBy::MostUsed => most_used,
        BestBy::LargestBalance => usable()
            .filter_map(|m| Some((m.balance?.available_minor, m.means_id)))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, id)| id)
            .or(most_used),
    };
    let accepted = if best.is_none() { store.accepts.clone() } else { Vec::new() };
    UsableMethods { store_id: store.store_id, methods, best, accepted }
}

impl Engine {
    /// Loads a stored-value (e-money) means; the first top-up fixes the purse's currency.
    /// Returns the new balance.
    pub async fn top_up(
        &self,
        client_request_id: RequestId,
        user: &UserKey,
        means_id: u32,
        amount_minor: u64,
        currency: Currency,
    ) -> Result<Balance, EngineError> {
        if amount_minor == 0 || amount_minor > crate::limits::BALANCE_MAX_MINOR {
            return Err(EngineError::Refused(ReasonCode::InvalidAmount));
        }
        let digest = digest_of(&("top-up", user, means_id, amount_minor, currency));
        let command = Command::TopUp { user: user.clone(), means_id, amount_minor, currency };
        self.apply_for_user(user, Some(client_request_id), digest, command).await
    }

    /// Every method of the user at a store, marked usable or not, with balances; the best one
    /// by `best_by`; and, when none is usable, what the store accepts (W3).
    ///
    /// # Example
    ///
    /// A store that takes cards, and what a user with a card can pay with there:
    ///
    /// ```
    /// # use settlegate_engine::adapters::{simulated::SimulatedConfig, AdapterConfig};
    /// # use settlegate_engine::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let engine = Engine::start(EngineConfig {
    /// #     password: PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 },
    /// #     providers: vec![ProviderConfig {
    /// #         code: 1,
    /// #         name: "Demo Acquirer".into(),
    /// #         adapter: AdapterConfig::Simulated(SimulatedConfig::default()),
    /// #         limits: Default::default(),
    /// #         terminals: Vec::new(),
    /// #     }],
    /// #     ..EngineConfig::default()
    /// # })?;
    /// let user = UserKey::new(UserIdType::Mail, "hanako@example.jp")?;
    /// let device = engine
    ///     .enroll(EnrollRequest {
    ///         client_request_id: RequestId::random(),
    ///         user: user.clone(),
    ///         password: "a long passphrase".into(),
    ///         card_idm: [1, 0x2e, 0, 0, 0, 0, 0, 1],
    ///     })
    ///     .await?;
    /// let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
    /// engine.add_means(RequestId::random(), &user, &card, AddMeansOptions::default()).await?;
    /// let store = Store {
    ///     store_id: "STORE-1".into(),
    ///     name: "Corner Shop".into(),
    ///     industry: "5411".into(),
    ///     address: "1-1 Chiyoda".into(),
    ///     latitude: 35.68,
    ///     longitude: 139.76,
    ///     beacons: Vec::new(),
    ///     wifi: Vec::new(),
    ///     qr_code: None,
    ///     accepts: vec![AcceptedMethod { kind: MeansKind::CreditCard, brand: "*".into() }],
    /// };
    /// engine.upsert_store(RequestId::random(), store).await?;
    /// let usable = engine.usable_methods(&user, "STORE-1", BestBy::MostUsed).await?;
    /// assert_eq!(usable.methods.len(), 1);
    /// # engine.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn usable_methods(
        &self,
        user: &UserKey,
        store_id: &str,
        best_by: BestBy,
    ) -> Result<UsableMethods, EngineError> {
        let query = UsableQuery { user: user.clone(), store_id: store_id.to_owned(), best_by };
        let mut results = self.usable_methods_batch(vec![query]).await;
        results.pop().expect("one result per query")
    }

    /// Answers a batch of usable-methods queries: each shard gets one message holding every
    /// store and means lookup it owns, however many queries there are. Results come back in
    /// query order.
    pub async fn usable_methods_batch(
        &self,
        queries: Vec<UsableQuery>,
    ) -> Vec<Result<UsableMethods, EngineError>> {
        let count = queries.len();
        if count > BATCH_SIZE_MAX {
            let error = EngineError::BatchTooLarge { len: count, max: BATCH_SIZE_MAX };
            return vec![Err(error); count];
        }
        let mut stores: Vec<Option<Result<Store, EngineError>>> = vec![None; count];
        let mut means: Vec<Option<Result<Vec<MeansView>, EngineError>>> = vec![None; count];
        let mut per_shard: Vec<(Vec<Lookup>, Vec<Op>)> =
            (0..self.shard_count()).map(|_| Default::default()).collect();
        for (index, query) in queries.iter().enumerate() {
            match self.inner.shared.stores.locate(&query.store_id) {
                None => stores[index] = Some(Err(EngineError::Refused(ReasonCode::UnknownStore))),
                Some((cell, _)) => {
                    let shard = &mut per_shard[self.shard_of(cell_hash(cell))];
                    shard.0.push((index, false));
                    shard.1.push(Op::Query(Query::Store { store_id: query.store_id.clone() }));
                }
            }
            let shard = &mut per_shard[self.shard_of(user_hash(&query.user))];
            shard.0.push((index, true));
            shard
                .1
                .push(Op::Query(Query::Means { user: query.user.clone(), now_ms: self.now_ms() }));
        }
        let mut pending = Vec::new();
        for (shard, (slots, ops)) in per_shard.into_iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            match self.submit(shard, ops) {
                Ok(receiver) => pending.push((shard, slots, receiver)),
                Err(error) => {
                    for (index, is_means) in slots {
                        if is_means {
                            means[index] = Some(Err(error.clone()));
                        } else {
                            stores[index] = Some(Err(error.clone()));
                        }
                    }
                }
            }
        }
        for (shard, slots, receiver) in pending {
            let replies = receiver.await.map_err(|unanswered| unanswered.or_lost(self, shard));
            for (position, (index, is_means)) in slots.into_iter().enumerate() {
                let reply = match &replies {
                    Ok(replies) => Ok(replies[position].clone()),
                    Err(error) => Err(error.clone()),
                };
                if is_means {
                    means[index] = Some(reply.and_then(Reply::into_flow));
                } else {
                    let store = reply.and_then(Reply::into_flow::<Box<Store>>);
                    stores[index] = Some(store.map(|store| *store));
                }
            }
        }
        queries
            .into_iter()
            .zip(stores.into_iter().zip(means))
            .map(|(query, (store, means))| {
                let store = store.expect("every store lookup answered")?;
                let means = means.expect("every means lookup answered")?;
                Ok(usable_at(store, means, query.best_by))
            })
            .collect()
    }
}
