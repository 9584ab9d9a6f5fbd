//! G2 providers: store terminal lists, their services, and the S38–S39 confirmation.

use super::*;

impl Engine {
    /// Lists terminals (with their services) for a provider; the whole request or nothing.
    ///
    /// # Example
    ///
    /// Provider 1 lists a terminal with a 5% discount, which the confirmation query then finds:
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
    /// let now_ms = engine.now_ms();
    /// let shop = TerminalEntry {
    ///     terminal_id: "SHOP-0001".into(),
    ///     service: Some(TerminalService {
    ///         discount: Discount::Percent { bps: 500 },
    ///         valid_from_ms: now_ms,
    ///         valid_until_ms: now_ms + 3_600_000,
    ///         description: "5% off in this area".into(),
    ///     }),
    /// };
    /// engine.register_terminals(RequestId::random(), ProviderCode(1), vec![shop]).await?;
    /// match engine.confirm_terminal(ProviderCode(1), "SHOP-0001")? {
    ///     TerminalConfirmation::Listed { service } => assert!(service.is_some()),
    ///     TerminalConfirmation::NotListed => unreachable!(),
    /// }
    /// # engine.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn register_terminals(
        &self,
        client_request_id: RequestId,
        provider_code: ProviderCode,
        terminals: Vec<TerminalEntry>,
    ) -> Result<(), EngineError> {
        let provider_code = provider_code.get();
        let digest = digest_of(&("terminals", provider_code, format!("{terminals:?}")));
        let command = Command::RegisterTerminals { provider_code, terminals };
        self.change_provider(provider_code, client_request_id, digest, command).await
    }

    /// Removes terminals from a provider's list.
    pub async fn remove_terminals(
        &self,
        client_request_id: RequestId,
        provider_code: ProviderCode,
        terminal_ids: Vec<String>,
    ) -> Result<(), EngineError> {
        let provider_code = provider_code.get();
        let digest = digest_of(&("remove-terminals", provider_code, &terminal_ids));
        let command = Command::RemoveTerminals { provider_code, terminal_ids };
        self.change_provider(provider_code, client_request_id, digest, command).await
    }

    /// Seed steps S38–S39: is this terminal on the provider's list, and with which service?
    pub fn confirm_terminal(
        &self,
        provider_code: ProviderCode,
        terminal_id: &str,
    ) -> Result<TerminalConfirmation, EngineError> {
        let provider_code = provider_code.get();
        let provider = self
            .registry()
            .provider(provider_code)
            .ok_or(EngineError::Refused(ReasonCode::UnknownProvider))?;
        Ok(provider.confirm(terminal_id, self.now_ms()))
    }
}
