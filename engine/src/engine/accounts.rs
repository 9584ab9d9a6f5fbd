//! G1 accounts: enrollment, devices and their keys, passwords and lockout, settlement means.

use super::*;

/// Enrollment of a new user with their first device (G1).
#[derive(Clone)]
pub struct EnrollRequest {
    /// Makes retries safe (see [`RequestId`]).
    pub client_request_id: RequestId,
    /// The user.
    pub user: UserKey,
    /// The password; hashed with Argon2id, never stored or logged in the clear.
    pub password: String,
    /// The card IDm of the user's terminal.
    pub card_idm: Idm,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("client_request_id", &self.client_request_id)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("card_idm", &hex::encode(self.card_idm))
            .finish()
    }
}

/// A device key handed out at provisioning or rotation. Give it to the device, then drop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// The device.
    pub card_idm: Idm,
    /// Version to put in inherent IDs signed with this key.
    pub key_version: u16,
    /// The key.
    pub device_key: DeviceKey,
}

/// A registered means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeansAdded {
    /// The new means' ID within the user.
    pub means_id: u32,
    /// Last four digits of its card or account number, if it has one.
    pub last4: Option<String>,
}

/// The order of a means listing (C1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeansOrder {
    /// Oldest registration first.
    #[default]
    Registration,
    /// Most used first.
    Frequency,
    /// Most recently used first; never-used last.
    Recency,
}

impl Engine {
    /// Enrolls a user with a password and their first device; returns the device key.
    ///
    /// # Example
    ///
    /// Enrolment, then a card as the default settlement means:
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
    /// let options = AddMeansOptions::default().make_default(true);
    /// let added = engine.add_means(RequestId::random(), &user, &card, options).await?;
    /// assert_eq!(added.last4.as_deref(), Some("1111"));
    /// let means = engine.list_means(&user, MeansOrder::Registration).await?;
    /// assert_eq!(means.len(), 1);
    /// engine.login(&user, "a long passphrase").await?;
    /// # engine.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn enroll(&self, request: EnrollRequest) -> Result<DeviceCredential, EngineError> {
        PasswordHasher::policy_check(&request.password).map_err(EngineError::Refused)?;
        let hasher = self.inner.hasher.clone();
        let password = zeroize::Zeroizing::new(request.password);
        let password_phc = tokio::task::spawn_blocking(move || hasher.hash(&password))
            .await
            .map_err(|_| EngineError::Stopped)?;
        let digest = digest_of(&("enroll", &request.user, request.card_idm));
        let claim = self.claim_device(request.card_idm, &request.user);
        let command = Command::Enroll {
            user: request.user.clone(),
            password_phc,
            idm: request.card_idm,
            key: NewDeviceKey::random(&self.inner.shared.vault, &request.card_idm),
            device_free: Some(claim.won),
        };
        let reply =
            self.apply_for_user(&request.user, Some(request.client_request_id), digest, command);
        credential_from(claim.held_over(reply).await?, request.card_idm)
    }

    /// Provisions another device for a user, after checking their password.
    pub async fn provision_device(
        &self,
        client_request_id: RequestId,
        user: &UserKey,
        password: &str,
        card_idm: Idm,
    ) -> Result<DeviceCredential, EngineError> {
        self.login(user, password).await?;
        let digest = digest_of(&("provision", user, card_idm));
        let claim = self.claim_device(card_idm, user);
        let command = Command::ProvisionDevice {
            user: user.clone(),
            idm: card_idm,
            key: NewDeviceKey::random(&self.inner.shared.vault, &card_idm),
            device_free: Some(claim.won),
        };
        let reply = self.apply_for_user(user, Some(client_request_id), digest, command);
        credential_from(claim.held_over(reply).await?, card_idm)
    }

    /// Replaces a device's key, after checking the user's password. The previous key stays
    /// valid for `key_grace_ms`.
    pub async fn rotate_device_key(
        &self,
        client_request_id: RequestId,
        user: &UserKey,
        password: &str,
        card_idm: Idm,
    ) -> Result<DeviceCredential, EngineError> {
        self.login(user, password).await?;
        let digest = digest_of(&("rotate", user, card_idm));
        let command = Command::RotateDeviceKey {
            user: user.clone(),
            idm: card_idm,
            key: NewDeviceKey::random(&self.inner.shared.vault, &card_idm),
        };
        let issued = self.apply_for_user(user, Some(client_request_id), digest, command).await?;
        credential_from(issued, card_idm)
    }

    /// Revokes every key of a user's device at once, after checking the user's password: for a
    /// lost or stolen device. Its current key and any rotated-out key still in its grace window
    /// are refused from then on (reason `KeyVersionInvalid`), durably; the device stays the
    /// user's, and `rotate_device_key` gives it a new key if it is found again.
    pub async fn revoke_device_key(
        &self,
        client_request_id: RequestId,
        user: &UserKey,
        password: &str,
        card_idm: Idm,
    ) -> Result<(), EngineError> {
        self.login(user, password).await?;
        let digest = digest_of(&("revoke", user, card_idm));
        // The device's key from now on: one nobody is given, so nothing it signs verifies.
        let command = Command::RevokeDeviceKey {
            user: user.clone(),
            idm: card_idm,
            key: NewDeviceKey::random(&self.inner.shared.vault, &card_idm),
        };
        self.apply_for_user(user, Some(client_request_id), digest, command).await
    }

    /// Checks a password. Too many consecutive failures lock the account for `lockout_ms`.
    ///
    /// An unknown user is answered exactly as a wrong password (`WrongPassword`), after the
    /// same work: a verification against a dummy hash, and a logged login attempt through the
    /// user's shard (which finds no user), so that neither the answer nor its timing tells
    /// which users exist. Every operation that takes a password checks it here.
    pub async fn login(&self, user: &UserKey, password: &str) -> Result<(), EngineError> {
        let now_ms = self.now_ms();
        let query = Query::Credentials { user: user.clone(), now_ms };
        let (phc, known) = match self.query_for_user(user, query).await {
            Ok(Credentials { password_phc }) => (password_phc, true),
            Err(EngineError::Refused(ReasonCode::UnknownUser)) => {
                (self.inner.dummy_phc.clone(), false)
            }
            Err(error) => return Err(error),
        };
        let hasher = self.inner.hasher.clone();
        let password = zeroize::Zeroizing::new(password.to_owned());
        let verified = tokio::task::spawn_blocking(move || hasher.verify(&password, &phc))
            .await
            .map_err(|_| EngineError::Stopped)?;
        // The dummy hash's password never logs anyone in.
        let command = Command::LoginAttempt { user: user.clone(), success: verified && known };
        match self.apply_for_user(user, None, 0, command).await {
            Ok(()) => Ok(()),
            Err(EngineError::Refused(ReasonCode::UnknownUser)) => {
                Err(EngineError::Refused(ReasonCode::WrongPassword))
            }
            Err(error) => Err(error),
        }
    }

    /// Registers a settlement means; a card or account number goes to the vault.
    pub async fn add_means(
        &self,
        client_request_id: RequestId,
        user: &UserKey,
        means: &MeansInput,
        options: AddMeansOptions,
    ) -> Result<MeansAdded, EngineError> {
        let AddMeansOptions { make_default } = options;
        let prepared = means.prepare(&self.inner.shared.vault).map_err(EngineError::Refused)?;
        let digest = digest_of(&("means", user, means.public_parts(), make_default));
        let command = Command::AddMeans { user: user.clone(), means: prepared, make_default };
        let AddedMeans { means_id, last4 } =
            self.apply_for_user(user, Some(client_request_id), digest, command).await?;
        Ok(MeansAdded { means_id, last4: last4.map(|l| String::from_utf8_lossy(&l).into_owned()) })
    }

    /// Makes a registered means the user's default.
    pub async fn set_default_means(
        &self,
        client_request_id: RequestId,
        user: &UserKey,
        means_id: u32,
    ) -> Result<(), EngineError> {
        let digest = digest_of(&("default", user, means_id));
        let command = Command::SetDefaultMeans { user: user.clone(), means_id };
        self.apply_for_user(user, Some(client_request_id), digest, command).await
    }

    /// The user's registered means, in the asked order.
    pub async fn list_means(
        &self,
        user: &UserKey,
        order: MeansOrder,
    ) -> Result<Vec<MeansView>, EngineError> {
        let query = Query::Means { user: user.clone(), now_ms: self.now_ms() };
        let mut means: Vec<MeansView> = self.query_for_user(user, query).await?;
        match order {
            MeansOrder::Registration => {}
            MeansOrder::Frequency => {
                means.sort_by(|a, b| b.uses.cmp(&a.uses).then(a.means_id.cmp(&b.means_id)))
            }
            MeansOrder::Recency => means.sort_by(|a, b| {
                b.last_used_ms.cmp(&a.last_used_ms).then(a.means_id.cmp(&b.means_id))
            }),
        }
        Ok(means)
    }

    /// Subscribes to the user's completion notices.
    pub fn subscribe(&self, user: &UserKey) -> broadcast::Receiver<Notice> {
        self.inner.notices.subscribe(user)
    }
}
