//! A1–A3 age: registrations of user terminals and store terminals' age policies.

use super::*;

impl Engine {
    /// Registers a terminal's age information (A1): `record` is an [`AgeRecord`] signed by the
    /// terminal's device key after the user passed biometric authentication on it. The tag is
    /// checked in constant time; the owning shard checks the counter, the timestamp window
    /// and the validity window, then keeps the registration (replacing an older one).
    pub async fn register_age(
        &self,
        client_request_id: RequestId,
        record: &[u8],
    ) -> Result<(), EngineError> {
        let now_ms = self.now_ms();
        let (decoded, body, tag) = AgeRecord::decode(record).map_err(EngineError::Refused)?;
        self.inner
            .shared
            .devices
            .verify_tag(&decoded.card_idm, &decoded.user, decoded.key_version, body, tag, now_ms)
            .map_err(EngineError::Refused)?;
        let digest = u64::from_be_bytes(tag[..8].try_into().expect("8"));
        let user = decoded.user.clone();
        let command = Command::RegisterAge { record: decoded, tag: *tag };
        self.apply_for_user(&user, Some(client_request_id), digest, command).await
    }

    /// Sets a listed store terminal's own age policy (A2, A3); `None` clears it, so the
    /// terminal follows its provider's policy, or the engine's default.
    ///
    /// # Example
    ///
    /// A listed terminal gets its own policy, then follows its provider's again:
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
    /// let till = TerminalEntry { terminal_id: "TILL-1".into(), service: None };
    /// engine.register_terminals(RequestId::random(), ProviderCode(1), vec![till]).await?;
    /// let policy = Some(AgePolicy::default());
    /// engine.set_age_policy(RequestId::random(), ProviderCode(1), "TILL-1", policy).await?;
    /// engine.set_age_policy(RequestId::random(), ProviderCode(1), "TILL-1", None).await?;
    /// # engine.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn set_age_policy(
        &self,
        client_request_id: RequestId,
        provider_code: ProviderCode,
        terminal_id: &str,
        policy: Option<AgePolicy>,
    ) -> Result<(), EngineError> {
        let provider_code = provider_code.get();
        if let Some(policy) = &policy {
            self.inner.shared.age.config.resolve(policy).map_err(EngineError::Refused)?;
        }
        let digest = digest_of(&("age-policy", provider_code, terminal_id, &policy));
        let command =
            Command::SetAgePolicy { provider_code, terminal_id: terminal_id.to_owned(), policy };
        self.change_provider(provider_code, client_request_id, digest, command).await
    }
}
