//! G2 providers: store terminal lists, their services, and the S38–S39 confirmation.

use super::*;

impl Engine {
    /// Lists terminals (with their services) for a provider; the whole request or nothing.
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
